"""Shared-prefix throughput: the same workload with the radix cache on and off, in one run.

    python -m bench.bench_prefix --model demo --device cpu --shared_prefix 2 64 16 --group_size 4 \
        --prefix_output_len 8
    python -m bench.bench_offline --model configs/qwen3-0.6b --load_format dummy --shared_prefix 32 2048 128

Workload (SGLang's "generated shared prefix" shape): N_GROUPS random system prompts of
PREFIX_LEN tokens; each is followed by --group_size different random questions of Q_LEN
tokens; every prompt generates --prefix_output_len tokens (greedy, ignore_eos). Prompts
are submitted group after group. Reported for both runs: output and total (prompt +
output) tokens/s, and the hit rate = cached_tokens / prompt_tokens summed over requests,
which is what each request's meta_info reports. Flags are bench/bench_offline.py's.
"""
from __future__ import annotations

import json
import random

from bench.bench_offline import build_parser, free_memory, make_engine, random_ids, run_engine


def prefix_workload(args, vocab: int) -> tuple[list[list[int]], list[int]]:
    groups, prefix_len, q_len = args.shared_prefix
    rng = random.Random(args.seed)
    prompts = []
    for _ in range(groups):
        system = random_ids(rng, prefix_len, vocab)
        prompts += [system + random_ids(rng, q_len, vocab) for _ in range(args.group_size)]
    return prompts, [args.prefix_output_len] * len(prompts)


def run_one(args, disable: bool) -> tuple[str, dict]:
    eng, name = make_engine(args, disable_radix_cache=disable)
    prompts, out_lens = prefix_workload(args, eng.runner.config.vocab_size)
    label = "radix cache off" if disable else "radix cache on"
    res = run_engine(eng, prompts, out_lens, f"{name} {label}")
    del eng
    free_memory()
    return name, res


def run_prefix_bench(args) -> None:
    groups, prefix_len, q_len = args.shared_prefix
    rows = []
    for disable in (False, True):
        name, r = run_one(args, disable)
        rows.append(dict(radix_cache=not disable, time_s=round(r["time_s"], 3),
                         output_tok_s=round(r["output_tokens"] / r["time_s"], 2),
                         total_tok_s=round((r["output_tokens"] + r["prompt_tokens"]) / r["time_s"], 2),
                         prompt_tokens=r["prompt_tokens"], cached_tokens=r["cached_tokens"],
                         hit_rate=round(r["cached_tokens"] / r["prompt_tokens"], 4), retractions=r["retractions"]))
    if name == "stage3_scheduler":
        print("note: stage4_radix is not importable, so both runs have no prefix cache")
    print(f"\nshared prefix: {groups} groups x {args.group_size} prompts, prefix {prefix_len} + question "
          f"{q_len} tokens, {args.prefix_output_len} output tokens; {name}, {args.model}, {args.device}")
    print("| radix cache | time (s) | output tok/s | total tok/s | hit rate | retractions |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {'on' if r['radix_cache'] else 'off'} | {r['time_s']:.2f} | {r['output_tok_s']:.1f} | "
              f"{r['total_tok_s']:.1f} | {r['hit_rate']:.1%} | {r['retractions']} |")
    speedup = rows[1]["time_s"] / rows[0]["time_s"]
    print(f"speedup with the cache: {speedup:.2f}x")
    print(json.dumps(dict(bench="shared_prefix", engine=name, model=args.model, load_format=args.load_format,
                          device=args.device, groups=groups, group_size=args.group_size, prefix_len=prefix_len,
                          question_len=q_len, output_len=args.prefix_output_len, on=rows[0], off=rows[1],
                          speedup=round(speedup, 3))))


def main(argv=None) -> None:
    import torch
    args = build_parser().parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.shared_prefix = args.shared_prefix or [32, 2048, 128]
    run_prefix_bench(args)


if __name__ == "__main__":
    main()
