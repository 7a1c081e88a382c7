"""Run a function on N tensor-parallel ranks (CPU, gloo), one spawned process per rank.

    results = run_ranks(2, fn, *args)    # fn(tp: TPState, *args) -> picklable, per rank
    run_ranks(2, fn, *args, device="cuda")      # rank r on cuda:r, NCCL

`fn` must be a module-level function of an importable module (spawned children import it);
its result travels through torch.save, so tensors, lists and numbers are all fine.
Every child is joined or killed before this returns or raises: no orphans, no hang.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import queue
import traceback

import torch

from stage5_tp_cudagraph.parallel import destroy_tp, free_port, init_tp


def _rank_main(rank: int, size: int, addr: str, fn, args, out, device: str) -> None:
    torch.set_num_threads(1)
    try:
        tp = init_tp(rank, size, addr, torch.device(device, rank) if device == "cuda" else torch.device(device),
                     timeout_s=60)
        result = fn(tp, *args)
        destroy_tp()
        buf = io.BytesIO()        # bytes, not tensors: a queued tensor is shared memory that dies with us
        torch.save(result, buf)
        out.put((rank, None, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - report any failure to the parent
        out.put((rank, traceback.format_exc(), None))


def run_ranks(size: int, fn, *args, timeout: float = 120, device: str = "cpu") -> list:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    addr = f"127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_rank_main, args=(r, size, addr, fn, args, out, device), daemon=True)
             for r in range(size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    try:
        while len(results) < size:
            try:
                rank, err, value = out.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"TP ranks gave no answer in {timeout} s "
                                     f"(alive: {[p.is_alive() for p in procs]})") from None
            if err:
                raise AssertionError(f"rank {rank} failed:\n{err}")
            results[rank] = torch.load(io.BytesIO(value))
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(size)]
