"""Batch-1 projections: the Triton GEMV (stage5_tp_cudagraph/gemv.py) vs cuBLAS, side by side.

    python -m bench.bench_gemv                       (GPU only; Qwen3-0.6B, 8B and 8B TP=2 shapes)
    python -m bench.bench_gemv --shapes 4096x1024 1024x2048 --layers 28

Each shape is one projection's weight [N, K] (bf16) times one token. A CUDA graph holds
--layers launches over --layers different weights (as a decode step walks the layers, so
the weights are not in L2), replayed --iters times; us per launch from CUDA events.
TB/s = weight bytes / time, beside the ~4.3 TB/s of the H200's memory.
"""
from __future__ import annotations

import json

import torch

from bench.common import graph_replay_ms, parser

SHAPES = {  # name: (N, K) of the weight
    "0.6b qkv": (4096, 1024), "0.6b o": (1024, 2048), "0.6b gate_up": (6144, 1024), "0.6b down": (1024, 3072),
    "8b qkv": (6144, 4096), "8b o": (4096, 4096), "8b gate_up": (24576, 4096), "8b down": (4096, 12288),
    "8b tp2 qkv": (3072, 4096), "8b tp2 o": (4096, 2048), "8b tp2 gate_up": (12288, 4096), "8b tp2 down": (4096, 6144),
}


def build_parser():
    ap, add = parser(__doc__)
    add("--shapes", nargs="+", default=None, help="NxK weights (default: the Qwen3 shapes above)")
    add("--layers", type=int, default=36, help="distinct weights per graph")
    add("--iters", type=int, default=100)
    return ap


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    assert torch.cuda.is_available(), "bench_gemv needs a CUDA GPU"
    from stage5_tp_cudagraph.gemv import gemv
    shapes = {s: tuple(map(int, s.split("x"))) for s in args.shapes} if args.shapes else SHAPES
    for name, (N, K) in shapes.items():
        weights = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(args.layers)]
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(1, N, device="cuda", dtype=torch.bfloat16)
        per_launch = 1e3 / args.layers                  # ms per graph -> us per launch
        cublas = graph_replay_ms(lambda: [torch.matmul(x, w.t(), out=out) for w in weights], args.iters) * per_launch
        triton_us = graph_replay_ms(lambda: [gemv(x, w) for w in weights], args.iters) * per_launch
        mb = N * K * 2 / 1e6
        print(json.dumps(dict(shape=name, N=N, K=K, weight_mb=round(mb, 1), cublas_us=round(cublas, 2),
                              triton_us=round(triton_us, 2), cublas_tb_s=round(mb / cublas, 2),
                              triton_tb_s=round(mb / triton_us, 2), speedup=round(cublas / triton_us, 3))), flush=True)
        weights.clear()                                 # free before the next shape


if __name__ == "__main__":
    main()
