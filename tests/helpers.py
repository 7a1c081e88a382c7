"""Test helpers shared by every stage: tiny random Qwen3 configs, the paired HF reference.

`make_pair(cfg)` builds HF's `Qwen3ForCausalLM` with a seeded random init (lm_head scaled
up so greedy argmaxes are decisive, not ties decided by rounding) and loads the very same
state dict into our model, so every stage can be compared with the reference.
Import as `from helpers import ...` (tests/ is on sys.path through tests/conftest.py; a
plain module, because `conftest` is ambiguous once tests/server has its own conftest).
"""
from __future__ import annotations

import torch

from stage1_model.config import ModelConfig
from stage1_model.weights import build_model  # noqa: E402

TINY_CONFIGS = {
    "gqa2-tied": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             tie_word_embeddings=True, max_position_embeddings=2048),
    "gqa4-untied": ModelConfig(vocab_size=384, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                               num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                               tie_word_embeddings=False, max_position_embeddings=2048, rope_theta=10000.0),
    "mha-hd8": ModelConfig(vocab_size=256, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=3, num_key_value_heads=3, head_dim=8,
                           tie_word_embeddings=False, max_position_embeddings=2048),
}


def hf_config(cfg: ModelConfig):
    from transformers import Qwen3Config
    return Qwen3Config(**{k: v for k, v in cfg.to_hf_dict().items()
                          if k not in ("architectures", "model_type", "torch_dtype")},
                       attn_implementation="eager")


def make_hf(cfg: ModelConfig, seed: int = 0):
    from transformers import Qwen3ForCausalLM as HFQwen3
    torch.manual_seed(seed)
    hf = HFQwen3(hf_config(cfg)).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:       # non-trivial norm weights, so a missed norm is caught
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
        if not cfg.tie_word_embeddings:
            hf.lm_head.weight.mul_(4.0)   # decisive argmaxes
    return hf


def make_pair(cfg: ModelConfig, seed: int = 0):
    hf = make_hf(cfg, seed)
    ours = build_model(cfg, torch.float32, "cpu")
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not unexpected and all("rope" in m for m in missing), (missing, unexpected)
    return hf, ours



def random_prompts(vocab: int, lengths, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.inference_mode()
def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    # An explicit mask: otherwise HF infers one from pad_token_id and hides prompt tokens equal to it.
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                      do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()



def make_runner(path, **kw):
    from stage2_runner.model_runner import ModelRunner
    kw.setdefault("max_total_tokens", 4096)
    kw.setdefault("device", "cpu")
    return ModelRunner(model=str(path), **kw)


def assert_no_leak(runner, cache=None):
    """docs/design.md#the-leak-invariant: free + cache-held == pool size once nothing runs."""
    held = 0 if cache is None else cache.evictable_size() + cache.protected_size()
    assert runner.pool.allocator.available_size() + held == runner.pool.size


def snapshot(pool) -> list[torch.Tensor]:
    """Copies of every layer's K and V buffers (to see later which slots a step wrote)."""
    return [t.clone() for t in pool.k_buffers + pool.v_buffers]


def written_slots(before: list[torch.Tensor], pool) -> set[int]:
    """KV slots (rows of any layer's K or V buffer) that changed since `before`."""
    changed = set()
    for old, new in zip(before, pool.k_buffers + pool.v_buffers):
        changed |= set((old != new).flatten(1).any(1).nonzero().flatten().tolist())
    return changed
