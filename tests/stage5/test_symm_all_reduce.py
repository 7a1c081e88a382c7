"""The one-shot all-reduce kernel (symm_all_reduce.py) on CPU, under Triton's interpreter.

Ranks are forked processes; their "symmetric" buffers are shared-memory tensors created
before the fork, so every rank sees every buffer at the same address, as GPUs do with
peer-mapped memory. Checks: sums and the fused add + RMSNorm equal the unfused reference
(sum of the inputs, then fused_kernels.rmsnorm) over consecutive calls of different shapes
and dtypes (both halves of the buffer, rows of different widths, fp32 and fp16 regions),
inputs holding -0.0 (the "empty" pattern) arrive, the ranks agree bit for bit, and at the
end the half counter is where it should be and every slot is empty again.
The GPU twin (real NVLink, CUDA graphs) is in test_tp_gpu.py.
"""
import multiprocessing as mp
import os
import subprocess
import sys

import pytest
import torch

from stage5_tp_cudagraph import fused_kernels as fk
from stage5_tp_cudagraph.symm_all_reduce import SymmAllReduce

pytestmark = [pytest.mark.stage5,
              pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test; GPUs run test_tp_gpu.py")]
F16, F32 = torch.float16, torch.float32         # (the interpreter mishandles bf16; fp16 shares its region)
CALLS = [(3, 48, F32), (1, 16, F16), (5, 8, F32), (2, 48, F16), (4, 16, F16)]   # rows x width, dtype
TOL = {F32: 1e-5, F16: 3e-3}


def inputs(world: int):
    g = torch.Generator().manual_seed(0)
    xs = [[torch.randn(T, N, generator=g).to(dt) for _ in range(world)] for T, N, dt in CALLS]
    for call in xs:
        for x in call:
            x[0, :2] = -0.0      # the sentinel's bits: must still arrive (as +0.0), not hang the peers
    residuals = [torch.randn(T, N, generator=g).to(dt) for T, N, dt in CALLS]
    weights = [torch.randn(N, generator=g).to(dt) for _, N, dt in CALLS]
    return xs, residuals, weights


def rank_main(rank: int, world: int, buffers, results, states) -> None:
    ar = SymmAllReduce(buffers[rank], [b.data_ptr() for b in buffers], rank, world)
    xs, residuals, weights = inputs(world)
    for i, (x, res, w) in enumerate(zip(xs, residuals, weights)):
        results[rank][i][0].copy_(ar(x[rank]))
        out, new_res = ar.add_rmsnorm(x[rank], res.clone(), w, 1e-6)
        results[rank][i][1].copy_(out)
        results[rank][i][2].copy_(new_res)
    ar(xs[0][rank])                               # an odd number of calls in all
    states[rank].copy_(ar.state)


@pytest.mark.parametrize("world", [2, 3])
def test_one_shot_sum_and_add_norm_match_reference(world):
    buffers = [torch.zeros(SymmAllReduce.nbytes(world), dtype=torch.uint8).share_memory_() for _ in range(world)]
    for b in buffers:
        SymmAllReduce.fill_empty(b, world)
    results = [[[torch.zeros(T, N, dtype=dt).share_memory_() for _ in range(3)] for T, N, dt in CALLS]
               for _ in range(world)]
    states = torch.full((world, 2), -1, dtype=torch.int32).share_memory_()
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=rank_main, args=(r, world, buffers, results, states)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    hung = [p.kill() or r for r, p in enumerate(procs) if p.is_alive()]
    assert not hung and all(p.exitcode == 0 for p in procs), (hung, [p.exitcode for p in procs])
    xs, residuals, weights = inputs(world)
    for i, (x, res, w) in enumerate(zip(xs, residuals, weights)):
        tol = TOL[x[0].dtype]
        total = sum(t.float() for t in x).to(x[0].dtype)              # one rounding, as the kernel
        want_out, want_res = fk.rmsnorm(total.clone(), w, 1e-6, res.clone())
        got_sum, got_out, got_res = results[0][i]
        torch.testing.assert_close(got_sum, total, rtol=tol, atol=tol)
        torch.testing.assert_close(got_res, want_res, rtol=tol, atol=tol)
        torch.testing.assert_close(got_out, want_out, rtol=tol, atol=tol)
        for r in range(1, world):                     # every rank: the same bits
            assert all(torch.equal(a, b) for a, b in zip(results[r][i], results[0][i])), (i, r)
    # 2 * len(CALLS) + 1 calls: the next half is 1, no program left counted; every slot empty again
    assert states.tolist() == [[1, 0]] * world
    for b in buffers:
        fresh = torch.empty_like(b)
        SymmAllReduce.fill_empty(fresh, world)
        assert torch.equal(b, fresh)


COMPILE = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from stage5_tp_cudagraph.symm_all_reduce import _one_shot_kernel
dtype, add_norm = sys.argv[1], sys.argv[2] == "1"
ptr = "*" + dtype
bits = "*i16" if dtype != "fp32" else "*i32"
sig = {"X": ptr, "stride_x": "i32", "Res": ptr, "stride_r": "i32", "W": ptr, "Out": ptr, "stride_o": "i32",
       "Buf": bits, "Deltas": "*i64", "State": "*i32", "N": "i32", "cap": "i32", "eps": "fp32",
       "RANK": "constexpr", "WORLD": "constexpr", "SENTINEL": "constexpr", "ADD_NORM": "constexpr",
       "BLOCK": "constexpr", "WATCHDOG": "constexpr", "COUNTER_SEM": "constexpr"}
sentinel = -32768 if dtype != "fp32" else -2147483648
# What a real launch compiles: pointers and ints divisible by 16 are specialised as such.
aligned = [i for i, (k, v) in enumerate(sig.items()) if v.startswith("*") or k in ("stride_x", "stride_r", "stride_o", "N", "cap")]
src = ASTSource(fn=_one_shot_kernel, signature=sig, attrs={(i,): [["tt.divisibility", 16]] for i in aligned},
                constexprs={"RANK": 1, "WORLD": 2, "SENTINEL": sentinel, "ADD_NORM": add_norm, "BLOCK": 4096,
                            "WATCHDOG": True, "COUNTER_SEM": "relaxed"})
print(triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 16}).asm["ptx"])
"""


@pytest.mark.parametrize("dtype,add_norm", [("bf16", True), ("fp32", False)])
def test_kernel_compiles_for_hopper(dtype, add_norm):
    """The interpreter skips Triton's GPU compiler; this runs it (to PTX for sm_90, no GPU
    needed, in a process without TRITON_INTERPRET), so a kernel the compiler rejects fails
    here, not first on the GPU (one did: a loop over a vector of flags)."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    run = subprocess.run([sys.executable, "-c", COMPILE, dtype, "1" if add_norm else "0"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ptx = run.stdout
    assert "ld.volatile.global.v4" in ptx and "st.global.v4" in ptx      # 16-byte polls and peer stores
    assert "%globaltimer" in ptx and "trap;" in ptx                      # the watchdog
    assert "fence" not in ptx and "membar" not in ptx                   # nothing waits on NVLink stores
    assert "atom.global.gpu.relaxed.add" in ptx or "atom.relaxed.gpu.global.add" in ptx, \
        [ln for ln in ptx.splitlines() if "atom" in ln]                   # no fence behind the counter


def test_second_set_up_in_a_process_falls_back_to_nccl_on_every_rank(monkeypatch, caplog):
    """A second group in one process (an Engine(tp=2) after a closed one) must not try the
    symmetric-memory rendezvous again (it hung on GPUs): this rank votes "no" in the first
    collective of the set-up, before anything is allocated, so every rank agrees on NCCL."""
    votes = []

    class Group:
        group_name = "0"

        def size(self):
            return 2
    monkeypatch.setattr(SymmAllReduce, "set_up_in_this_process", True)
    ar = SymmAllReduce.try_create(Group(), torch.device("cuda", 0), lambda ok: votes.append(ok) or False)
    assert ar is None and votes == [False]
    assert "once per process" in caplog.text
    # A fresh rank whose peer voted no stops at the same first vote (a second vote would
    # mean it went on to allocate and rendezvous).
    monkeypatch.setattr(SymmAllReduce, "set_up_in_this_process", False)
    votes.clear()
    assert SymmAllReduce.try_create(Group(), torch.device("cuda", 0), lambda ok: votes.append(ok) or False) is None
    assert votes == [True]
