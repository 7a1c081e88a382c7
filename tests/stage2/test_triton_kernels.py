"""Stage 2: our Triton attention kernels against a plain per-request SDPA reference.

Two ways to run them:
  GPU (marker `gpu`): real shapes (head_dim 128, 16/32/64 query heads over 8 KV heads,
      contexts up to 8k, bf16/fp16/fp32), CUDA-graph capture of decode, and a whole
      ModelRunner with attention_backend="triton" against "torch".
  CPU (marker `stage2`): a tiny subset under Triton's interpreter. TRITON_INTERPRET must be
      set before triton is imported, so that check runs in a subprocess.

Every case scatters each request's KV over a shuffled pool (page sizes 1 and 16) and uses
shuffled req_to_token rows, so a kernel that assumes contiguous slots or row b == request b
fails. The reference gathers each request's K/V and calls stage 1's causal_attention.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stage1_model.generate import causal_attention

pytestmark = pytest.mark.stage2
ROOT = Path(__file__).resolve().parents[2]
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (Triton kernels compile for it)")
TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}   # atol = rtol


# ------------------------------------------------------------------ building paged cases

def paged_layout(seq_lens, page_size, gen, max_ctx=None):
    """Scatter each request over shuffled pages. Returns req_to_token [B + 3, max_ctx] int32,
    rows [B] (shuffled rows of it) and the number of slots."""
    B = len(seq_lens)
    max_ctx = max_ctx or max(max(seq_lens), 1)
    pages_needed = [-(-n // page_size) for n in seq_lens]
    num_pages = sum(pages_needed) + 2                      # a couple of pages nobody uses
    pages = torch.randperm(num_pages, generator=gen).tolist()
    rows = torch.randperm(B + 3, generator=gen)[:B]
    req_to_token = torch.zeros(B + 3, max_ctx, dtype=torch.int32)
    for b, n in enumerate(seq_lens):
        mine = [pages.pop() for _ in range(pages_needed[b])]
        pos = torch.arange(n)
        req_to_token[rows[b], :n] = (torch.tensor(mine, dtype=torch.int64)[pos // page_size] * page_size
                                     + pos % page_size).int()
    return req_to_token, rows, num_pages * page_size


def make_case(seq_lens, num_heads, num_kv_heads, head_dim, page_size, dtype, device, num_q, seed=0):
    """Random pool + layout for `seq_lens`, and q [num_q, H, D]."""
    gen = torch.Generator().manual_seed(seed)
    r2t, rows, num_slots = paged_layout(seq_lens, page_size, gen)
    k = torch.randn(num_slots, num_kv_heads, head_dim, generator=gen)
    v = torch.randn(num_slots, num_kv_heads, head_dim, generator=gen)
    q = torch.randn(num_q, num_heads, head_dim, generator=gen)
    to = dict(device=device)
    return (q.to(dtype=dtype, **to), k.to(dtype=dtype, **to), v.to(dtype=dtype, **to),
            r2t.to(**to), rows.to(**to))


def reference(q, k, v, r2t, rows, prefix_lens, extend_lens):
    """Per request: gather K/V, causal SDPA in float32. Returns [T, H, D] float32."""
    T, H, D = q.shape
    out, start = [], 0
    for row, p, e in zip(rows.tolist(), prefix_lens, extend_lens):
        slots = r2t[row, :p + e].long()
        out.append(causal_attention(q[start:start + e].float(), k[slots].float(), v[slots].float()).view(e, H, D))
        start += e
    return torch.cat(out)


def i32(xs, device):
    return torch.tensor(xs, dtype=torch.int32, device=device)


# ------------------------------------------------------------------ the two checks

def check_decode(seq_lens, heads, kv_heads, head_dim, page_size, dtype, device, splits=16, seed=0):
    from stage2_runner import triton_kernels as tk
    q, k, v, r2t, rows = make_case(seq_lens, heads, kv_heads, head_dim, page_size, dtype, device,
                                   len(seq_lens), seed)
    out = torch.empty_like(q)
    ws = tk.alloc_decode_workspace(len(seq_lens) + 2, heads, splits, head_dim, device)
    tk.decode_attention(q, k, v, out, r2t, rows, i32(seq_lens, device), head_dim ** -0.5,
                        num_kv_splits=splits, workspace=ws)
    ref = reference(q, k, v, r2t, rows, [n - 1 for n in seq_lens], [1] * len(seq_lens))
    torch.testing.assert_close(out.float(), ref, atol=TOL[dtype], rtol=TOL[dtype])


def check_extend(prefix_lens, extend_lens, heads, kv_heads, head_dim, page_size, dtype, device, seed=0):
    from stage2_runner import triton_kernels as tk
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    q, k, v, r2t, rows = make_case(seq_lens, heads, kv_heads, head_dim, page_size, dtype, device,
                                   sum(extend_lens), seed)
    starts = [sum(extend_lens[:i]) for i in range(len(extend_lens))]
    out = torch.empty_like(q)
    tk.extend_attention(q, k, v, out, r2t, rows, i32(prefix_lens, device), i32(extend_lens, device),
                        i32(starts, device), max(extend_lens), head_dim ** -0.5)
    ref = reference(q, k, v, r2t, rows, prefix_lens, extend_lens)
    torch.testing.assert_close(out.float(), ref, atol=TOL[dtype], rtol=TOL[dtype])


def check_decode_empty_request(device):
    """seq_len 0 (a padded batch entry) gives zeros, not NaN, and leaves the others intact."""
    from stage2_runner import triton_kernels as tk
    q, k, v, r2t, rows = make_case([5, 1], 4, 2, 16, 1, torch.float32, device, 2)
    out = torch.full_like(q, float("nan"))
    tk.decode_attention(q, k, v, out, r2t, rows, i32([5, 0], device), 0.25, num_kv_splits=4)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out[:1], reference(q[:1], k, v, r2t, rows[:1], [4], [1]))


# ------------------------------------------------------------------ CPU: Triton interpreter

def interpreter_cases():
    """Tiny shapes, run inside the TRITON_INTERPRET=1 subprocess. The interpreter computes
    tl.dot of bf16 on raw bits, so bf16 is checked on the GPU only."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    heads = [(4, 2, 16), (3, 3, 8), (8, 2, 32)]        # GQA 2, MHA with head_dim 8, GQA 4
    for dtype in (torch.float32, torch.float16):
        for page in (1, 16):
            for h, kvh, d in heads:
                # 65 and 200 cross the 64-slot block; 200 over 4 splits fills all four
                check_decode([1, 17, 65, 200], h, kvh, d, page, dtype, "cpu", splits=4)
                # prefix 0 and > 0; 70 new tokens span two BLOCK_M blocks
                check_extend([0, 5, 33], [1, 40, 70], h, kvh, d, page, dtype, "cpu")
    check_decode([3, 130], 4, 2, 16, 16, torch.float32, "cpu", splits=1)    # one split
    check_decode([3, 130], 4, 2, 16, 1, torch.float32, "cpu", splits=3)     # not a power of 2
    check_decode_empty_request("cpu")
    print("interpreter cases passed")


def interpreter_runner_case(model_dir):
    """The whole ModelRunner on CPU: triton backend (interpreted) == torch backend."""
    from stage2_runner.batch_generate import batch_generate
    from stage2_runner.model_runner import ModelRunner
    prompts = [list(range(40, 49)), list(range(1, 21)), list(range(30, 100))]   # all > split_prefill_at
    runs = {}
    for name in ("torch", "triton"):
        runner = ModelRunner(model=model_dir, device="cpu", attention_backend=name, page_size=16,
                             max_total_tokens=512, max_running_requests=4)
        runs[name] = batch_generate(runner, prompts, 4, split_prefill_at=8, return_logits=True)
    assert runs["triton"][0] == runs["torch"][0]
    torch.testing.assert_close(torch.stack(runs["triton"][1]), torch.stack(runs["torch"][1]),
                               atol=1e-4, rtol=1e-4)
    print("interpreter runner case passed")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_kernels_under_triton_interpreter(tiny_model_dir):
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            "import test_triton_kernels as t; t.interpreter_cases(); "
            f"t.interpreter_runner_case({str(tiny_model_dir[0])!r})")
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    assert "interpreter cases passed" in res.stdout and "interpreter runner case passed" in res.stdout


# ------------------------------------------------------------------ GPU: real shapes

HEADS = [(16, 8, 128), (32, 8, 128), (64, 8, 128), (4, 2, 64), (3, 3, 8)]
HEAD_IDS = [f"{h}q{kv}kv_d{d}" for h, kv, d in HEADS]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page", [1, 16])
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
def test_decode_gpu(heads, page, dtype):
    check_decode([1, 7, 64, 65, 1000, 2048, 4097, 8192], *heads, page, dtype, "cuda")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("splits", [1, 7, 32])
def test_decode_gpu_split_counts(splits):
    check_decode([1, 63, 300, 5000], 32, 8, 128, 16, torch.bfloat16, "cuda", splits=splits)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page", [1, 16])
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
def test_extend_gpu(heads, page, dtype):
    check_extend([0, 0, 100, 1000, 3000], [1, 64, 65, 300, 1024], *heads, page, dtype, "cuda")
    check_extend([0], [4096], *heads, page, dtype, "cuda")               # one long prefill


@pytest.mark.gpu
@needs_cuda
def test_decode_empty_request_gpu():
    check_decode_empty_request("cuda")


@pytest.mark.gpu
@needs_cuda
def test_decode_is_cuda_graph_capturable():
    """Capture once, then change lengths and slots in place: replay must follow them."""
    from stage2_runner import triton_kernels as tk
    H, KVH, D, B, dev = 32, 8, 128, 4, "cuda"
    q, k, v, r2t, rows = make_case([3000] * B, H, KVH, D, 16, torch.bfloat16, dev, B)
    seq_lens, out = i32([1, 10, 100, 1000], dev), torch.empty_like(q)
    ws = tk.alloc_decode_workspace(B, H, 16, D, dev)
    run = lambda: tk.decode_attention(q, k, v, out, r2t, rows, seq_lens, D ** -0.5, workspace=ws)  # noqa: E731
    run()                                                   # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for lens in ([1, 10, 100, 1000], [3000, 2999, 64, 65]):
        seq_lens.copy_(i32(lens, dev))
        r2t.copy_(r2t.roll(1, dims=0))                      # rows now point at other slots
        out.zero_()
        graph.replay()
        ref = reference(q, k, v, r2t, rows, [n - 1 for n in lens], [1] * B)
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------ GPU: whole runner

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("page", [1, 16])
def test_runner_triton_equals_torch_fp32(tiny_model_dir, page):
    from helpers import make_runner, random_prompts
    from stage2_runner.batch_generate import batch_generate
    path, _, cfg = tiny_model_dir
    cases = [(random_prompts(cfg.vocab_size, [1, 5, 17, 40, 90], seed=31), None),
             (random_prompts(cfg.vocab_size, [17, 33, 40, 90], seed=32), 16)]   # prefix > 0 extend
    for prompts, split in cases:
        runs = {}
        for name in ("torch", "triton"):
            runner = make_runner(path, attention_backend=name, device="cuda", dtype="float32", page_size=page)
            runs[name] = batch_generate(runner, prompts, 24, split_prefill_at=split, return_logits=True)
        (ref_out, ref_logits), (out, logits) = runs["torch"], runs["triton"]
        assert out == ref_out
        torch.testing.assert_close(torch.stack(logits), torch.stack(ref_logits), atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
@needs_cuda
def test_runner_triton_close_to_torch_bf16(tiny_model_dir):
    from helpers import make_runner, random_prompts
    from stage2_runner.batch_generate import batch_generate
    path, _, cfg = tiny_model_dir
    prompts = random_prompts(cfg.vocab_size, [3, 20, 64, 130], seed=32)
    logits = {}
    for name in ("torch", "triton"):
        runner = make_runner(path, attention_backend=name, device="cuda", dtype="bfloat16", page_size=16)
        _, steps = batch_generate(runner, prompts, 1, return_logits=True)   # prefill logits only
        logits[name] = steps[0].float()
    cos = torch.nn.functional.cosine_similarity(logits["triton"], logits["torch"], dim=-1)
    assert cos.min() > 0.999, cos
