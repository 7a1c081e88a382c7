"""Chapter 3 demo: continuous batching, one scheduler step at a time, with its decisions.

    python -m stage3_scheduler.demo [--max_total_tokens 400] [--trace t.jsonl --plot t.png]

Eight requests r0..r7 (prompts of 1 to 157 tokens, greedy, `ignore_eos` so each runs to
its max_new_tokens) go into a KV pool deliberately too small for all of them at once.
The demo drives `Scheduler.step()` itself and prints every step where something was
decided: who was admitted, which prompt was cut into a chunk, who was retracted (and
why that one), who finished. Runs of plain decode steps are folded into one line. The
summary counts steps and forwarded tokens, which are deterministic (a tok/s would not be).
"""
from __future__ import annotations

import logging

from stage1_model.demo_cli import add_flag, add_model_args, demo_parser, friendly_errors, parse
from stage3_scheduler.engine import Engine
from stage3_scheduler.request import Req
from stage3_scheduler.sampling_params import SamplingParams
from stage3_scheduler.trace import Tracer

SENTENCE = "Continuous batching lets new requests join a running batch between decode steps. "
# (prompt, max_new_tokens): short and long prompts, short and long answers.
WORKLOAD = [("Hi", 40), ("The capital of France is", 24), (SENTENCE * 2, 48), (SENTENCE * 8, 16),
            ("1, 2, 3,", 56), (SENTENCE * 12, 32), ("def main():", 44), (SENTENCE * 4, 40)]


class StepRecorder(Tracer):
    """The scheduler's tracer, also remembering the last step's mode and size for printing."""

    def record(self, sched, mode: str, batch_size: int, tokens: int) -> None:
        super().record(sched, mode, batch_size, tokens)
        self.last = (mode, batch_size, tokens)


def parse_args(argv=None):
    ap = demo_parser("stage3_scheduler.demo", __doc__)
    add_model_args(ap, backend=True)
    add_flag(ap, "--max_total_tokens", type=int, default=400,
             help="KV pool size in token slots; small on purpose, so a retraction happens")
    add_flag(ap, "--chunked_prefill_size", type=int, default=128, help="longest prefill chunk (<= 0: no chunking)")
    add_flag(ap, "--max_running_requests", type=int, default=16, help="cap on the running batch")
    add_flag(ap, "--schedule_policy", default="fifo", choices=["fifo", "cache_aware"], help="waiting-queue order")
    add_flag(ap, "--trace", default=None, help="write the per-step scheduler trace (JSON lines) here")
    add_flag(ap, "--plot", default=None, help="also draw the trace as a PNG (needs --trace and matplotlib)")
    args = parse(ap, argv)
    if args.plot and not args.trace:
        ap.error("--plot needs --trace")
    return ap, args


def step_line(sched, before: dict[Req, int], outs) -> tuple[str, list[str]]:
    """What changed in one step (before: running request -> kv_len before the step):
    the step's shape, and the decisions worth a line."""
    mode, bs, tokens = sched.tracer.last
    events = []
    for r in sched.running:
        if r not in before:
            back = f", back after a retraction: recomputes {r.prefill_len} tokens" if r.num_retractions else ""
            events.append(f"admit {r.rid} ({len(r.input_ids)}-token prompt{back})")
        if mode == "extend" and r.kv_len != before.get(r) and (r.prefilling or r in before):
            events.append(f"chunk {r.rid} ({r.kv_len}/{r.prefill_len} prompt tokens computed)")
    for r in before:
        if r.status.value == "waiting":
            others = [len(q.output_ids) for q in before if q is not r] or [0]
            events.append(f"RETRACT {r.rid}: {len(r.output_ids)} tokens generated (the others {min(others)}.."
                          f"{max(others)}), {len(r.input_ids)}-token prompt; its slots go back to the pool")
    events += [f"finish {o.rid} ({o.finish_reason['type']}, {o.completion_tokens} tokens)" for o in outs if o.finished]
    return f"{mode:<6} {bs:>2} reqs {tokens:>3} tokens", events


def run(eng: Engine, reqs: list[Req]) -> dict:
    sched = eng.scheduler
    sched.tracer = StepRecorder(sched.args.trace_path)
    for r in reqs:
        sched.add_request(r)
    quiet, log = [], []                               # folded decode steps; (step, events)
    while sched.has_work():
        before = {r: r.kv_len for r in sched.running}
        outs = sched.step()
        shape, events = step_line(sched, before, outs)
        if not events:
            quiet.append(sched.tracer.step)
            continue
        if quiet:
            span = f"steps {quiet[0]}-{quiet[-1]}" if len(quiet) > 1 else f"step {quiet[0]}"
            print(f"  {span:<11} decode only, nothing decided")
            quiet = []
        print(f"  step {sched.tracer.step:<6} {shape}  running {len(sched.running)}, waiting {len(sched.waiting)}, "
              f"free slots {sched.pool.allocator.available_size()}")
        for e in events:
            print(f"              {e}")
        log.append((sched.tracer.step, events))
    sched.check_invariant()                           # free + cached + running == pool size
    sched.tracer.close()
    return {"steps": sched.tracer.step, "forwarded": sched.forwarded_tokens, "events": log,
            "retractions": sched.total_retractions}


def main(argv=None) -> dict:
    ap, args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    with friendly_errors(ap):
        eng = Engine(model=args.model, device=args.device, dtype=args.dtype, load_format=args.load_format,
                     attention_backend=args.attention_backend, max_total_tokens=args.max_total_tokens,
                     chunked_prefill_size=args.chunked_prefill_size, max_running_requests=args.max_running_requests,
                     schedule_policy=args.schedule_policy, trace_path=args.trace)
    vocab = eng.runner.config.vocab_size
    reqs = [Req(f"r{i}", eng.tokenizer.encode(p), SamplingParams.from_dict(
            {"temperature": 0.0, "max_new_tokens": n, "ignore_eos": True}, vocab)) for i, (p, n) in enumerate(WORKLOAD)]
    chunks = f"chunks of {args.chunked_prefill_size} tokens" if args.chunked_prefill_size > 0 else "no chunking"
    print(f"KV pool {eng.runner.pool.size} slots, {chunks}; requests "
          + ", ".join(f"{r.rid} {len(r.input_ids)}+{r.params.max_new_tokens}" for r in reqs) + " (prompt+new)")
    res = run(eng, reqs)
    n_out = sum(len(r.output_ids) for r in reqs)
    print(f"\n{len(reqs)} requests, {n_out} output tokens, {res['steps']} steps, {res['forwarded']} tokens "
          f"forwarded, {res['retractions']} retractions")
    print("scheduler stats:", eng.scheduler.stats())
    if args.trace:
        print(f"trace: {args.trace} ({res['steps']} lines)")
    if args.plot:
        from stage3_scheduler.plot_trace import plot, read_trace
        print(f"plot: {plot(read_trace(args.trace), args.plot)}")
    return {**res, "reqs": reqs}


if __name__ == "__main__":
    main()
