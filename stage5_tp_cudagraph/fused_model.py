"""Qwen3 with merged projections and fused kernels: the fast twin of stage 1's model.

Contract: `load_fused_model(model_dir, dtype, device, load_format, factory, cfg)` takes the
same arguments as stage 1's `load_model` and returns a `FusedQwen3ForCausalLM` with the
same interface: `forward(input_ids [T], positions [T], attn, batch) -> hidden [T, hidden]`,
`compute_logits(hidden) -> [N, vocab] float32`, the attention seam
`attn(q [T, H, D], k [T, KVH, D], v [T, KVH, D], layer_id, batch) -> [T, H * D]`, and
`model.layers[i].self_attn.num_heads / num_kv_heads`. So stage 2's ModelRunner and its
paged backends run it unchanged (q, k, v arrive as strided views of one qkv buffer).

What differs from stage 1, per layer (~12 launches instead of ~65):
  - q/k/v is one GEMM (`qkv_proj`), gate/up is one GEMM (`gate_up_proj`). Checkpoints keep
    the separate HF tensors; PACKED_MODULES says which checkpoint tensor fills which slice,
    and the merged weight's `weight_loader(param, tensor, shard)` copies it there.
    Under tensor parallelism each part contributes only this rank's rows (its q heads, its
    KV heads, its gate/up features): the merged GEMM stays column-parallel (tp_layers.py).
  - residual add + RMSNorm, q/k norm + RoPE and SiLU-and-mul are one Triton kernel each
    (fused_kernels.py). The four projections call gemv.linear: a Triton matrix-vector
    kernel for one token (batch-1 decode), cuBLAS otherwise. The modules stay for their
    weights (and weight loaders); forward reads `.weight`, which under TP is this rank's
    shard, so o_proj/down_proj give the partial sums the next norm all-reduces.
    The residual stream is carried between layers, SGLang-style:
    each layer returns (sublayer output, residual) and the next norm adds them. Under TP
    that norm also does the all-reduce of the row-parallel output (symm_all_reduce.py).
Stage 1 stays the readable reference; tests/stage5/test_fused_model.py checks the two agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from stage1_model.config import ModelConfig, load_config
from stage1_model.layers import LayerFactory, RMSNorm, RotaryEmbedding
from stage1_model.model import Qwen3ForCausalLM, Qwen3Model
from stage1_model.weights import build_model, fill_dummy, load_safetensors
from stage5_tp_cudagraph import fused_kernels as fk
from stage5_tp_cudagraph.gemv import linear
from stage5_tp_cudagraph.tp_layers import column_shard, shard_of

# merged module -> the checkpoint modules it holds, in output-row order
PACKED_MODULES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


# ---------------------------------------------------------------- packed weight loading

def packed_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard: str) -> None:
    """Copy one checkpoint tensor (e.g. k_proj.weight) into its rows of the merged weight;
    under tensor parallelism, only this rank's rows of it (`tp_rows`: first row, rows, all rows)."""
    start, size = param.shards[shard]
    loaded = shard_of(loaded, 0, *param.tp_rows[shard])   # this rank's k heads, say (all at TP=1)
    target = param.data.narrow(0, start, size)            # rows [start, start + size): a view
    if target.shape != loaded.shape:
        raise ValueError(f"shape mismatch: {shard} slice {tuple(target.shape)} "
                         f"vs checkpoint {tuple(loaded.shape)}")
    target.copy_(loaded)


def merged_linear(factory: LayerFactory, in_features: int, merged: str, parts: list[tuple[int, str]]) -> nn.Module:
    """One column linear whose output rows are the concatenation of PACKED_MODULES[merged];
    parts: (full rows, TP kind) of each. Under TP each part contributes this rank's rows
    (its q heads, its KV heads, its gate/up features), so the merged GEMM needs no
    communication: it is a column-parallel layer made of several column-parallel ones."""
    tp_rows = [column_shard(factory, rows, kind) for rows, kind in parts]   # (first row, rows, all) per part
    sizes = [size for _, size, _ in tp_rows]
    layer = LayerFactory().linear(in_features, sum(sizes), "column")        # the local rows only
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    names = PACKED_MODULES[merged]
    layer.weight.shards = dict(zip(names, zip(offsets, sizes)))  # name -> (row, rows) in the merged weight
    layer.weight.tp_rows = dict(zip(names, tp_rows))             # name -> (row, rows, all) in the checkpoint
    layer.weight.weight_loader = packed_weight_loader
    return layer


@dataclass
class ShardTarget:
    """Stands for a checkpoint tensor that fills one slice of a merged parameter."""
    param: nn.Parameter
    shard: str

    @property
    def dtype(self) -> torch.dtype:
        return self.param.dtype

    def weight_loader(self, _target, loaded) -> None:
        packed_weight_loader(self.param, loaded, self.shard)

    weight_loader.reads_slices = True           # reads only its rows (shard_of) from the file


class CheckpointView:
    """The model as stage 1's `load_safetensors` sees it: its config and checkpoint name ->
    target. A merged weight 'x.qkv_proj.weight' appears as 'x.q_proj.weight', 'x.k_proj.weight',
    'x.v_proj.weight', so the loader's missing/unexpected-tensor checks work per tensor."""

    def __init__(self, model: nn.Module):
        self.config = model.config
        self.targets = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if not hasattr(p, "shards"):
                self.targets[name] = p
                continue
            module, leaf = name.rsplit(".", 1)            # 'model.layers.0.self_attn.qkv_proj', 'weight'
            parent = module.rsplit(".", 1)[0]
            for shard in p.shards:
                self.targets[f"{parent}.{shard}.{leaf}"] = ShardTarget(p, shard)

    def named_parameters(self, remove_duplicate: bool = False):
        return self.targets.items()


# ---------------------------------------------------------------- modules

class FusedRMSNorm(RMSNorm):
    """Stage 1's RMSNorm parameters; forward(x, residual=None) is one fused kernel.
    Under TP (`tp` set), an x given with a residual is a row-parallel layer's partial sum:
    the all-reduce joins the same kernel (tp.all_reduce_add_rmsnorm)."""
    tp = None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is not None and self.tp is not None:
            return self.tp.all_reduce_add_rmsnorm(x, residual, self.weight, self.eps)
        return fk.rmsnorm(x, self.weight, self.eps, residual)


class FusedAttention(nn.Module):
    # Same attributes as stage 1's Qwen3Attention (ModelRunner reads num_heads/num_kv_heads).
    def __init__(self, cfg: ModelConfig, layer_id: int, factory: LayerFactory):
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = D = cfg.head_dim
        self.num_heads = factory.local_heads(cfg.num_attention_heads)
        self.num_kv_heads = factory.local_heads(cfg.num_key_value_heads)
        H, KVH = cfg.num_attention_heads, cfg.num_key_value_heads
        # qkv rows: [q heads | k heads | v heads], the order qk_norm_rope expects
        self.qkv_proj = merged_linear(factory, cfg.hidden_size, "qkv_proj",
                                      [(H * D, "column"), (KVH * D, "kv"), (KVH * D, "kv")])
        self.o_proj = factory.linear(H * D, cfg.hidden_size, "row_partial")    # reduced by the next norm
        self.q_norm = RMSNorm(D, cfg.rms_norm_eps)         # parameters only: the kernel applies them
        self.k_norm = RMSNorm(D, cfg.rms_norm_eps)

    def forward(self, x, positions, rope: RotaryEmbedding, attn, batch):
        qkv = linear(x, self.qkv_proj.weight)              # [T, (H + 2*KVH) * D], one GEMM
        # A paged backend (stage 2: `pool` + `attend`) gets its K/V rows written by the
        # RoPE kernel itself; any other attention callable stores them as usual.
        pool = getattr(attn, "pool", None) if hasattr(attn, "attend") else None
        store = None if pool is None else (pool.k_buffers[self.layer_id], pool.v_buffers[self.layer_id],
                                           batch.out_cache_loc)
        q, k, v = fk.qk_norm_rope(qkv, self.q_norm.weight, self.k_norm.weight, rope.cos, rope.sin,
                                  positions, self.num_heads, self.num_kv_heads, self.q_norm.eps, store)
        out = attn.attend(q, self.layer_id, batch) if store else attn(q, k, v, self.layer_id, batch)
        return linear(out, self.o_proj.weight)             # partial under TP: no reduce here


class FusedMLP(nn.Module):
    def __init__(self, hidden: int, inter: int, factory: LayerFactory):
        super().__init__()
        self.gate_up_proj = merged_linear(factory, hidden, "gate_up_proj", [(inter, "column"), (inter, "column")])
        self.down_proj = factory.linear(inter, hidden, "row_partial")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = linear(x, self.gate_up_proj.weight)                 # [T, 2I]
        return linear(fk.silu_and_mul(gate_up), self.down_proj.weight)  # [T, I] -> [T, hidden]


class FusedDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, factory: LayerFactory):
        super().__init__()
        self.self_attn = FusedAttention(cfg, layer_id, factory)
        self.mlp = FusedMLP(cfg.hidden_size, cfg.intermediate_size, factory)
        self.input_layernorm = FusedRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = FusedRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, positions, rope, attn, batch):
        """x: the previous sublayer's output (or the embeddings, with residual None).
        Returns (this layer's MLP output, residual stream before it)."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)       # residual += x; h = norm(residual)
        h = self.self_attn(h, positions, rope, attn, batch)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class FusedQwen3Model(Qwen3Model):
    layer_cls, norm_cls = FusedDecoderLayer, FusedRMSNorm


class FusedQwen3ForCausalLM(Qwen3ForCausalLM):
    """Stage 1's model with the fused classes; only the forward differs: the residual stream
    travels between layers so each norm can add it in the same kernel. compute_logits is
    stage 1's."""
    model_cls = FusedQwen3Model

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn, batch=None) -> torch.Tensor:
        # residual: running sum of the embeddings and every sublayer output, [T, hidden]
        x, residual = self.model.embed_tokens(input_ids), None      # [T, hidden]
        for layer in self.model.layers:
            x, residual = layer(x, residual, positions, self.rope, attn, batch)
        return self.model.norm(x, residual)[0]                      # final add + norm


# ---------------------------------------------------------------- building and loading

def build_fused_model(cfg: ModelConfig, dtype: torch.dtype, device,
                      factory: LayerFactory | None = None) -> FusedQwen3ForCausalLM:
    model = build_model(cfg, dtype, device, factory, model_cls=FusedQwen3ForCausalLM)
    # Under TP, o_proj/down_proj leave their outputs partial ("row_partial") and every norm
    # that adds a sublayer output to the residual stream all-reduces it first.
    for module in model.modules():
        if isinstance(module, FusedRMSNorm):
            module.tp = getattr(factory, "tp", None)
    return model


def init_dummy_as_stage1(model: nn.Module, cfg: ModelConfig, dtype: torch.dtype, device, seed: int = 0,
                         std: float = 0.02) -> None:
    """Dummy weights equal to stage 1's `init_dummy` for the same seed: the same draws, in
    stage 1's parameter order, routed into the merged weights through the checkpoint view
    (so a benchmark can hand HF or the stage-1 model exactly the weights we serve)."""
    view = CheckpointView(model).targets
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, meta in build_model(cfg, dtype, "meta").named_parameters():
        tensor = torch.empty(meta.shape, dtype=dtype, device=device)
        fill_dummy(name, tensor, gen, std)
        target = view[name]
        target.weight_loader(target, tensor)


def load_fused_model(model_dir: str | Path, dtype: torch.dtype = torch.float32, device="cpu",
                     load_format: str = "auto", factory: LayerFactory | None = None,
                     cfg: ModelConfig | None = None) -> FusedQwen3ForCausalLM:
    """Drop-in for stage 1's load_model: same arguments, same checkpoint files."""
    model_dir = Path(model_dir)
    cfg = cfg or load_config(model_dir)
    model = build_fused_model(cfg, dtype, device, factory)
    fill_weights(model, model_dir, load_format, cfg, dtype, device)
    return model


def fill_weights(model: nn.Module, model_dir: Path, load_format: str, cfg: ModelConfig, dtype, device) -> None:
    """Checkpoint or dummy weights through every parameter's weight_loader: works for the
    fused and the stage-1 model, whole or sharded by a TP factory (each rank gets its slice
    of the same full tensors, so TP=N and TP=1 hold the same model)."""
    # Stage 1's loader reads the view: checkpoint names, missing/unexpected checks, progress.
    if load_format == "dummy":
        init_dummy_as_stage1(model, cfg, dtype, device)
    elif load_format == "auto":
        load_safetensors(CheckpointView(model), Path(model_dir))
    else:
        raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
