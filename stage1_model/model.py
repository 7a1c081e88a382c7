"""Qwen3 decoder-only transformer, with parameter names equal to Hugging Face's.

Contract: `Qwen3ForCausalLM(cfg).forward(input_ids [T], positions [T], attn, batch)`
returns hidden states [T, hidden]; `compute_logits(hidden)` gives [N, vocab] float32.
Attention is the seam (docs/design.md#the-seams): each layer computes q, k, v (after Qwen3's per-head
q/k RMSNorm and RoPE) and hands them to `attn(q, k, v, layer_id, batch)`, which owns the
KV cache and returns [T, H * D]. Stage 1 passes a contiguous per-request cache; stage 2
passes paged backends. The model itself never sees a cache.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from stage1_model.config import ModelConfig
from stage1_model.layers import LayerFactory, RMSNorm, RotaryEmbedding, SwiGLU


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, factory: LayerFactory):
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = D = cfg.head_dim
        self.num_heads = factory.local_heads(cfg.num_attention_heads)
        self.num_kv_heads = factory.local_heads(cfg.num_key_value_heads)
        self.q_proj = factory.linear(cfg.hidden_size, cfg.num_attention_heads * D, "column")
        self.k_proj = factory.linear(cfg.hidden_size, cfg.num_key_value_heads * D, "kv")
        self.v_proj = factory.linear(cfg.hidden_size, cfg.num_key_value_heads * D, "kv")
        self.o_proj = factory.linear(cfg.num_attention_heads * D, cfg.hidden_size, "row")
        # Qwen3's qk-norm: an RMSNorm over head_dim, shared by all heads.
        self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(D, cfg.rms_norm_eps)

    def forward(self, x, positions, rope, attn, batch):
        T = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(T, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(T, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).view(T, self.num_kv_heads, self.head_dim)
        q, k = rope(positions, q, k)
        o = attn(q, k, v, self.layer_id, batch)               # [T, H * D]
        return self.o_proj(o)


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, factory: LayerFactory):
        super().__init__()
        self.self_attn = Qwen3Attention(cfg, layer_id, factory)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, factory)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, positions, rope, attn, batch):
        x = x + self.self_attn(self.input_layernorm(x), positions, rope, attn, batch)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nn.Module):
    # Which classes build a layer and the final norm: a faster twin of this model (stage 5's
    # fused one) swaps the classes and keeps the structure and the parameter names.
    layer_cls, norm_cls = Qwen3DecoderLayer, RMSNorm

    def __init__(self, cfg: ModelConfig, factory: LayerFactory):
        super().__init__()
        self.embed_tokens = factory.embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(self.layer_cls(cfg, i, factory) for i in range(cfg.num_hidden_layers))
        self.norm = self.norm_cls(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen3ForCausalLM(nn.Module):
    model_cls = Qwen3Model

    def __init__(self, cfg: ModelConfig, factory: LayerFactory | None = None):
        super().__init__()
        self.config = cfg
        self.factory = factory = factory or LayerFactory()
        self.model = self.model_cls(cfg, factory)
        self.lm_head = factory.lm_head(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn, batch=None) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)                 # [T, hidden]
        for layer in self.model.layers:
            x = layer(x, positions, self.rope, attn, batch)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in float32 (sampling wants full precision)."""
        return self.lm_head(hidden).float()
