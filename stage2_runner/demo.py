"""Chapter 2 demo: `python -m stage2_runner.demo` batches a few prompts on the paged runner.

Builds a `ModelRunner` (weights + KV pool + attention backend), tokenizes the prompts,
and runs `batch_generate`: one extend batch for all prompts together, then decode steps
that add one token per request. Prints the pool's capacity, each request's token ids and
text, and checks that every slot went back to the pool. With `--model demo` (default)
the weights are random, so the text is gibberish; the mechanics are real.
"""
from __future__ import annotations

import argparse
import logging
import time

from stage1_model.model_source import tokenizer_dir
from stage1_model.tokenizer import load_tokenizer
from stage2_runner.batch_generate import batch_generate
from stage2_runner.kv_cache import KVPool
from stage2_runner.model_runner import ModelRunner, RunnerArgs

PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "def fibonacci(n):",
           "A paged KV cache stores keys and values in"]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo", help="'demo', a local HF Qwen3 directory, or configs/<name>")
    ap.add_argument("--load_format", "--load-format", default="auto", choices=["auto", "dummy"])
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--attention_backend", "--attention-backend", default=None,
                    help="torch | triton | fa (default: triton on GPU, torch on CPU)")
    ap.add_argument("--page_size", "--page-size", type=int, default=1)
    ap.add_argument("--max_total_tokens", "--max-total-tokens", type=int, default=4096,
                    help="KV pool size in token slots (0: size it from free memory)")
    ap.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=16)
    ap.add_argument("--prompt", action="append", help="a prompt (repeatable; default: four built-in ones)")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    runner = ModelRunner(RunnerArgs(model=args.model, device=args.device, load_format=args.load_format,
                                    attention_backend=args.attention_backend, page_size=args.page_size,
                                    max_total_tokens=args.max_total_tokens or None))
    pool, cfg = runner.pool, runner.config
    kv_heads = runner.model.model.layers[0].self_attn.num_kv_heads
    per_slot = KVPool.bytes_per_slot(cfg.num_hidden_layers, kv_heads, cfg.head_dim, runner.dtype)
    print(f"KV pool: {pool.size} token slots x {per_slot} bytes "
          f"(2 x {cfg.num_hidden_layers} layers x {kv_heads} kv heads x {cfg.head_dim} dims x "
          f"{runner.dtype}) = {pool.size * per_slot / 2**20:.1f} MiB, page_size {args.page_size}, "
          f"backend {runner.backend.name}")

    tok = load_tokenizer(tokenizer_dir(runner.model_path))
    prompts = args.prompt or PROMPTS
    ids = [tok.encode(p) for p in prompts]
    t0 = time.perf_counter()
    outs = batch_generate(runner, ids, args.max_new_tokens)        # greedy
    dt = time.perf_counter() - t0
    for p, i, o in zip(prompts, ids, outs):
        print(f"\nprompt {p!r} -> {len(i)} tokens {i}")
        print(f"  output ids  {o}")
        print(f"  output text {tok.decode(o)!r}")
    n = sum(len(o) for o in outs)
    print(f"\n{len(ids)} requests x {args.max_new_tokens} tokens: 1 extend step + "
          f"{args.max_new_tokens - 1} decode steps, {n} tokens in {dt:.2f} s ({n / dt:.1f} tok/s)")
    free = pool.allocator.available_size()
    print(f"slots free after the run: {free} / {pool.size}" + ("" if free == pool.size else "  <- LEAK"))


if __name__ == "__main__":
    main()
