"""Stage 5: the batch-1 GEMV kernel (gemv.py) against F.linear / a float64 product.

  CPU (marker stage5): small shapes under Triton's interpreter (fp32, fp16), with N not a
      multiple of the rows per program and K not a multiple of the tile (the masked paths).
  GPU (markers stage5 + gpu): Qwen3-0.6B/8B and TP-shard shapes in bf16/fp16/fp32, strided
      x, replay from a CUDA graph, and `linear` choosing the kernel only for one 16-bit row.
Run: python -m pytest -m gpu tests/stage5/test_gemv.py
"""

import pytest
import torch
import torch.nn.functional as F

from stage5_tp_cudagraph import gemv as gv

pytestmark = pytest.mark.stage5
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
DEV = "cuda" if HAS_CUDA else "cpu"


def case(N, K, dtype, device, seed=0, x_stride_pad=0, w_stride_pad=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K + w_stride_pad, generator=g) * 0.05).to(dtype=dtype, device=device)[:, :K]
    x = torch.randn(1, K + x_stride_pad, generator=g).to(dtype=dtype, device=device)[:, :K]
    return x, w


def check(N, K, dtype, device, **kw):
    x, w = case(N, K, dtype, device, **kw)
    y = gv.gemv(x, w)
    assert y.shape == (1, N) and y.dtype == dtype
    want = (x.double() @ w.double().T)                      # exact; both kernels round once
    # one rounding of a float32 sum: within a couple of ulps of the output dtype
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(y.double(), want, atol=tol * max(1.0, want.abs().max().item()), rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("N,K", [(1, 16), (5, 40), (64, 512), (7, 1500), (33, 2048)])
def test_gemv_small(N, K, dtype):
    check(N, K, dtype, DEV)
    check(N, K, dtype, DEV, seed=1, w_stride_pad=24)        # weight rows are a view: stride(0) != K


def test_gemv_rejects_bad_layout():
    x, w = case(8, 32, torch.float32, DEV)
    with pytest.raises(ValueError, match="gemv wants"):
        gv.gemv(torch.cat([x, x]), w)                        # two rows
    with pytest.raises(ValueError, match="gemv wants"):
        gv.gemv(x, w.t().contiguous().t())                   # column-major weight


def test_linear_uses_the_kernel_only_for_one_16bit_gpu_row(monkeypatch):
    calls = []
    monkeypatch.setattr(gv, "gemv", lambda x, w: calls.append(x.shape) or F.linear(x, w))
    with torch.inference_mode():                                       # as the engine runs
        for rows, dtype in ((1, torch.float32), (2, torch.float16), (1, torch.float16)):
            x, w = case(8, 32, dtype, DEV)
            x = x.expand(rows, -1).contiguous()
            torch.testing.assert_close(gv.linear(x, w), F.linear(x, w))
        x, w = case(8, 32, torch.float16, DEV)
        torch.testing.assert_close(gv.linear(x, w.t().contiguous().t()), F.linear(x, w))   # column-major
    x, w = case(8, 32, torch.float16, DEV)
    w.requires_grad_(True)
    assert gv.linear(x, w).requires_grad                              # autograd on: F.linear, backward works
    # only the one-fp16-row, row-major, no-grad case qualifies, and only on a GPU
    assert calls == ([(1, 32)] if HAS_CUDA else [])


# ------------------------------------------------------------------ GPU: real shapes

SHAPES = {"0.6b qkv": (4096, 1024), "0.6b o": (1024, 2048), "0.6b gate_up": (6144, 1024), "0.6b down": (1024, 3072),
          "8b qkv": (6144, 4096), "8b o": (4096, 4096), "8b down": (4096, 12288), "tp2 qkv": (3072, 4096),
          "tp2 o": (4096, 2048), "odd": (1001, 1000)}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_gemv_gpu(shape, dtype):
    check(*shape, dtype, "cuda", x_stride_pad=0)
    check(*shape, dtype, "cuda", seed=1, x_stride_pad=8)     # x a view into a wider row


@pytest.mark.gpu
@needs_cuda
def test_gemv_replays_in_a_cuda_graph(monkeypatch):
    x, w = case(3072, 4096, torch.bfloat16, "cuda")
    gv.gemv(x, w)                                           # compile outside the capture
    kernel = gv.gemv
    monkeypatch.setattr(gv, "gemv", lambda *a: calls.append(1) or kernel(*a))
    calls = []
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        y = gv.linear(x, w)
    for seed in (1, 2):
        x.copy_(case(3072, 4096, torch.bfloat16, "cuda", seed=seed)[0])
        graph.replay()
        torch.testing.assert_close(y.float(), F.linear(x, w).float(), atol=3e-2, rtol=2e-2)
    assert calls == [1]                                     # the graph holds the GEMV, not cuBLAS
