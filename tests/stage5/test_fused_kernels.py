"""Stage 5: each fused kernel against the stage-1 module(s) it replaces.

  CPU (marker stage5): tiny shapes under Triton's interpreter (fp32, some fp16; the
      interpreter mishandles bf16, so bf16 is GPU-only). With a GPU the same cases compile.
  GPU (markers stage5 + gpu): real shapes (hidden 1024/4096, head_dim 64/128, 16-64 heads),
      bf16/fp16/fp32, T = 1, 3, 17, 257, and CUDA-graph capture + replay of all three.
Inputs are strided row views (a slice of a wider buffer), so a kernel that assumes
contiguous rows fails. Run: python -m pytest -m gpu tests/stage5/test_fused_kernels.py
"""

import pytest
import torch
import torch.nn.functional as F

HAS_CUDA = torch.cuda.is_available()     # without it, tests/conftest.py runs Triton's interpreter
from stage1_model.layers import RMSNorm, RotaryEmbedding
from stage5_tp_cudagraph import fused_kernels as fk

pytestmark = pytest.mark.stage5
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
DEV = "cuda" if HAS_CUDA else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}   # atol = rtol
EPS = 1e-6


def rows(T, N, dtype, device, seed, pad=8):
    """[T, N] random rows with row stride N + pad (a view into a wider buffer)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, N + pad, generator=g) * 2).to(dtype=dtype, device=device)[:, :N]


def norm_module(N, dtype, device, seed=1):
    m = RMSNorm(N, EPS).to(dtype=dtype, device=device)
    with torch.no_grad():               # a non-trivial weight, so a missed scale is caught
        m.weight.copy_(1 + 0.2 * torch.randn(N, generator=torch.Generator().manual_seed(seed)))
    return m


def close(got, ref, dtype):
    torch.testing.assert_close(got.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


# ------------------------------------------------------------------ the checks

@torch.inference_mode()
def check_rmsnorm(T, N, dtype, device, with_residual):
    norm, x = norm_module(N, dtype, device), rows(T, N, dtype, device, seed=T)
    if not with_residual:
        close(fk.rmsnorm(x, norm.weight, EPS), norm(x), dtype)
        return
    res = rows(T, N, dtype, device, seed=T + 100)
    expected_sum = x + res                                  # stage 1: x = x + sublayer(x)
    out, res_out = fk.rmsnorm(x, norm.weight, EPS, res)
    assert res_out is res and torch.equal(res, expected_sum)   # updated in place, same rounding
    close(out, norm(expected_sum), dtype)


@torch.inference_mode()
def check_qk_norm_rope(T, H, KVH, D, dtype, device, max_pos=4096, store=False):
    q_norm, k_norm = norm_module(D, dtype, device, 2), norm_module(D, dtype, device, 3)
    rope = RotaryEmbedding(D, max_pos, 1e6).to(device)
    qkv = rows(T, (H + 2 * KVH) * D, dtype, device, seed=T)
    positions = torch.randint(0, max_pos, (T,), generator=torch.Generator().manual_seed(T)).to(device)
    q0, k0 = qkv[:, :H * D].view(T, H, D), qkv[:, H * D:(H + KVH) * D].view(T, KVH, D)
    ref_q, ref_k = rope(positions, q_norm(q0), k_norm(k0))            # stage 1's path
    ref_v = qkv[:, (H + KVH) * D:].clone()
    kv_store = None
    if store:     # a pool of 2T + 3 slots; the T new rows go to scattered slots, the rest stay NaN
        kbuf = torch.full((2 * T + 3, KVH, D), float("nan"), dtype=dtype, device=device)
        vbuf = kbuf.clone()
        loc = torch.randperm(2 * T + 3, generator=torch.Generator().manual_seed(T))[:T].to(device)
        kv_store = (kbuf, vbuf, loc)
    q, k, v = fk.qk_norm_rope(qkv, q_norm.weight, k_norm.weight, rope.cos, rope.sin, positions, H, KVH, EPS,
                              kv_store)
    assert q.shape == (T, H, D) and k.shape == (T, KVH, D) and v.shape == (T, KVH, D)
    assert q.data_ptr() == qkv.data_ptr()                            # in place, views of qkv
    close(q, ref_q, dtype)
    close(k, ref_k, dtype)
    assert torch.equal(v.reshape(T, -1), ref_v)                      # v untouched
    if store:                           # the pool holds exactly the returned k/v rows, only at loc
        assert torch.equal(kbuf[loc], k) and torch.equal(vbuf[loc], v)
        others = torch.ones(len(kbuf), dtype=torch.bool, device=device)
        others[loc] = False
        assert kbuf[others].isnan().all() and vbuf[others].isnan().all()


@torch.inference_mode()
def check_silu_and_mul(T, inter, dtype, device):
    x = rows(T, 2 * inter, dtype, device, seed=T)
    out = fk.silu_and_mul(x)
    assert out.shape == (T, inter) and out.is_contiguous()
    close(out, F.silu(x[:, :inter]) * x[:, inter:], dtype)            # stage 1's SwiGLU expression


# ------------------------------------------------------------------ small shapes (CPU interpreter or GPU)

@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("T,N", [(1, 64), (5, 40), (17, 24)])        # 40, 24: not powers of two
def test_rmsnorm_small(T, N, with_residual):
    check_rmsnorm(T, N, torch.float32, DEV, with_residual)


def test_rmsnorm_small_fp16():
    check_rmsnorm(3, 40, torch.float16, DEV, True)


@pytest.mark.parametrize("H,KVH,D", [(3, 3, 8), (4, 2, 16), (8, 2, 32), (2, 1, 64), (2, 1, 12)])
@pytest.mark.parametrize("T", [1, 5])
def test_qk_norm_rope_small(T, H, KVH, D):
    check_qk_norm_rope(T, H, KVH, D, torch.float32, DEV)


def test_qk_norm_rope_small_fp16_odd_tokens():
    check_qk_norm_rope(17, 4, 2, 16, torch.float16, DEV)


@pytest.mark.parametrize("T,H,KVH,D", [(1, 4, 2, 16), (5, 3, 3, 8), (7, 2, 1, 12)])
def test_qk_norm_rope_stores_kv(T, H, KVH, D):
    """The KV-store variant writes the finished k and v rows at `loc` and nothing else."""
    check_qk_norm_rope(T, H, KVH, D, torch.float32, DEV, store=True)


@pytest.mark.parametrize("T,inter", [(1, 40), (3, 64), (2, 1500)])   # 1500: two masked blocks
def test_silu_and_mul_small(T, inter):
    check_silu_and_mul(T, inter, torch.float32, DEV)


def test_silu_and_mul_small_fp16():
    check_silu_and_mul(5, 48, torch.float16, DEV)


@torch.inference_mode()
def test_zero_tokens_and_bad_layout():
    """An empty batch launches nothing; a tensor with a strided last dim is refused."""
    w = torch.ones(16, device=DEV)
    x = torch.empty(0, 16, device=DEV)
    assert fk.rmsnorm(x, w, EPS).shape == (0, 16) and fk.silu_and_mul(x).shape == (0, 8)
    cos = torch.ones(8, 4, device=DEV)
    q, k, v = fk.qk_norm_rope(torch.empty(0, 32, device=DEV), w[:8], w[:8], cos, cos,
                              torch.empty(0, dtype=torch.long, device=DEV), 2, 1, EPS)
    assert q.shape == (0, 2, 8) and k.shape == v.shape == (0, 1, 8)
    with pytest.raises(ValueError, match="unit last stride"):
        fk.rmsnorm(torch.ones(4, 16, device=DEV).t(), w[:4], EPS)


# ------------------------------------------------------------------ GPU: real shapes and dtypes

GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
TOKENS = [1, 3, 17, 257]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [1024, 4096])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rmsnorm_gpu(hidden, dtype, with_residual):
    for T in TOKENS:
        check_rmsnorm(T, hidden, dtype, "cuda", with_residual)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("H,KVH,D", [(16, 8, 128), (32, 8, 128), (64, 8, 128), (8, 8, 64), (14, 2, 64)])
def test_qk_norm_rope_gpu(H, KVH, D, dtype):
    for T in TOKENS:
        check_qk_norm_rope(T, H, KVH, D, dtype, "cuda", max_pos=40960)
        check_qk_norm_rope(T, H, KVH, D, dtype, "cuda", max_pos=40960, store=True)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("inter", [3072, 12288, 1000])
def test_silu_and_mul_gpu(inter, dtype):
    for T in TOKENS:
        check_silu_and_mul(T, inter, dtype, "cuda")


@pytest.mark.gpu
@needs_cuda
@torch.inference_mode()
def test_kernels_replay_in_a_cuda_graph():
    """Capture the three kernels once; new inputs copied into the static buffers must flow
    through replay (no host reads, fixed grids)."""
    T, H, KVH, D, N, I, dt = 8, 16, 8, 128, 1024, 3072, torch.bfloat16
    norm = norm_module(N, dt, "cuda")
    q_norm, k_norm = norm_module(D, dt, "cuda", 2), norm_module(D, dt, "cuda", 3)
    rope = RotaryEmbedding(D, 4096, 1e6).to("cuda")
    x, res = rows(T, N, dt, "cuda", 0), rows(T, N, dt, "cuda", 1)
    qkv, gu = rows(T, (H + 2 * KVH) * D, dt, "cuda", 2), rows(T, 2 * I, dt, "cuda", 3)
    pos = torch.arange(T, device="cuda")

    def step():
        out, _ = fk.rmsnorm(x, norm.weight, EPS, res)
        q, k, _ = fk.qk_norm_rope(qkv, q_norm.weight, k_norm.weight, rope.cos, rope.sin, pos, H, KVH, EPS)
        return out, q, k, fk.silu_and_mul(gu)
    step()                                            # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for seed in (10, 20):
        for buf, s in ((x, seed), (res, seed + 1), (qkv, seed + 2), (gu, seed + 3)):
            buf.copy_(rows(*buf.shape, dt, "cuda", s))
        pos.copy_(torch.randint(0, 4096, (T,), device="cuda"))
        x0, r0, qkv0, gu0 = x.clone(), res.clone(), qkv.clone(), gu.clone()
        graph.replay()
        close(outs[0], norm(x0 + r0), dt)
        ref_q, ref_k = rope(pos, q_norm(qkv0[:, :H * D].view(T, H, D)),
                            k_norm(qkv0[:, H * D:(H + KVH) * D].view(T, KVH, D)))
        close(outs[1], ref_q, dt)
        close(outs[2], ref_k, dt)
        close(outs[3], F.silu(gu0[:, :I]) * gu0[:, I:], dt)
