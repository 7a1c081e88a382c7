"""The one-shot all-reduce kernel (symm_all_reduce.py) on CPU, under Triton's interpreter.

Ranks are forked processes; their "symmetric" buffers are shared-memory tensors created
before the fork, so every rank sees every buffer at the same address, as GPUs do with
peer-mapped memory. Checks: sums and the fused add + RMSNorm equal the unfused reference
(sum of the inputs, then fused_kernels.rmsnorm) over consecutive calls of different shapes
(both halves of the buffer, rows of different widths), and the ranks agree bit for bit.
The GPU twin (real NVLink, CUDA graphs) is in test_tp_gpu.py.
"""
import multiprocessing as mp

import pytest
import torch

from stage5_tp_cudagraph import fused_kernels as fk
from stage5_tp_cudagraph.symm_all_reduce import SymmAllReduce

pytestmark = [pytest.mark.stage5,
              pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test; GPUs run test_tp_gpu.py")]
SHAPES = [(3, 48), (1, 16), (5, 8), (2, 48)]           # consecutive calls: rows x width


def inputs(world: int):
    g = torch.Generator().manual_seed(0)
    xs = [[torch.randn(T, N, generator=g) for _ in range(world)] for T, N in SHAPES]
    residuals = [torch.randn(T, N, generator=g) for T, N in SHAPES]
    weights = [torch.randn(N, generator=g) for _, N in SHAPES]
    return xs, residuals, weights


def rank_main(rank: int, world: int, buffers, results) -> None:
    ptrs = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64)
    ar = SymmAllReduce(ptrs, rank, world)
    xs, residuals, weights = inputs(world)
    for i, (x, res, w) in enumerate(zip(xs, residuals, weights)):
        results[rank][i][0].copy_(ar(x[rank]))
        out, new_res = ar.add_rmsnorm(x[rank], res.clone(), w, 1e-6)
        results[rank][i][1].copy_(out)
        results[rank][i][2].copy_(new_res)


@pytest.mark.parametrize("world", [2, 3])
def test_one_shot_sum_and_add_norm_match_reference(world):
    buffers = [torch.zeros(SymmAllReduce.nbytes(world), dtype=torch.uint8).share_memory_() for _ in range(world)]
    results = [[[torch.zeros(T, N).share_memory_() for _ in range(3)] for T, N in SHAPES] for _ in range(world)]
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=rank_main, args=(r, world, buffers, results)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    xs, residuals, weights = inputs(world)
    for i, (x, res, w) in enumerate(zip(xs, residuals, weights)):
        total = sum(x)
        want_out, want_res = fk.rmsnorm(total.clone(), w, 1e-6, res.clone())
        got_sum, got_out, got_res = results[0][i]
        torch.testing.assert_close(got_sum, total, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got_res, want_res, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-5)
        for r in range(1, world):                     # every rank: the same bits
            assert all(torch.equal(a, b) for a, b in zip(results[r][i], results[0][i])), (i, r)
