"""Tensor-parallel layers: stage 1's LayerFactory seam, filled with sharded layers.

    model = build_model(cfg, dtype, device, TPLayerFactory(cfg, get_tp()))

Which matrix splits which way (W is [out, in]; y = x @ W.T):
  - column-parallel (q, gate, up): each rank holds a block of W's *rows*, i.e. some output
    features (for q: some heads). No communication: the next op works per head / per feature.
  - 'kv' (k, v): split by KV head like q; when there are fewer KV heads than ranks, each
    rank holds one whole KV head, the one its q heads attend with (KV heads replicated).
  - row-parallel (o, down): each rank holds a block of W's *columns*, matching the features
    the column-parallel layer before it produced; its output is a partial sum, so an
    all-reduce follows: one per row-parallel layer, two per decoder layer.
  - embedding: vocabulary rows split; ids outside this rank's block give zeros, and an
    all-reduce sums the one non-zero row. LM head: the same row split gives [N, V/tp]
    logits per rank, gathered to [N, V] (padded rows past the vocabulary are cut off).
Every parameter carries `tp_shard = (dim, start, size, whole length)` and `weight_loader(param, full)`
cuts that slice out of the full checkpoint tensor, so stage 1's loader runs unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from stage1_model.config import ModelConfig
from stage1_model.layers import LayerFactory, default_weight_loader


def shard_of(full, dim: int, start: int, size: int, whole: int) -> torch.Tensor:
    """full[start:start+size] along `dim`, whose length must be `whole`; zero-padded past the
    end (the last rank's vocabulary block may reach past the vocabulary). `full` is a tensor
    or a safetensors slice (`safe_open(...).get_slice(name)`): then only this part is read
    from the file, so a rank never holds a whole checkpoint tensor in memory."""
    shape = list(full.shape) if isinstance(full, torch.Tensor) else list(full.get_shape())
    if shape[dim] != whole:
        raise ValueError(f"shape mismatch: checkpoint {tuple(shape)} has {shape[dim]} "
                         f"entries along dim {dim}, the model expects {whole}")
    have = max(0, min(size, whole - start))
    if isinstance(full, torch.Tensor):
        part = full.narrow(dim, start, have)
    else:
        part = full[(slice(None),) * dim + (slice(start, start + have),)]
    if have == size:
        return part
    shape[dim] = size - have
    return torch.cat([part, part.new_zeros(shape)], dim)


def sharded_weight_loader(param: nn.Parameter, full) -> None:
    default_weight_loader(param, shard_of(full, *param.tp_shard))     # copy_ converts the dtype


sharded_weight_loader.reads_slices = True      # stage 1's loader hands it the lazy file slice


def _param(shape, shard) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape))
    p.tp_shard, p.weight_loader = shard, sharded_weight_loader
    return p


class ColumnParallelLinear(nn.Module):
    """x [T, in] -> [T, out_local]: this rank's output features. No communication."""

    def __init__(self, in_features: int, out_features: int, start: int, size: int):
        super().__init__()
        self.weight = _param((size, in_features), (0, start, size, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class RowParallelLinear(nn.Module):
    """x [T, in_local] (this rank's features) -> partial [T, out], summed over ranks.
    reduce=False returns the partial sum: the caller reduces it (fused_model's norms do,
    in one kernel with the residual add and RMSNorm that follow)."""

    def __init__(self, in_local: int, out_features: int, rank: int, tp, reduce: bool = True):
        super().__init__()
        self.tp, self.reduce = tp, reduce
        self.weight = _param((out_features, in_local), (1, rank * in_local, in_local, in_local * tp.size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = F.linear(x, self.weight)
        return self.tp.all_reduce(partial) if self.reduce else partial


class VocabParallelEmbedding(nn.Module):
    """ids [T] -> [T, hidden]; this rank holds vocabulary rows [start, start + num_local)."""

    def __init__(self, num_local: int, hidden: int, vocab: int, rank: int, tp):
        super().__init__()
        self.tp, self.start, self.num_local = tp, rank * num_local, num_local
        self.weight = _param((num_local, hidden), (0, self.start, num_local, vocab))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        mine = (local >= 0) & (local < self.num_local)                  # [T] bool
        x = F.embedding(torch.where(mine, local, 0), self.weight)       # [T, hidden]
        return self.tp.all_reduce(x * mine.unsqueeze(1).to(x.dtype))   # other ranks' ids: zeros here


class ParallelLMHead(nn.Module):
    """hidden [N, hidden] -> logits [N, vocab]: local [N, V/tp] per rank, then all-gather."""

    def __init__(self, hidden: int, num_local: int, vocab: int, rank: int, tp):
        super().__init__()
        self.tp, self.vocab = tp, vocab
        self.weight = _param((num_local, hidden), (0, rank * num_local, num_local, vocab))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_gather(F.linear(x, self.weight))[:, : self.vocab]


class TPLayerFactory(LayerFactory):
    """Stage 1's factory, handing out this rank's shard of every layer."""

    def __init__(self, cfg: ModelConfig, tp):
        self.cfg, self.tp, self.rank, self.size = cfg, tp, tp.rank, tp.size
        H, KVH, n = cfg.num_attention_heads, cfg.num_key_value_heads, tp.size
        if H % n or cfg.intermediate_size % n or (KVH % n and n % KVH):
            raise ValueError(f"tp={n} must divide the {H} attention heads and the intermediate size "
                             f"{cfg.intermediate_size}, and divide or be a multiple of the {KVH} KV heads")

    def local_heads(self, n: int) -> int:
        return max(1, n // self.size)     # fewer heads than ranks (KV only): one, replicated

    def column_shard(self, out_features: int, kind: str) -> tuple[int, int]:
        """(first row, rows) of this rank in a full [out_features, in] weight."""
        if kind == "kv":
            D = self.cfg.head_dim
            heads = out_features // D
            if heads < self.size:                       # replicated: the KV head of my q heads
                return self.rank * heads // self.size * D, D
            local = heads // self.size * D
            return self.rank * local, local
        local = out_features // self.size
        return self.rank * local, local

    def linear(self, in_features: int, out_features: int, kind: str) -> nn.Module:
        if kind in ("row", "row_partial"):       # row_partial: the output is left unreduced
            return RowParallelLinear(in_features // self.size, out_features, self.rank, self.tp,
                                     reduce=kind == "row")
        return ColumnParallelLinear(in_features, out_features, *self.column_shard(out_features, kind))

    def embedding(self, vocab: int, hidden: int) -> nn.Module:
        return VocabParallelEmbedding(-(-vocab // self.size), hidden, vocab, self.rank, self.tp)

    def lm_head(self, hidden: int, vocab: int) -> nn.Module:
        return ParallelLMHead(hidden, -(-vocab // self.size), vocab, self.rank, self.tp)


def column_shard(factory: LayerFactory, out_features: int, kind: str) -> tuple[int, int, int]:
    """(first row, rows, whole rows) of this rank in a column weight; all rows without TP."""
    if isinstance(factory, TPLayerFactory):
        return (*factory.column_shard(out_features, kind), out_features)
    return 0, out_features, out_features
