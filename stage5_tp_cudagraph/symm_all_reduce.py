"""A low-latency all-reduce for small tensors, fused with the residual add + RMSNorm after it.

    ar = SymmAllReduce.try_create(group, device, all_ok)   # None on CPU, or where any rank failed
    y = ar(x) if ar and ar.fits(x) else nccl_all_reduce(x)
    out, residual = ar.add_rmsnorm(x, residual, w, eps)     # residual += sum(x); out = RMSNorm(residual)

Why: at batch 1 a Qwen3-8B decode step at TP=2 does 73 all-reduces of 8 KB each. NCCL's
ring is built for bandwidth; for 8 KB its cost is the launch and the cross-GPU round trip
(~8.5 us each inside a CUDA graph, ~0.6 ms of a 3.7 ms step). Every row-parallel output in
Qwen3 is followed by "residual += x; h = RMSNorm(residual)", so one kernel does all of it:

  1. each program (one token row) stores its row of the partial sum into this rank's slot
     of a buffer every rank can read (symmetric memory: each GPU's buffer is mapped into
     the others' address space over NVLink);
  2. it raises a flag in every rank's flag array ("row r of call e is there"), with release
     semantics so the data is visible before the flag, and waits for all ranks' flags;
  3. it reads the N rows (its own from registers) and sums them in rank order in float32,
     so every rank gets bit-equal sums; then adds the residual and normalises, as
     fused_kernels.rmsnorm does.

No second barrier: calls alternate between two halves of the buffer, and a rank can only
start call e + 2 (which overwrites call e's half) after every rank raised its flag for call
e + 1, i.e. after every rank finished reading call e. Flags hold the call number, which only
grows, so they never need resetting. The call number lives on the GPU (the last program of
a call moves it on), so a CUDA graph replays the kernel as it is.

Only small payloads (each rank reads N rows): prefill and large batches go to NCCL. If the
symmetric-memory set-up fails on any rank, every rank stays on NCCL.
"""
from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from stage5_tp_cudagraph.fused_kernels import norm_row, num_warps_for

log = logging.getLogger(__name__)
MAX_BYTES = 512 * 1024          # per call (one half of the buffer): decode up to batch 64 for Qwen3-8B
MAX_ROWS = 1024                 # rows per call (the flag array's size)
MAX_COLS = 16384                # one row is one program's block
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _one_shot_kernel(X, stride_x, Res, stride_r, W, Out, stride_o, Bufs, Flags, State, N, half, eps,
                     RANK: tl.constexpr, WORLD: tl.constexpr, ADD_NORM: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    dtype = X.dtype.element_ty
    epoch = tl.load(State) + 1                              # this call's number, equal on all ranks
    slot = (epoch % 2).to(tl.int64) * half + row.to(tl.int64) * N      # element offset in a rank's buffer
    x = tl.load(X + row.to(tl.int64) * stride_x + offs, mask=mask, other=0.0)
    tl.store(tl.load(Bufs + RANK).to(tl.pointer_type(dtype)) + slot + offs, x, mask=mask)
    tl.debug_barrier()                                      # all threads' stores precede the flags

    for r in tl.static_range(WORLD):                        # "my row of call `epoch` is there"
        flags = tl.load(Flags + r).to(tl.pointer_type(tl.int32))
        tl.atomic_xchg(flags + row * WORLD + RANK, epoch, sem="release", scope="sys")
    mine = tl.load(Flags + RANK).to(tl.pointer_type(tl.int32)) + row * WORLD
    for r in tl.static_range(WORLD):                        # spin until every rank's row is there
        while tl.atomic_add(mine + r, 0, sem="acquire", scope="sys") < epoch:
            pass
    tl.debug_barrier()                                      # ... for every thread of the program

    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for r in tl.static_range(WORLD):                        # rank order: bit-equal on every rank
        if r == RANK:
            acc += x.to(tl.float32)
        else:
            peer = tl.load(Bufs + r).to(tl.pointer_type(dtype))
            acc += tl.load(peer + slot + offs, mask=mask, other=0.0, volatile=True).to(tl.float32)
    s = acc.to(dtype)                                       # rounded once, as a bf16 all-reduce result
    if ADD_NORM:
        res = Res + row.to(tl.int64) * stride_r
        s = (s.to(tl.float32) + tl.load(res + offs, mask=mask, other=0.0).to(tl.float32)).to(dtype)
        tl.store(res + offs, s, mask=mask)
        norm_row(s, W, Out + row.to(tl.int64) * stride_o, offs, mask, N, eps)
    else:
        tl.store(Out + row.to(tl.int64) * stride_o + offs, s, mask=mask)

    # The last program of this call moves the call number on for the next launch.
    if tl.atomic_add(State + 1, 1, sem="acq_rel", scope="gpu") == tl.num_programs(0) - 1:
        tl.store(State, epoch)
        tl.store(State + 1, 0)


class SymmAllReduce:
    """bufs: int64 [world] device tensor, rank r's buffer address (2 * MAX_BYTES of data,
    then MAX_ROWS * world int32 flags, zeroed before any rank's first call)."""

    def __init__(self, bufs: torch.Tensor, rank: int, world: int):
        self.bufs, self.rank, self.world = bufs, rank, world
        self.flags = bufs + 2 * MAX_BYTES                                # int64 [world] addresses
        self.state = torch.zeros(2, dtype=torch.int32, device=bufs.device)   # call number, programs done

    @staticmethod
    def nbytes(world: int) -> int:
        return 2 * MAX_BYTES + MAX_ROWS * world * 4

    @classmethod
    def try_create(cls, group, device: torch.device, all_ok) -> SymmAllReduce | None:
        """`all_ok(flag) -> bool`: True only if every rank passed True (a collective on the
        control group). Every rank must take the same path, or the first all-reduce hangs:
        so the ranks agree before the collective rendezvous and again after the probe."""
        if device.type != "cuda":
            return None                                  # the same on every rank
        world, name, error, buffer = group.size(), group.group_name, None, None
        try:
            from torch.distributed import _symmetric_memory as symm
            if hasattr(symm, "enable_symm_mem_for_group"):      # needed by older torch, harmless after
                symm.enable_symm_mem_for_group(name)
            buffer = symm.empty(cls.nbytes(world), dtype=torch.uint8, device=device)
            buffer.zero_()                                      # flags at 0 before any peer can signal
            torch.cuda.synchronize(device)
        except Exception as e:  # noqa: BLE001 - any failure: NCCL only, and say so
            error = e
        if all_ok(error is None):
            try:
                handle = symm.rendezvous(buffer, name)          # collective: every rank maps every buffer
                shift = buffer.data_ptr() - handle.buffer_ptrs[handle.rank]   # our tensor in its allocation
                bufs = torch.tensor([p + shift for p in handle.buffer_ptrs], dtype=torch.int64, device=device)
                ar = cls(bufs, handle.rank, world)
                ar.keep = buffer                                # the mapping lives as long as we do
                probe = ar(torch.ones(4, dtype=torch.float32, device=device))
                if not torch.all(probe == float(world)):
                    raise RuntimeError(f"probe sum {probe.tolist()} != {world}")
            except Exception as e:  # noqa: BLE001
                error = e
            if all_ok(error is None):
                return ar
        log.warning("one-shot all-reduce unavailable on some rank, using NCCL for all sizes%s",
                    f": {error}" if error else "")
        return None

    def fits(self, x: torch.Tensor) -> bool:
        nbytes, cols = x.numel() * x.element_size(), x.shape[-1] if x.dim() else 1
        return (x.dtype in DTYPES and 0 < nbytes <= MAX_BYTES and cols <= MAX_COLS
                and x.numel() // cols <= MAX_ROWS and x.stride(-1) == 1)

    def _launch(self, x, res, w, out, eps: float, add_norm: bool) -> None:
        T, N = x.shape
        BLOCK = triton.next_power_of_2(N)
        _one_shot_kernel[(T,)](x, x.stride(0), res, res.stride(0), w, out, out.stride(0), self.bufs,
                               self.flags, self.state, N, MAX_BYTES // x.element_size(), eps,
                               RANK=self.rank, WORLD=self.world, ADD_NORM=add_norm, BLOCK=BLOCK, num_warps=num_warps_for(BLOCK))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over ranks, as a new tensor of x's shape (x is left as it was)."""
        rows = x.reshape(-1, x.shape[-1] if x.dim() else 1)
        out = torch.empty_like(rows)
        self._launch(rows, rows, rows, out, 0.0, add_norm=False)     # res / w: unused placeholders
        return out.view(x.shape)

    def add_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
        """x [T, N]: this rank's partial sum. residual <- residual + sum over ranks of x (in
        place); returns (RMSNorm(residual) * weight, residual), as fused_kernels.rmsnorm."""
        assert x.dim() == 2 and residual.shape == x.shape and residual.stride(-1) == 1
        out = torch.empty_like(x)
        self._launch(x, residual, weight, out, eps, add_norm=True)
        return out, residual
