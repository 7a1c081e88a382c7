"""Naive generation for one request with a contiguous KV cache.

This is the simplest correct engine: prefill the prompt once, then feed one token per
step, appending each layer's K/V to a growing tensor. Stage 2 replaces the contiguous
cache with a paged pool and batches many requests; its outputs must equal these.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from stage1_model.model import Qwen3ForCausalLM


class ContiguousKVAttention:
    """The stage-1 attention seam: per-layer K/V of ONE request, kept contiguous.

    k_cache[layer]: [S, KVH, D], grows by T rows each call; queries are the last T positions.
    """

    def __init__(self, num_layers: int):
        self.k = [None] * num_layers
        self.v = [None] * num_layers

    def __call__(self, q, k, v, layer_id, batch=None):
        if self.k[layer_id] is not None:
            k = torch.cat([self.k[layer_id], k])
            v = torch.cat([self.v[layer_id], v])
        self.k[layer_id], self.v[layer_id] = k, v
        return causal_attention(q, k, v)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [T, H, D] are the LAST T positions of k/v [S, KVH, D] -> [T, H*D]."""
    T, H, D = q.shape
    S = k.shape[0]
    # Query i sits at absolute position S-T+i and may see keys 0..S-T+i.
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
        attn_mask=mask, enable_gqa=True)                     # [H, T, D]
    return out.transpose(0, 1).reshape(T, H * D)


@torch.inference_mode()
def forward_logits(model: Qwen3ForCausalLM, input_ids: list[int]) -> torch.Tensor:
    """Logits for every position of one sequence, no cache: [T, vocab]."""
    dev = model.lm_head.weight.device
    ids = torch.tensor(input_ids, device=dev)
    attn = ContiguousKVAttention(model.config.num_hidden_layers)
    return model.compute_logits(model(ids, torch.arange(len(ids), device=dev), attn))


@torch.inference_mode()
def generate(model: Qwen3ForCausalLM, input_ids: list[int], max_new_tokens: int,
             temperature: float = 0.0, eos_token_ids=(), seed: int | None = None,
             use_cache: bool = True) -> list[int]:
    """Greedy (temperature 0) or temperature sampling; returns the new token ids."""
    dev = model.lm_head.weight.device
    gen = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
    attn = ContiguousKVAttention(model.config.num_hidden_layers)
    tokens, out = list(input_ids), []
    feed = tokens                                            # prefill: the whole prompt
    for _ in range(max_new_tokens):
        if not use_cache:                                    # recompute everything (a test oracle)
            attn, feed = ContiguousKVAttention(model.config.num_hidden_layers), tokens
        start = len(tokens) - len(feed)
        ids = torch.tensor(feed, device=dev)
        pos = torch.arange(start, len(tokens), device=dev)
        logits = model.compute_logits(model(ids, pos, attn)[-1:])[0]   # [vocab]
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        else:
            nxt = int(logits.argmax())
        tokens.append(nxt)
        out.append(nxt)
        if nxt in eos_token_ids:
            break
        feed = [nxt]
    return out
