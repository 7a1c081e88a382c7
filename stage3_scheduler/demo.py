"""Chapter 3 demo: `python -m stage3_scheduler.demo [--trace out.jsonl] [--plot out.png]`.

Runs the offline `Engine` on 8 prompts of mixed lengths (1 to 157 tokens), greedy,
with a KV pool deliberately too small for all of them at once, so the scheduler has to
do everything this chapter is about: admit under a token budget, chunk the long prompts
(chunks alternate with decode steps), decode in one continuous batch, and retract a
request when decoding runs out of slots (it comes back later and recomputes). Prints
each result and the scheduler's counters. Random demo weights: gibberish text, and
`ignore_eos` so every request runs to its `max_new_tokens`.
"""
from __future__ import annotations

import argparse
import logging
import time

from stage3_scheduler.engine import Engine

SENTENCE = "Continuous batching lets new requests join a running batch between decode steps. "
# (prompt, max_new_tokens): short and long prompts, short and long answers.
WORKLOAD = [("Hi", 40), ("The capital of France is", 24), (SENTENCE * 2, 48), (SENTENCE * 8, 16),
            ("1, 2, 3,", 56), (SENTENCE * 12, 32), ("def main():", 44), (SENTENCE * 4, 40)]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo", help="'demo', a local HF Qwen3 directory, or configs/<name>")
    ap.add_argument("--load_format", "--load-format", default="auto", choices=["auto", "dummy"])
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--max_total_tokens", "--max-total-tokens", type=int, default=400,
                    help="KV pool size in token slots; small on purpose, so a retraction happens")
    ap.add_argument("--chunked_prefill_size", "--chunked-prefill-size", type=int, default=128,
                    help="longest prefill chunk (<= 0: no chunking)")
    ap.add_argument("--max_running_requests", "--max-running-requests", type=int, default=16)
    ap.add_argument("--schedule_policy", "--schedule-policy", default="fifo", choices=["fifo", "cache_aware"])
    ap.add_argument("--trace", default=None, help="write the per-step scheduler trace (JSON lines) here")
    ap.add_argument("--plot", default=None, help="also draw the trace as a PNG (needs --trace)")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.plot and not args.trace:
        raise SystemExit("--plot needs --trace")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    eng = Engine(model=args.model, device=args.device, load_format=args.load_format,
                 max_total_tokens=args.max_total_tokens, chunked_prefill_size=args.chunked_prefill_size,
                 max_running_requests=args.max_running_requests, schedule_policy=args.schedule_policy,
                 trace_path=args.trace)
    prompts = [p for p, _ in WORKLOAD]
    params = [{"temperature": 0.0, "max_new_tokens": n, "ignore_eos": True} for _, n in WORKLOAD]
    t0 = time.perf_counter()
    outs = eng.generate(prompts, params)
    dt = time.perf_counter() - t0

    for p, o in zip(prompts, outs):
        m = o["meta_info"]
        print(f"\n[{m['id']}] prompt {m['prompt_tokens']:>3} tokens {p[:40]!r}{'...' if len(p) > 40 else ''}")
        print(f"  -> {m['completion_tokens']} tokens, finish {m['finish_reason']}: {o['text'][:60]!r}")
    sched = eng.scheduler
    sched.check_invariant()                          # free + cached + running == pool size
    n_out = sum(o["meta_info"]["completion_tokens"] for o in outs)
    print(f"\n{len(outs)} requests, {n_out} output tokens in {dt:.2f} s ({n_out / dt:.1f} tok/s), "
          f"{sched.tracer.step} steps, {sched.forwarded_tokens} tokens forwarded")
    print("scheduler stats:", sched.stats())
    if args.trace:
        sched.tracer.close()
        print(f"trace: {args.trace} ({sched.tracer.step} lines)")
    if args.plot:
        from stage3_scheduler.plot_trace import plot, read_trace
        print(f"plot: {plot(read_trace(args.trace), args.plot)}")


if __name__ == "__main__":
    main()
