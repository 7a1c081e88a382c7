"""Chapter 5 demo: `python -m stage5_tp_cudagraph.demo [--steps 8]`.

Shows the two ideas of the chapter on the demo model (CPU is fine):
  1. Overlap: a step-by-step log of the OverlapScheduler. Each line is one `step()`: the
     batch it launched (N+1) and the batch whose tokens it read back (N), one step late.
     r0 (max_new_tokens=2) is not launched again once its last token is in flight; r2
     stops on a stop token that the host sees one step late, so the step that reads it
     back has already launched r2 once more: that extra token is computed and dropped.
     Then the same requests with `disable_overlap` give the same tokens.
  2. CUDA-graph padding: a decode batch of 3 runs from the graph runner's static buffers,
     padded to the captured size 4; its logits equal the plain decode's, and the padded
     row wrote only the scratch KV slot. On a GPU the same call replays a real graph.
"""
from __future__ import annotations

import torch

from stage1_model.demo_cli import add_flag, add_model_args, demo_parser, friendly_errors, parse
from stage3_scheduler.request import Req
from stage3_scheduler.sampling_params import SamplingParams
from stage5_tp_cudagraph.engine import Engine

PROMPTS = [[51494, 56125, 6306], [77465, 29631, 67150, 19254, 37941], [13225, 95333, 53274]]   # token ids


def parse_args(argv=None):
    ap = demo_parser("stage5_tp_cudagraph.demo", __doc__)
    add_model_args(ap, backend=True)
    add_flag(ap, "--steps", type=int, default=8, help="scheduler steps to log in detail")
    return ap, parse(ap, argv)


def make_reqs(vocab: int, stop_token: int | None) -> list[Req]:
    params = [dict(max_new_tokens=2), dict(max_new_tokens=12), dict(max_new_tokens=12)]
    if stop_token is not None:
        params[2]["stop_token_ids"] = [stop_token]
    return [Req(f"r{i}", p, SamplingParams.from_dict(dict(temperature=0, **sp), vocab))
            for i, (p, sp) in enumerate(zip(PROMPTS, params))]


def run(eng: Engine, reqs: list[Req], log_steps: int = 0) -> None:
    for r in reqs:
        eng.scheduler.add_request(r)
    sched, step = eng.scheduler, 0
    while sched.has_work():
        outs = sched.step()
        step += 1
        if step <= log_steps:
            launched = sched.in_flight[0] if getattr(sched, "in_flight", None) else []
            got = {o.rid: o.new_token_ids for o in outs if o.new_token_ids}
            ended = [f"{o.rid} ({o.finish_reason['type']})" for o in outs if o.finished]
            print(f"  step {step:>2}: launched [{' '.join(r.rid for r in launched)}]"
                  f"  read back {got or '-'}{'  finished ' + ', '.join(ended) if ended else ''}")


def overlap_demo(args) -> dict:
    opts = dict(model=args.model, device=args.device, dtype=args.dtype, load_format=args.load_format,
                attention_backend=args.attention_backend, max_total_tokens=2048)
    sync = Engine(disable_overlap=True, **opts)
    vocab = sync.runner.config.vocab_size
    ref = make_reqs(vocab, None)
    run(sync, ref)
    # r2 stops at the first token (from its 4th on) that it had not produced before
    stop_token = next(t for i, t in enumerate(ref[2].output_ids) if i >= 3 and t not in ref[2].output_ids[:i])
    print("1. Overlap: each step launches batch N+1, then reads back batch N")
    eng = Engine(**opts)
    reqs = make_reqs(vocab, stop_token)
    run(eng, reqs, log_steps=args.steps)
    again = make_reqs(vocab, stop_token)
    run(sync, again)
    same = [r.output_ids for r in reqs] == [r.output_ids for r in again]
    print(f"  overlap == synchronous, token for token: {same}")
    for r in reqs:
        print(f"  {r.rid}: {len(r.output_ids)} tokens, {r.finish_reason}")
    eng.check_integrity()
    print("  KV books balanced after the run (free + cached + running == pool)")
    return dict(same=same, reqs=reqs, engine=eng, **graph_demo(eng))


def graph_demo(eng: Engine) -> dict:
    from stage2_runner.forward_batch import make_batch
    from stage5_tp_cudagraph.cuda_graph import DecodeGraphs
    runner, pool = eng.runner, eng.runner.pool
    graphs = runner.graphs or DecodeGraphs(runner, max_bs=8, use_graphs=False)
    kind = "replayed CUDA graph" if graphs.use_graphs else "static buffers, run eagerly (no CUDA here)"
    print(f"\n2. Decode through the graph runner ({kind}), captured sizes {graphs.sizes}")
    rows = [pool.alloc_row() for _ in PROMPTS]
    slots = [pool.allocator.alloc(len(p) + 1) for p in PROMPTS]
    for row, s in zip(rows, slots):
        pool.req_to_token[row, :len(s)] = s.to(pool.req_to_token.device, torch.int32)
    prefill = make_batch(rows, [0] * 3, PROMPTS, torch.cat([s[:-1] for s in slots]), runner.device)
    runner.forward(prefill)
    locs = torch.stack([s[-1] for s in slots])
    decode = make_batch(rows, [len(p) for p in PROMPTS], [[11], [12], [13]], locs, runner.device)
    plain = super(type(runner), runner).forward(decode).clone()        # stage 2's eager decode
    scratch_before = pool.k_buffers[0][graphs.scratch_slot].clone()
    diff = (graphs.run(decode) - plain).abs().max().item()
    scratch = not torch.equal(scratch_before, pool.k_buffers[0][graphs.scratch_slot])
    print(f"  batch of 3 padded to {next(s for s in graphs.sizes if s >= 3)}: max |graph - eager| logit = {diff:.2e}")
    print(f"  the padded row wrote only the scratch slot {graphs.scratch_slot}: {scratch}")
    for row, s in zip(rows, slots):
        pool.allocator.free(s)
        pool.free_row(row)
    return dict(max_logit_diff=diff, scratch_written=scratch)


def main(argv=None) -> dict:
    ap, args = parse_args(argv)
    with friendly_errors(ap):
        return overlap_demo(args)


if __name__ == "__main__":
    main()
