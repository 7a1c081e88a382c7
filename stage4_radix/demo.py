"""Chapter 4 demo: `python -m stage4_radix.demo [--page_size 16]`.

Runs the stage-4 Engine on prompts that share a long system prompt, in two rounds: one
request first (it leaves system prompt + question + answer in the radix tree), then four
more at once (they reuse the system prompt, one of them also the first question). Prints
`cached_tokens` per request, how many tokens were actually forwarded, the tree after each
round, and the tree after an eviction. Demo weights are random: the text is gibberish.
"""
from __future__ import annotations

import argparse
import logging

from stage4_radix.engine import Engine

SYSTEM = ("You are a helpful assistant for a small bakery. Answer in one short sentence, "
          "be friendly, and never invent prices. ")
FIRST = [SYSTEM + "Question: when do you open on Sunday?"]
SECOND = [SYSTEM + "Question: when do you open on Sunday? And on Monday?",
          SYSTEM + "Question: do you sell rye bread?",
          SYSTEM + "Question: can I order a birthday cake?",
          "Tell me a joke about bread."]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo", help="'demo', a local HF Qwen3 directory, or configs/<name>")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--page_size", "--page-size", type=int, default=1)
    ap.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=8)
    ap.add_argument("--disable_radix_cache", "--disable-radix-cache", action="store_true")
    return ap.parse_args(argv)


def show_tree(eng: Engine, title: str) -> None:
    if eng.disable_radix_cache:
        return

    def decode(ids: list[int]) -> str:         # one line per node: escape newlines, cut long text
        text = eng.tokenizer.decode(ids).replace("\n", "\\n")
        return f"{text[:20]}...{text[-20:]}" if len(text) > 43 else text
    print(f"\n{title}\n{eng.cache.pretty(decode)}")


def run_round(eng: Engine, prompts: list[str], max_new: int) -> None:
    before = eng.scheduler.forwarded_tokens
    outs = eng.generate(prompts, {"temperature": 0.0, "max_new_tokens": max_new, "ignore_eos": True})
    for p, o in zip(prompts, outs):
        m = o["meta_info"]
        print(f"  prompt {m['prompt_tokens']:>3} tokens, cached {m['cached_tokens']:>3}: ...{p[-38:]!r}")
    n_prompt = sum(o["meta_info"]["prompt_tokens"] for o in outs)
    n_cached = sum(o["meta_info"]["cached_tokens"] for o in outs)
    # Each request forwards its uncached prompt tokens once, then max_new - 1 decode tokens.
    print(f"  forwarded {eng.scheduler.forwarded_tokens - before} tokens = {n_prompt} prompt - {n_cached} "
          f"cached + {len(outs)} x ({max_new} - 1) decode")


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    eng = Engine(model=args.model, device=args.device, page_size=args.page_size,
                 schedule_policy="cache_aware", disable_radix_cache=args.disable_radix_cache)
    print(f"round 1: one request (page_size {args.page_size})")
    run_round(eng, FIRST, args.max_new_tokens)
    show_tree(eng, "the tree after round 1:")
    print("\nround 2: four requests, three sharing the system prompt")
    run_round(eng, SECOND, args.max_new_tokens)
    show_tree(eng, "the tree after round 2 (the first edge was split where the prompts diverge):")
    eng.check_integrity()                       # free + cached + running == pool, page by page
    if not args.disable_radix_cache:
        freed = eng.cache.evict(1)
        show_tree(eng, f"after evict(1): the least recently used leaf went ({freed} slots freed)")
        assert eng.flush_cache()
        print(f"\nflush_cache(): {eng.cache.evictable_size()} slots cached, "
              f"{eng.runner.pool.allocator.available_size()} of {eng.runner.pool.size} free")


if __name__ == "__main__":
    main()
