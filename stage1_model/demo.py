"""Chapter 1 demo: `python -m stage1_model.demo --model demo --prompt "Hello"`.

Loads a model (the built-in demo model by default), tokenizes the prompt and prints
a naive, single-request generation from the stage-1 contiguous-KV loop.
"""
from __future__ import annotations

import argparse
import logging
import time

import torch

from stage1_model.config import load_config
from stage1_model.generate import generate
from stage1_model.model_source import generation_eos_ids, resolve_model_path, tokenizer_dir
from stage1_model.tokenizer import load_tokenizer
from stage1_model.weights import load_model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo", help="'demo', a local HF Qwen3 directory, or a Hub id")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--load_format", "--load-format", default="auto", choices=["auto", "dummy"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    path = resolve_model_path(args.model)
    cfg = load_config(path)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    model = load_model(path, dtype, args.device, args.load_format, cfg=cfg)
    tok = load_tokenizer(tokenizer_dir(path))
    ids = tok.encode(args.prompt)
    t0 = time.perf_counter()
    out = generate(model, ids, args.max_new_tokens, args.temperature,
                   eos_token_ids=generation_eos_ids(path, cfg), seed=args.seed)
    dt = time.perf_counter() - t0
    print(f"prompt ({len(ids)} tokens): {args.prompt!r}")
    print(f"output ({len(out)} tokens, {len(out) / dt:.1f} tok/s): {tok.decode(out)!r}")


if __name__ == "__main__":
    main()
