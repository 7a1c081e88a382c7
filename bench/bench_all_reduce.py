"""Latency of one small all-reduce + residual add + RMSNorm at TP=N: the one-shot kernel vs NCCL.

    python -m bench.bench_all_reduce --tp 2 --rows 1 8 64 --cols 4096
    python -m bench.bench_all_reduce --tp 2 --rows 1 --num_warps 4 8 16 --counter_sem relaxed acq_rel

What a decode step at TP=2 does 72 times (after each o_proj and down_proj): each rank holds
a partial sum x [rows, cols] (bf16); residual += sum over ranks; out = RMSNorm(residual).
Every rank captures one CUDA graph of --calls such calls back to back and replays it
--iters times; us per call = rank 0's replay time (CUDA events) / (iters * calls). Variants:
"nccl" (NCCL's all-reduce, then the add + norm kernel) and "one_shot" for each --num_warps
(0: the default choice) and --counter_sem (the memory order of the programs' done-counter).
Prints one JSON line per (rows, variant). Needs --tp GPUs.
"""
from __future__ import annotations

import json

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.common import graph_replay_ms, parser


def build_parser():
    ap, add = parser(__doc__)
    add("--tp", type=int, default=2)
    add("--rows", type=int, nargs="+", default=[1, 8, 64], help="tokens in the batch")
    add("--cols", type=int, default=4096, help="hidden size (Qwen3-8B: 4096)")
    add("--calls", type=int, default=72, help="all-reduces per graph (a Qwen3-8B step: 72)")
    add("--iters", type=int, default=200, help="graph replays timed")
    add("--num_warps", type=int, nargs="+", default=[0], help="one-shot kernel warps; 0 = default")
    add("--counter_sem", nargs="+", default=["relaxed"], choices=["relaxed", "acq_rel"])
    return ap


def variants(args):
    yield "nccl", None, None
    for warps in args.num_warps:
        for sem in args.counter_sem:
            yield "one_shot", warps, sem


def time_calls(tp, x, residual, weight, args) -> float:
    """us per call of the graph-replayed chain, on this rank."""
    def chain():
        for _ in range(args.calls):
            tp.all_reduce_add_rmsnorm(x, residual, weight, 1e-6)
    # start together: the first replay must not time the peer's lag
    ms = graph_replay_ms(chain, args.iters, before_timing=lambda: dist.barrier(group=tp.cpu_group))
    return ms * 1e3 / args.calls


def rank_main(rank: int, args, addr: str) -> None:
    from stage5_tp_cudagraph.parallel import destroy_tp, init_tp
    device = torch.device("cuda", rank)
    tp = init_tp(rank, args.tp, addr, device)
    one_shot = tp.small_all_reduce
    for rows in args.rows:
        gen = torch.Generator(device=device).manual_seed(rank)
        x = torch.randn(rows, args.cols, generator=gen, device=device).to(torch.bfloat16) * 1e-3
        residual = torch.zeros_like(x)
        weight = torch.ones(args.cols, dtype=torch.bfloat16, device=device)
        for name, warps, sem in variants(args):
            if name == "one_shot" and (one_shot is None or not one_shot.fits(x)):
                continue
            tp.small_all_reduce = one_shot if name == "one_shot" else None
            if one_shot is not None:
                one_shot.num_warps, one_shot.counter_sem = warps or None, sem or "relaxed"
            us = time_calls(tp, x, residual, weight, args)
            if rank == 0:
                print(json.dumps(dict(tp=args.tp, rows=rows, cols=args.cols, variant=name, num_warps=warps,
                                      counter_sem=sem, us_per_call=round(us, 3))), flush=True)
    tp.small_all_reduce = one_shot
    destroy_tp()


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    assert torch.cuda.device_count() >= args.tp, f"--tp {args.tp} needs {args.tp} GPUs"
    from stage5_tp_cudagraph.parallel import free_port
    mp.spawn(rank_main, args=(args, f"127.0.0.1:{free_port()}"), nprocs=args.tp)


if __name__ == "__main__":
    main()
