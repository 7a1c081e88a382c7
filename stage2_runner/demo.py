"""Chapter 2 demo: a few prompts in one batch on the paged runner, and where their K/V live.

    python -m stage2_runner.demo [--page_size 4] [--max_new_tokens 6]

Runs one extend step (every prompt at once, concatenated, no padding) and then decode
steps (one token per request), greedy. Then, before giving the slots back, prints what
this chapter is about: each request's row of `req_to_token` (position -> slot), the pages
those slots make up, and which request owns each page. Finally it checks that the batched
tokens equal stage 1's, one request at a time, and that every slot went back to the pool.
"""
from __future__ import annotations

import logging


from stage1_model.demo_cli import add_flag, add_model_args, demo_parser, friendly_errors, parse
from stage1_model.generate import generate
from stage1_model.model_source import tokenizer_dir
from stage1_model.tokenizer import load_tokenizer
from stage2_runner.batch_generate import extend
from stage2_runner.kv_cache import OutOfSlots
from stage2_runner.model_runner import ModelRunner, RunnerArgs
from stage2_runner.sampler import SamplingInfo

PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "def fibonacci(n):",
           "A paged KV cache stores keys and values in"]


def parse_args(argv=None):
    ap = demo_parser("stage2_runner.demo", __doc__)
    add_model_args(ap, backend=True)
    add_flag(ap, "--page_size", type=int, default=4, help="slots per page (the engine's default is 1)")
    add_flag(ap, "--max_total_tokens", type=int, default=128, help="KV pool size in token slots")
    add_flag(ap, "--max_new_tokens", type=int, default=6, help="tokens to generate per prompt")
    add_flag(ap, "--prompt", action="append", help="a prompt (repeatable; default: four built-in ones)")
    args = parse(ap, argv)
    if args.page_size < 1 or args.max_total_tokens < args.page_size or args.max_new_tokens < 1:
        ap.error("need page_size >= 1, max_total_tokens >= page_size and max_new_tokens >= 1")
    return ap, args


def run_batch(runner: ModelRunner, prompts: list[list[int]], max_new: int):
    """Greedy static batching, step by step. Returns (outputs, {row: slots}, tokens per step)."""
    pool, n = runner.pool, len(prompts)
    rows = [pool.alloc_row() for _ in prompts]             # one req_to_token row per request
    lens, last = [0] * n, [-1] * n                         # tokens with K/V in the pool; last slot
    outs, steps, feed = [[] for _ in prompts], [], [list(p) for p in prompts]
    greedy = SamplingInfo.from_params([{"temperature": 0.0}] * n, runner.config.vocab_size, runner.device)
    try:
        for _ in range(max_new):
            # extend(): allocate slots for the fed tokens, write them into req_to_token, forward.
            logits = extend(runner, rows, lens, feed, last)  # [n, vocab]: each request's last token
            steps.append(sum(map(len, feed)))
            lens = [l + len(f) for l, f in zip(lens, feed)]
            feed = [[t] for t in runner.sample(logits, greedy).tokens.tolist()]
            for o, f in zip(outs, feed):
                o.append(f[0])
        table = {r: pool.req_to_token[r, :l].tolist() for r, l in zip(rows, lens)}
    finally:                                               # the caller owns slots and rows
        for r, l in zip(rows, lens):
            pool.allocator.free(pool.req_to_token[r, :l].long())
            pool.free_row(r)
    return outs, table, steps


def show_pages(table: dict[int, list[int]], names: str, P: int) -> None:
    print(f"\nreq_to_token[row, position] -> slot (page_size {P}; the last sampled token has no K/V yet)")
    for name, (row, slots) in zip(names, table.items()):
        print(f"  {name} row {row:>2}: {' '.join(f'{s:>3}' for s in slots)}")
    print("\npages (slot // page_size), in position order, and how full each request's last page is:")
    owner = {}
    for name, slots in zip(names, table.values()):
        pages = list(dict.fromkeys(s // P for s in slots))
        owner.update({p: name for p in pages})
        used = len(slots) - (len(pages) - 1) * P
        print(f"  {name}: pages {pages}  last page {used}/{P} used")
    print("  page owners: " + " ".join(f"{p}:{owner[p]}" for p in sorted(owner)))


def main(argv=None) -> dict:
    ap, args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    with friendly_errors(ap):
        runner = ModelRunner(RunnerArgs(model=args.model, device=args.device, dtype=args.dtype,
                                        load_format=args.load_format, attention_backend=args.attention_backend,
                                        page_size=args.page_size, max_total_tokens=args.max_total_tokens))
    pool = runner.pool
    print(f"KV pool: {pool.size} slots in {pool.allocator.num_pages} pages of {args.page_size}, "
          f"backend {runner.backend.name}, {runner.dtype}")
    tok = load_tokenizer(tokenizer_dir(runner.model_path))
    prompts = args.prompt or PROMPTS
    ids = [tok.encode(p) for p in prompts]
    names = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:len(ids)]
    try:
        outs, table, steps = run_batch(runner, ids, args.max_new_tokens)
    except OutOfSlots as e:           # a static batch can neither wait nor retract (chapter 3 can)
        ap.exit(1, f"{ap.prog}: out of KV slots ({e}): a static batch cannot wait or give slots back; "
                   "raise --max_total_tokens, or see chapter 3\n")
    for name, p, i, o in zip(names, prompts, ids, outs):
        print(f"  {name}: {p!r} {len(i)} tokens -> {o} {tok.decode(o)!r}")
    show_pages(table, names, args.page_size)

    print(f"\nsteps: 1 extend of {steps[0]} tokens ({' + '.join(str(len(i)) for i in ids)}), then "
          f"{len(steps) - 1} decode steps of {len(ids)} tokens: {sum(steps)} tokens forwarded")
    single = [generate(runner.model, i, args.max_new_tokens) for i in ids]   # stage 1, one at a time
    same = single == outs
    print(f"batched == stage 1 one request at a time: {same}")
    free = pool.allocator.available_size()
    print(f"slots free after the run: {free} / {pool.size}" + ("" if free == pool.size else "  <- LEAK"))
    return {"outputs": outs, "req_to_token": table, "steps": steps, "same_as_stage1": same,
            "page_size": args.page_size, "free": free, "pool_size": pool.size}


if __name__ == "__main__":
    main()
