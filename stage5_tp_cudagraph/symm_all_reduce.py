"""A low-latency all-reduce for small tensors, fused with the residual add + RMSNorm after it.

    ar = SymmAllReduce.try_create(group, device, all_ok)   # None on CPU, or where any rank failed
    y = ar(x) if ar and ar.fits(x) else nccl_all_reduce(x)
    out, residual = ar.add_rmsnorm(x, residual, w, eps)     # residual += sum(x); out = RMSNorm(residual)

Why: at batch 1 a Qwen3-8B decode step at TP=2 does 73 all-reduces of 8 KB each. NCCL's
ring is built for bandwidth; for 8 KB its cost is the launch and the cross-GPU round trips
(~8.5 us each inside a CUDA graph, ~0.6 ms of a 3.7 ms step). Every row-parallel output in
Qwen3 is followed by "residual += x; h = RMSNorm(residual)", so one kernel does all of it.
Each rank owns a buffer that every rank can write (symmetric memory: each GPU's buffer is
mapped into the others' address space over NVLink), with one slot per source rank:

  1. each program (one token row) writes its row straight into every peer's slot for it;
  2. it waits until the peers' rows have arrived in its own buffer. No flags: an empty
     slot holds a sentinel bit pattern (-0.0) in every element, and senders never send
     -0.0 (they send +0.0, the same number), so "no element is the sentinel" means "the
     row is there", element by element, with no fence or second message (TensorRT-LLM's
     "Lamport" all-reduce works this way);
  3. it sums the N rows in rank order in float32 (bit-equal on every rank), puts the
     sentinel back into the slots it read, then adds the residual and normalises, as
     fused_kernels.rmsnorm does.

Calls alternate between two halves of the buffer. A peer can only write call e + 2 into the
half of call e after it received this rank's row of call e + 1, which this rank sends only
after it has read and reset call e's slots: so a slot is never overwritten before it is
read. Which half is next lives on the GPU (the last program of a call flips it), so a CUDA
graph replays the kernel as it is. Each dtype size (16/32 bit) has its own region, so a
slot always holds the sentinel of the width it is read with. The programs of one call
(its rows) never wait for each other, only for the same row on the peers.

A wait has no natural end if a peer died or the ranks' call sequences diverged, so on GPUs
a wait over WATCHDOG_NS traps: the kernel fails and the rank goes down like a dead one,
where NCCL's watchdog would do the same. Only small tensors (<= MAX_BYTES in all):
prefill and large batches go to NCCL. If the set-up or its probe fails on any rank, every
rank stays on NCCL.
"""
from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from stage5_tp_cudagraph.fused_kernels import norm_row, num_warps_for

log = logging.getLogger(__name__)
MAX_BYTES = 512 * 1024          # per call and source rank: decode up to batch 64 for Qwen3-8B
REGION_BYTES = 2 * MAX_BYTES    # per source rank and dtype size: two halves (calls alternate)
MAX_COLS = 16384                # one row is one program's block
SENTINEL = {2: -32768, 4: -2147483648}    # -0.0 of a 16- and a 32-bit float, as signed ints
WATCHDOG_NS = tl.constexpr(300 * 10**9)   # GPUs: a wait longer than this traps (a dead or diverged peer)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _now_ns():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _trap():
    """End the kernel with an error: the process fails like a rank that died."""
    tl.inline_asm_elementwise("trap; mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _one_shot_kernel(X, stride_x, Res, stride_r, W, Out, stride_o, Buf, Deltas, State, N, cap, eps,
                     RANK: tl.constexpr, WORLD: tl.constexpr, SENTINEL: tl.constexpr,
                     ADD_NORM: tl.constexpr, BLOCK: tl.constexpr, WATCHDOG: tl.constexpr,
                     COUNTER_SEM: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    dtype = X.dtype.element_ty
    bits_t = Buf.dtype.element_ty                                # its bits: int16 for bf16
    parity = tl.load(State)                                      # this call's half (0 or 1), equal on all ranks
    half = parity.to(tl.int64) * WORLD                           # its first slot
    bits = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(bits_t, bitcast=True)
    bits = tl.where(bits == SENTINEL, 0, bits)                   # -0.0 -> +0.0: the sentinel is never sent
    x = bits.to(dtype, bitcast=True)
    for r in tl.static_range(WORLD):                             # my row into slot RANK of every peer
        if r != RANK:
            peer = Buf + tl.multiple_of(tl.load(Deltas + r), 16)            # its buffer, 16-aligned
            tl.store(peer + (half + RANK) * cap + row * N + offs, bits, mask=mask)

    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for r in tl.static_range(WORLD):                             # rank order: bit-equal on every rank
        if r == RANK:
            acc += x.to(tl.float32)
        else:
            slot = Buf + (half + r) * cap + row * N + offs
            got = tl.load(slot, mask=mask, other=0, volatile=True)
            if WATCHDOG:
                start = _now_ns()
            while tl.max((got == SENTINEL).to(tl.int32), 0) > 0:    # spin until all of rank r's row is in
                got = tl.load(slot, mask=mask, other=0, volatile=True)
                if WATCHDOG:                                     # a peer that never comes: fail, not hang
                    if _now_ns() - start > WATCHDOG_NS:
                        _trap()
            acc += got.to(dtype, bitcast=True).to(tl.float32)
            tl.store(slot, tl.full([BLOCK], SENTINEL, bits_t), mask=mask)   # empty again
    s = acc.to(dtype)                                            # rounded once, as a bf16 all-reduce result
    if ADD_NORM:
        res = Res + row * stride_r
        s = (s.to(tl.float32) + tl.load(res + offs, mask=mask, other=0.0).to(tl.float32)).to(dtype)
        tl.store(res + offs, s, mask=mask)
        norm_row(s, W, Out + row * stride_o, offs, mask, N, eps)
    else:
        tl.store(Out + row * stride_o + offs, s, mask=mask)

    # The last program of this call flips the half for the next launch. Every program has
    # used `parity` (its loads and stores depend on it) before it counts itself done, so the
    # counter needs no memory ordering ("relaxed": no fence waiting for the NVLink stores).
    if tl.num_programs(0) == 1:
        tl.store(State, 1 - parity)
    elif tl.atomic_add(State + 1, 1, sem=COUNTER_SEM, scope="gpu") == tl.num_programs(0) - 1:
        tl.store(State, 1 - parity)
        tl.store(State + 1, 0)


class SymmAllReduce:
    """buffer: this rank's symmetric buffer (uint8 [nbytes(world)]), filled by `fill_empty`
    before any rank's first call; bases: every rank's buffer address, in rank order."""
    set_up_in_this_process = False      # at most one rendezvous per process (see try_create)

    def __init__(self, buffer: torch.Tensor, bases: list[int], rank: int, world: int):
        self.buffer, self.rank, self.world = buffer, rank, world
        self.region = {2: buffer[: REGION_BYTES * world].view(torch.int16),     # bf16 / fp16 slots
                       4: buffer[REGION_BYTES * world:].view(torch.int32)}      # fp32 slots
        mine = bases[rank]
        # peer r's region = my region + deltas[r] elements (the same layout in every buffer)
        self.deltas = {size: torch.tensor([(b - mine) // size for b in bases], dtype=torch.int64,
                                          device=buffer.device) for size in (2, 4)}
        self.state = torch.zeros(2, dtype=torch.int32, device=buffer.device)   # next call's half, programs done
        self.num_warps: int | None = None       # None: fused_kernels.num_warps_for (bench_all_reduce tunes these)
        self.counter_sem = "relaxed"

    @staticmethod
    def nbytes(world: int) -> int:
        return 2 * REGION_BYTES * world

    @staticmethod
    def fill_empty(buffer: torch.Tensor, world: int) -> None:
        """Every slot of both regions to the sentinel (-0.0 in each element)."""
        buffer[: REGION_BYTES * world].view(torch.int16).fill_(SENTINEL[2])
        buffer[REGION_BYTES * world:].view(torch.int32).fill_(SENTINEL[4])

    @classmethod
    def try_create(cls, group, device: torch.device, all_ok) -> SymmAllReduce | None:
        """`all_ok(flag) -> bool`: True only if every rank passed True (a collective on the
        control group). Every rank must take the same path, or the first all-reduce hangs:
        so the ranks agree before the collective rendezvous, before the probe (its kernels
        wait for every rank) and after it."""
        if device.type != "cuda":
            return None                                  # the same on every rank
        world, name, error, buffer = group.size(), group.group_name, None, None
        # At most one set-up per process, agreed before anything is allocated: a second group
        # here (an Engine(tp=2) after a closed one) never finished its rendezvous on 2x H200,
        # probably because torch keeps per-process symmetric-memory state under the group's
        # name, which a new default group reuses. Then every rank uses NCCL for it.
        if not all_ok(not cls.set_up_in_this_process):
            log.warning("one-shot all-reduce: set up once per process already (here or on a peer); "
                        "NCCL for this group")
            return None
        try:
            from torch.distributed import _symmetric_memory as symm
            if hasattr(symm, "enable_symm_mem_for_group"):      # needed by older torch; deprecated later
                symm.enable_symm_mem_for_group(name)
            buffer = symm.empty(cls.nbytes(world), dtype=torch.uint8, device=device)
            cls.fill_empty(buffer, world)                       # empty before any peer can write
            torch.cuda.synchronize(device)
        except Exception as e:  # noqa: BLE001 - any failure: NCCL only, and say so
            error = e
        if all_ok(error is None):
            SymmAllReduce.set_up_in_this_process = True
            try:
                handle = symm.rendezvous(buffer, name)          # collective: every rank maps every buffer
                shift = buffer.data_ptr() - handle.buffer_ptrs[handle.rank]   # our tensor in its allocation
                bases = [p + shift for p in handle.buffer_ptrs]
                if any((b - bases[handle.rank]) % 64 for b in bases):        # the kernel's 16-element hint
                    raise RuntimeError(f"peer buffers not 64-byte aligned to each other: {bases}")
                ar = cls(buffer, bases, handle.rank, world)
            except Exception as e:  # noqa: BLE001
                error = e
            if all_ok(error is None) and all_ok(cls._probe(ar, device)):   # a probe waits for every rank
                return ar
        log.warning("one-shot all-reduce unavailable on some rank, using NCCL for all sizes%s",
                    f": {error}" if error else "")
        return None

    @staticmethod
    def _probe(ar: SymmAllReduce, device) -> bool:
        """Both kernel variants on known data: a sum (fp32) and an add + norm (bf16, a width
        that takes the vectorised path). False (and a log line) on a wrong result or an error."""
        try:
            total = ar(torch.ones(4, dtype=torch.float32, device=device))
            ones = torch.ones(2, 1024, dtype=torch.bfloat16, device=device)
            out, res = ar.add_rmsnorm(ones, torch.zeros_like(ones), torch.ones(1024, dtype=torch.bfloat16,
                                                                               device=device), 1e-6)
            good = bool(torch.all(total == ar.world) and torch.all(res == ar.world) and torch.all(out == 1))
            if not good:
                log.warning("one-shot all-reduce probe gave wrong sums: %s, %s", total.tolist(), res[0, :4].tolist())
            return good
        except Exception as e:  # noqa: BLE001
            log.warning("one-shot all-reduce probe failed: %s", e)
            return False

    def fits(self, x: torch.Tensor) -> bool:
        nbytes, cols = x.numel() * x.element_size(), x.shape[-1] if x.dim() else 1
        return x.dtype in DTYPES and 0 < nbytes <= MAX_BYTES and cols <= MAX_COLS and x.stride(-1) == 1

    def _launch(self, x, res, w, out, eps: float, add_norm: bool) -> None:
        T, N = x.shape
        size, BLOCK = x.element_size(), triton.next_power_of_2(N)
        _one_shot_kernel[(T,)](x, x.stride(0), res, res.stride(0), w, out, out.stride(0), self.region[size],
                               self.deltas[size], self.state, N, MAX_BYTES // size, eps,
                               RANK=self.rank, WORLD=self.world, SENTINEL=SENTINEL[size], ADD_NORM=add_norm,
                               BLOCK=BLOCK, WATCHDOG=x.is_cuda, COUNTER_SEM=self.counter_sem,
                               num_warps=self.num_warps or num_warps_for(BLOCK))

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
