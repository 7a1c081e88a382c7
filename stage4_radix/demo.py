"""Chapter 4 demo: `python -m stage4_radix.demo [--page_size 16]`.

Runs the stage-4 Engine on prompts that share a long system prompt, in two rounds: one
request first (it leaves system prompt + question + answer in the radix tree), then four
more at once (they reuse the system prompt, one of them also the first question). Prints
`cached_tokens` per request, how many tokens were actually forwarded, the tree after each
round, and the tree after an eviction. Demo weights are random: the text is gibberish.
"""
from __future__ import annotations

import logging

from stage1_model.demo_cli import add_flag, add_model_args, demo_parser, friendly_errors, parse
from stage4_radix.engine import Engine

SYSTEM = ("You are a helpful assistant for a small bakery. Answer in one short sentence, "
          "be friendly, and never invent prices. ")
FIRST = [SYSTEM + "Question: when do you open on Sunday?"]
SECOND = [SYSTEM + "Question: when do you open on Sunday? And on Monday?",
          SYSTEM + "Question: do you sell rye bread?",
          SYSTEM + "Question: can I order a birthday cake?",
          "Tell me a joke about bread."]


def parse_args(argv=None):
    ap = demo_parser("stage4_radix.demo", __doc__)
    add_model_args(ap, backend=True)
    add_flag(ap, "--page_size", type=int, default=1, help="slots per page; the tree compares whole pages")
    add_flag(ap, "--max_new_tokens", type=int, default=8, help="tokens to generate per request")
    add_flag(ap, "--disable_radix_cache", action="store_true", help="run stage 3's NoPrefixCache instead")
    args = parse(ap, argv)
    if args.page_size < 1 or args.max_new_tokens < 1:
        ap.error("need page_size >= 1 and max_new_tokens >= 1")
    return ap, args


def show_tree(eng: Engine, title: str) -> None:
    if eng.disable_radix_cache:
        return

    def decode(ids: list[int]) -> str:         # one line per node: escape newlines, cut long text
        text = eng.tokenizer.decode(ids).replace("\n", "\\n")
        return f"{text[:20]}...{text[-20:]}" if len(text) > 43 else text
    print(f"\n{title}\n{eng.cache.pretty(decode)}")


def run_round(eng: Engine, prompts: list[str], max_new: int) -> list[dict]:
    before, steps = eng.scheduler.forwarded_tokens, eng.scheduler.tracer.step
    outs = eng.generate(prompts, {"temperature": 0.0, "max_new_tokens": max_new, "ignore_eos": True})
    for p, o in zip(prompts, outs):
        m = o["meta_info"]
        print(f"  prompt {m['prompt_tokens']:>3} tokens, cached {m['cached_tokens']:>3}: ...{p[-38:]!r}")
    n_prompt = sum(o["meta_info"]["prompt_tokens"] for o in outs)
    n_cached = sum(o["meta_info"]["cached_tokens"] for o in outs)
    # Each request forwards its uncached prompt tokens once, then max_new - 1 decode tokens.
    print(f"  {eng.scheduler.tracer.step - steps} steps, forwarded {eng.scheduler.forwarded_tokens - before} tokens"
          f" = {n_prompt} prompt - {n_cached} cached + {len(outs)} x ({max_new} - 1) decode")
    return outs


def main(argv=None) -> dict:
    ap, args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    with friendly_errors(ap):
        eng = Engine(model=args.model, device=args.device, dtype=args.dtype, load_format=args.load_format,
                     attention_backend=args.attention_backend, page_size=args.page_size,
                     schedule_policy="cache_aware", disable_radix_cache=args.disable_radix_cache)
    print(f"round 1: one request (page_size {args.page_size})")
    first = run_round(eng, FIRST, args.max_new_tokens)
    show_tree(eng, "the tree after round 1:")
    print("\nround 2: four requests, three sharing the system prompt")
    second = run_round(eng, SECOND, args.max_new_tokens)
    show_tree(eng, "the tree after round 2 (the first edge was split where the prompts diverge):")
    eng.check_integrity()                       # free + cached + running == pool, page by page
    if not args.disable_radix_cache:
        freed = eng.cache.evict(1)
        show_tree(eng, f"after evict(1): the least recently used leaf went ({freed} slots freed)")
        assert eng.flush_cache()
        print(f"\nflush_cache(): {eng.cache.evictable_size()} slots cached, "
              f"{eng.runner.pool.allocator.available_size()} of {eng.runner.pool.size} free")
    return {"rounds": [first, second], "forwarded": eng.scheduler.forwarded_tokens, "engine": eng}


if __name__ == "__main__":
    main()
