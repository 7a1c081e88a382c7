"""Building blocks of Qwen3 and the linear-layer seam.

Shapes use T = number of tokens in the (flattened) batch, H = q heads, KVH = kv heads,
D = head_dim. Tokens of several requests are concatenated along T, never padded.

The seam (docs/design.md#the-seams): every Linear/Embedding is created through a `LayerFactory`.
Stage 1 builds whole tensors; stage 5 swaps in a factory whose layers hold one tensor-
parallel shard. Each parameter carries `weight_loader(param, full_tensor)` so the weight
loader never needs to know how a parameter is sharded.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded)


class LayerFactory:
    """Creates the model's linear layers. `kind` says how TP would split it:
    'column' (split outputs: q/gate/up), 'kv' (k/v: split by KV head, each head kept
    whole and copied when there are fewer heads than ranks), 'row' (split inputs: o/down)."""

    def linear(self, in_features: int, out_features: int, kind: str) -> nn.Module:
        layer = nn.Linear(in_features, out_features, bias=False)
        layer.weight.weight_loader = default_weight_loader
        return layer

    def embedding(self, vocab: int, hidden: int) -> nn.Module:
        layer = nn.Embedding(vocab, hidden)
        layer.weight.weight_loader = default_weight_loader
        return layer

    def lm_head(self, hidden: int, vocab: int) -> nn.Module:
        return self.linear(hidden, vocab, "column")

    # Per-rank head counts; stage 5 divides them by the TP size.
    def local_heads(self, n: int) -> int:
        return n


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.weight.weight_loader = default_weight_loader
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 (as HF does), then cast back before scaling by the weight.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """Plain RoPE (rotate-half layout, as HF Qwen3). cos/sin are precomputed for all
    positions so a forward only gathers rows: no Python branching, graph-capturable."""

    def __init__(self, head_dim: int, max_positions: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)                      # [P, D/2]
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        # q: [T, H, D], k: [T, KVH, D], positions: [T]
        cos = self.cos[positions].unsqueeze(1)                # [T, 1, D/2]
        sin = self.sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, inter: int, factory: LayerFactory):
        super().__init__()
        self.gate_proj = factory.linear(hidden, inter, "column")
        self.up_proj = factory.linear(hidden, inter, "column")
        self.down_proj = factory.linear(inter, hidden, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
