"""Tensor-parallel process groups: which rank am I, and the few collectives TP needs.

    tp = init_tp(rank, size, "HOST:PORT", device, timeout_s)   # every rank calls it; blocks until all joined
    get_tp() -> TPState | None        None: one process, nothing is parallel
    tp.all_reduce(x)                  sum over ranks (row-parallel outputs, embeddings); use the result
    tp.all_reduce_add_rmsnorm(x, residual, w, eps)   residual += sum(x); RMSNorm of it (one kernel on GPUs)
    tp.all_gather(x)                  [N, local] on each rank -> [N, size * local], in rank order
    tp.broadcast(x)                   rank 0's tensor to everyone (the sampled ids)
    tp.min_int(n), tp.gather_ints(v), tp.broadcast_bytes(b)     control plane, on the CPU group
    destroy_tp()                      at shutdown, after the CUDA graphs are dropped

Two groups. The *device* group (NCCL on GPUs, gloo on CPU) carries activations inside the
forward, so CUDA graphs can capture its all-reduces. The *CPU* group (always gloo) carries
the control plane: rank 0's commands for each step, the KV pool size, statistics. Its
timeout is effectively infinite, because a follower rank may wait hours for the next
request; a crashed peer is still noticed at once (its TCP connections close).

Joining uses torch.distributed's `tcp://HOST:PORT` rendezvous (rank 0 listens there), as
SGLang's `--dist_init_addr`. A rank that never shows up makes the others fail after
`timeout_s` with a `TPJoinError` that says who waited for what, instead of hanging.
"""
from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from stage5_tp_cudagraph import fused_kernels as fk
from stage5_tp_cudagraph.symm_all_reduce import SymmAllReduce

log = logging.getLogger(__name__)
CONTROL_TIMEOUT = timedelta(days=3650)      # followers idle as long as the server does
_STATE: "TPState | None" = None
# all_gather_into_tensor was renamed all_gather_single (torch 2.13); same contract.
_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class TPJoinError(RuntimeError):
    """Some rank did not join the process group in time (or the address is wrong)."""


@dataclass
class TPState:
    rank: int
    size: int
    device: torch.device
    device_group: object            # NCCL (cuda) or gloo (cpu)
    cpu_group: object               # gloo, for host-side control messages
    small_all_reduce: SymmAllReduce | None = None     # GPUs: one-shot for small tensors

    # ---- activations (device group) ---------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.small_all_reduce is not None and self.small_all_reduce.fits(x):
            return self.small_all_reduce(x)
        dist.all_reduce(x, group=self.device_group)
        return x

    def all_reduce_add_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
        """x [T, N]: this rank's partial sum (a row-parallel output). residual += sum over
        ranks of x, in place; returns (RMSNorm(residual) * weight, residual). Small x: one
        kernel (symm_all_reduce.py); otherwise NCCL, then the fused add + norm."""
        if self.small_all_reduce is not None and self.small_all_reduce.fits(x):
            return self.small_all_reduce.add_rmsnorm(x, residual, weight, eps)
        return fk.rmsnorm(self.all_reduce(x), weight, eps, residual)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[N, local] per rank -> [N, size * local]: rank r's columns come r-th."""
        N, local = x.shape
        out = torch.empty(self.size * N, local, dtype=x.dtype, device=x.device)   # ranks stacked on dim 0
        _gather_into(out, x.contiguous(), group=self.device_group)
        return out.view(self.size, N, local).permute(1, 0, 2).reshape(N, self.size * local)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        dist.broadcast(x, src=0, group=self.device_group)
        return x

    # ---- control plane (CPU group) ----------------------------------------------
    def min_int(self, n: int) -> int:
        t = torch.tensor([n], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t)

    def gather_ints(self, values: list[int]) -> list[list[int]]:
        """Every rank's list of ints (same length everywhere), in rank order, on every rank."""
        t = torch.tensor(values, dtype=torch.int64)
        out = torch.empty(self.size * len(values), dtype=torch.int64)
        _gather_into(out, t, group=self.cpu_group)
        return out.view(self.size, len(values)).tolist()

    def broadcast_bytes(self, data: bytes | None = None) -> bytes:
        """Rank 0 passes `data`, the others None; every rank returns rank 0's bytes.
        Plain bytes (the caller decodes JSON), never pickle: nothing is executed on receipt."""
        n = torch.tensor([len(data) if self.rank == 0 else 0], dtype=torch.int64)
        dist.broadcast(n, src=0, group=self.cpu_group)
        buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.rank == 0
               else torch.empty(int(n), dtype=torch.uint8))
        if len(buf):
            dist.broadcast(buf, src=0, group=self.cpu_group)
        return buf.numpy().tobytes()


def get_tp() -> TPState | None:
    return _STATE


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_tp(rank: int, size: int, init_addr: str, device: torch.device, timeout_s: float = 600,
            custom_all_reduce: bool = True) -> TPState:
    """Join the group of `size` ranks that meet at `init_addr` ("HOST:PORT", rank 0 listens).
    `custom_all_reduce`: on GPUs, small all-reduces take the one-shot path (symm_all_reduce.py)."""
    global _STATE
    if _STATE is not None:
        raise RuntimeError("tensor parallelism is already initialised in this process")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend, init_method=f"tcp://{init_addr}", rank=rank, world_size=size,
                                timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, dist.DistError) as e:      # DistStoreError / DistNetworkError: timeouts
        raise TPJoinError(f"TP rank {rank}/{size}: the {size} ranks did not all join at tcp://{init_addr} "
                          f"within {timeout_s:.0f} s (is every node started, with the same --dist_init_addr "
                          f"and --nnodes?): {str(e).splitlines()[0]}") from None
    # A second group even on CPU: the device group keeps the join timeout for stuck collectives.
    cpu_group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    _STATE = state = TPState(rank, size, device, dist.group.WORLD, cpu_group)
    if custom_all_reduce:                 # every rank's "set up fine?" ANDed over the control group
        state.small_all_reduce = SymmAllReduce.try_create(dist.group.WORLD, device,
                                                          lambda ok: state.min_int(int(ok)) == 1)
    log.info("TP rank %d of %d joined at %s (%s%s)", rank, size, init_addr, backend,
             ", one-shot all-reduce for small tensors" if state.small_all_reduce else "")
    return _STATE


def destroy_tp() -> None:
    """Leave the group. CUDA graphs that captured its collectives must be gone already."""
    global _STATE
    if _STATE is None:
        return
    _STATE = None
    if dist.is_initialized():
        dist.destroy_process_group()
