"""Stage 2: the `fa` backend (FlashAttention varlen over K/V gathered from the paged pool)
against the `torch` reference backend, extend and decode, on shuffled paged layouts.

CPU (stage2): the packing logic alone, with the FA call swapped for a plain causal
varlen reference (FA itself needs CUDA). GPU (gpu): the real FA at Qwen3 shapes, bf16."""
import pytest
import torch

from stage1_model.generate import causal_attention
from stage2_runner.attention import FlashBackend, TorchBackend
from stage2_runner.forward_batch import make_batch
from stage2_runner.kv_cache import KVPool

pytestmark = pytest.mark.stage2
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the H200 via device)")


def paged_case(prefix_lens, extend_lens, heads, kv_heads, head_dim, page, dtype, device, seed=0):
    """A pool with random K/V, requests on shuffled rows and shuffled pages, and q [T, H, D]."""
    g = torch.Generator().manual_seed(seed)
    seqs = [p + e for p, e in zip(prefix_lens, extend_lens)]
    pool = KVPool(1, sum(-(-n // page) * page for n in seqs) + 4 * page, kv_heads, head_dim, dtype, device,
                  page, len(seqs) + 3, max(seqs) + 1)
    pool.allocator._free_pages = torch.randperm(pool.allocator.num_pages, generator=g).tolist()   # shuffle
    for buf in (pool.k_buffers[0], pool.v_buffers[0]):
        buf.copy_(torch.randn(buf.shape, generator=g).to(dtype))
    rows, locs = [], []
    for n, p in zip(seqs, prefix_lens):
        row = pool.free_rows.pop(int(torch.randint(len(pool.free_rows), (1,), generator=g)))
        slots = pool.allocator.alloc_extend(0, -1, n)
        pool.req_to_token[row, :n] = slots.to(device, torch.int32)
        rows.append(row)
        locs.append(slots[p:])
    batch = make_batch(rows, prefix_lens, [[0] * e for e in extend_lens], torch.cat(locs), device)
    q = torch.randn(sum(extend_lens), heads, head_dim, generator=g).to(device=device, dtype=dtype)
    return pool, batch, q


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """Causal, bottom-right aligned, per request: what FA's varlen call computes."""
    out = []
    for i in range(len(cu_q) - 1):
        qi, ki, vi = q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]]
        out.append(causal_attention(qi, ki, vi).view(qi.shape))    # [t_i, H, D]
    return torch.cat(out)


def compare(prefix_lens, extend_lens, heads, kv_heads, head_dim, page, dtype, device, fa_fn=None, tol=1e-5):
    pool, batch, q = paged_case(prefix_lens, extend_lens, heads, kv_heads, head_dim, page, dtype, device)
    ref = TorchBackend(pool, heads, kv_heads, head_dim).attend(q, 0, batch)
    if fa_fn is None:
        fa = FlashBackend(pool, heads, kv_heads, head_dim)
    else:                                           # CPU: bypass the CUDA check, keep attend()
        fa = FlashBackend.__new__(FlashBackend)
        TorchBackend.__init__(fa, pool, heads, kv_heads, head_dim)
        fa.fn = fa_fn
    got = fa.attend(q, 0, batch)
    torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("page", [1, 4])
def test_fa_packing_cpu(page):
    compare([0, 5, 30], [7, 1, 12], 4, 2, 16, page, torch.float32, "cpu", fa_fn=reference_varlen)   # extend
    compare([9, 0, 40], [1, 1, 1], 4, 2, 16, page, torch.float32, "cpu", fa_fn=reference_varlen)    # decode


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("page", [1, 16])
@pytest.mark.parametrize("heads", [(16, 8), (32, 8), (64, 8)], ids=lambda h: f"{h[0]}q{h[1]}kv")
def test_fa_vs_torch_gpu(heads, page):
    h, kvh = heads
    compare([0, 100, 1000, 3000], [64, 65, 300, 1024], h, kvh, 128, page, torch.bfloat16, "cuda", tol=2e-2)
    compare([0, 63, 2047, 8191], [1, 1, 1, 1], h, kvh, 128, page, torch.bfloat16, "cuda", tol=2e-2)
