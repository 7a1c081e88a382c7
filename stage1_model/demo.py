"""Chapter 1 demo: one forward pass, checked against Hugging Face, then naive generation.

    python -m stage1_model.demo --prompt "The capital of France is"

1. Runs the prompt through our Qwen3 and prints the top-5 next-token probabilities.
2. Loads the same weights into transformers' Qwen3ForCausalLM and prints the largest
   |ours - HF| logit difference over every prompt position (float32: ~1e-6).
3. Generates greedily with the stage-1 loop (one prefill, then one token per step) and
   counts the forward steps. The demo model's weights are random: its text is gibberish,
   but the numbers above are the real check.
"""
from __future__ import annotations

import logging

import torch

from stage1_model.config import load_config
from stage1_model.demo_cli import add_flag, add_model_args, demo_parser, friendly_errors, parse
from stage1_model.generate import forward_logits, generate
from stage1_model.model_source import generation_eos_ids, resolve_model_path, tokenizer_dir
from stage1_model.tokenizer import load_tokenizer
from stage1_model.weights import load_model


def parse_args(argv=None):
    ap = demo_parser("stage1_model.demo", __doc__)
    add_model_args(ap)
    add_flag(ap, "--prompt", default="The capital of France is", help="text to continue")
    add_flag(ap, "--max_new_tokens", type=int, default=12, help="tokens to generate")
    add_flag(ap, "--skip_hf", action="store_true", help="skip the Hugging Face comparison (big models)")
    return ap, parse(ap, argv)


@torch.inference_mode()
def hf_logits(model_dir, ours, ids: list[int]) -> torch.Tensor:
    """The reference: HF's Qwen3ForCausalLM from the same config, with our very weights."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    cfg = Qwen3Config.from_pretrained(model_dir, attn_implementation="eager")
    p = ours.lm_head.weight
    hf = Qwen3ForCausalLM(cfg).to(device=p.device, dtype=p.dtype).eval()
    hf.load_state_dict(ours.state_dict(), strict=False)     # same parameter names as ours
    return hf(torch.tensor([ids], device=p.device)).logits[0].float()


def main(argv=None) -> dict:
    ap, args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    with friendly_errors(ap):
        path = resolve_model_path(args.model)
        cfg = load_config(path)
        model = load_model(path, args.torch_dtype, args.device, args.load_format, cfg=cfg)
    tok = load_tokenizer(tokenizer_dir(path))
    ids = tok.encode(args.prompt)
    print(f"prompt {args.prompt!r} -> {len(ids)} tokens {ids}")

    logits = forward_logits(model, ids)                       # [T, vocab] float32
    probs = torch.softmax(logits[-1], dim=-1)
    top = torch.topk(probs, 5)
    print(f"\ntop-5 next tokens (a uniform guess would give each 1/{probs.numel()} = {1 / probs.numel():.1e}):")
    for p, t in zip(top.values.tolist(), top.indices.tolist()):
        print(f"  {t:>6}  {tok.decode([t])!r:<16} p = {p:.2e}   logit {logits[-1, t].item():+.3f}")

    diff = None
    if not args.skip_hf:
        diff = (logits - hf_logits(path, model, ids)).abs().max().item()
        print(f"\nmax |ours - HF| over {len(ids)} x {logits.shape[1]} logits: {diff:.2e} ({args.torch_dtype})")

    out = generate(model, ids, args.max_new_tokens, eos_token_ids=generation_eos_ids(path, cfg))
    print(f"\ngreedy: {len(out)} new tokens in {len(out)} forward steps "
          f"(1 prefill of {len(ids)} tokens, then {len(out) - 1} steps of 1 token)")
    print(f"  ids  {out}\n  text {tok.decode(out)!r}")
    print(f"  the first token is the top-1 above: {out[0] == top.indices[0].item()}")
    return {"ids": ids, "top_ids": top.indices.tolist(), "top_probs": top.values.tolist(),
            "max_abs_diff": diff, "output_ids": out}


if __name__ == "__main__":
    main()
