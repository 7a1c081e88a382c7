"""Paged attention backends behind one interface (the stage-1 attention seam).

    backend(q [T, H, D], k [T, KVH, D], v [T, KVH, D], layer_id, batch) -> [T, H * D]

Every backend first stores the new K/V into the pool at `batch.out_cache_loc`, then lets
each new token attend to its request's whole history through `req_to_token`:
  torch   reference: per request, gather K/V rows and call SDPA (CPU and GPU)
  triton  our kernels (stage2_runner/triton_kernels.py): split-KV decode, paged extend
  fa      FlashAttention varlen on gathered K/V: the flash-attn package if importable,
          else torch's bundled FA2 (torch.nn.attention.varlen.varlen_attn); CUDA only
"""
from __future__ import annotations

import logging

import torch

from stage1_model.generate import causal_attention
from stage2_runner.forward_batch import ForwardBatch
from stage2_runner.kv_cache import KVPool

log = logging.getLogger(__name__)


class AttentionBackend:
    def __init__(self, pool: KVPool, num_heads: int, num_kv_heads: int, head_dim: int):
        self.pool = pool
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5

    def __call__(self, q, k, v, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        self.pool.write(layer_id, batch.out_cache_loc, k, v)
        return self.attend(q, layer_id, batch)

    def gather(self, layer_id: int, row: int, length: int):
        """K/V of one request: [length, KVH, D] each (a copy out of the pool)."""
        slots = self.pool.req_to_token[row, :length].long()
        return self.pool.k_buffers[layer_id][slots], self.pool.v_buffers[layer_id][slots]


class TorchBackend(AttentionBackend):
    name = "torch"

    def attend(self, q, layer_id, batch):
        out = torch.empty(q.shape[0], self.num_heads * self.head_dim, dtype=q.dtype, device=q.device)
        rows = batch.req_pool_indices.tolist()
        start = 0
        for row, n_kv, n_new in zip(rows, batch.seq_lens_cpu, batch.extend_lens_cpu):
            k, v = self.gather(layer_id, row, n_kv)
            out[start:start + n_new] = causal_attention(q[start:start + n_new], k.to(q.dtype), v.to(q.dtype))
            start += n_new
        return out


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class TritonBackend(AttentionBackend):
    name = "triton"

    def __init__(self, pool, num_heads, num_kv_heads, head_dim, num_kv_splits: int = 16):
        super().__init__(pool, num_heads, num_kv_heads, head_dim)
        max_batch = pool.req_to_token.shape[0]           # one workspace row per possible request
        from stage2_runner import triton_kernels as tk
        self.tk = tk
        self.num_kv_splits = num_kv_splits
        dev = pool.req_to_token.device
        self.num_sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 0
        self.workspace = tk.alloc_decode_workspace(max_batch, num_heads, num_kv_splits, head_dim, device=dev)

    def splits_for(self, batch_size: int) -> int:
        """KV splits per request: enough (KV head, request, split) programs for ~4 waves over
        the SMs, no more: a big batch fills the GPU by itself and extra splits are only
        empty programs (at 64 x 8 x 16 they cost more than the attention). Depends on the
        batch size only, so a captured graph keeps its grid."""
        if not self.num_sms:
            return self.num_kv_splits
        want = -(-4 * self.num_sms // (batch_size * self.num_kv_heads))
        return max(1, min(self.num_kv_splits, triton_next_pow2(want)))

    def __call__(self, q, k, v, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        self.tk.store_kv(k, v, self.pool.k_buffers[layer_id], self.pool.v_buffers[layer_id], batch.out_cache_loc)
        return self.attend(q, layer_id, batch)

    def attend(self, q, layer_id, batch):
        out = torch.empty_like(q)
        kb, vb = self.pool.k_buffers[layer_id], self.pool.v_buffers[layer_id]
        if batch.is_decode:
            self.tk.decode_attention(q, kb, vb, out, self.pool.req_to_token, batch.req_pool_indices,
                                     batch.seq_lens, self.scale, num_kv_splits=self.splits_for(q.shape[0]),
                                     workspace=self.workspace)
        else:
            self.tk.extend_attention(q, kb, vb, out, self.pool.req_to_token, batch.req_pool_indices,
                                     batch.prefix_lens, batch.extend_lens, batch.extend_start_loc,
                                     batch.max_extend_len, self.scale)
        return out.view(q.shape[0], -1)


def _flash_varlen():
    """(name, fn(q, k, v, cu_q, cu_k, max_q, max_k, scale) -> out) of the best FA available."""
    try:
        from flash_attn import flash_attn_varlen_func
        return "flash-attn package", lambda q, k, v, cq, ck, mq, mk, s: flash_attn_varlen_func(
            q, k, v, cq, ck, mq, mk, softmax_scale=s, causal=True)
    except ImportError:
        import inspect
        from torch.nn.attention.varlen import varlen_attn
        params = inspect.signature(varlen_attn).parameters    # its keywords changed across torch releases
        kw = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
        gqa = "enable_gqa" in params
        if gqa:
            kw["enable_gqa"] = True

        def fa(q, k, v, cq, ck, mq, mk, s):
            if not gqa and k.shape[1] != q.shape[1]:
                rep = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            return varlen_attn(q, k, v, cq, ck, mq, mk, scale=s, **kw)
        return "torch varlen_attn (bundled FlashAttention-2)", fa


class FlashBackend(AttentionBackend):
    """Causal varlen FA with bottom-right alignment: query i of a request with k new
    tokens over n keys sees keys 0..n-k+i."""
    name = "fa"

    def __init__(self, pool, num_heads, num_kv_heads, head_dim):
        super().__init__(pool, num_heads, num_kv_heads, head_dim)
        if not pool.req_to_token.is_cuda:
            raise ValueError("attention_backend 'fa' needs CUDA; use 'torch' on CPU")
        self.impl_name, self.fn = _flash_varlen()
        log.info("fa backend runs: %s", self.impl_name)

    def attend(self, q, layer_id, batch):
        # Gather every request's K/V into one packed [sum(seq_lens), KVH, D] tensor with a
        # single index op: slot of packed key j = req_to_token[row of j, position of j].
        dev, seq = q.device, batch.seq_lens_cpu
        total = sum(seq)
        cu_k = torch.tensor([0] + seq, device=dev).cumsum(0)
        lens = batch.seq_lens.long()
        rows = torch.repeat_interleave(batch.req_pool_indices, lens, output_size=total)
        pos = torch.arange(total, device=dev) - torch.repeat_interleave(cu_k[:-1], lens, output_size=total)
        slots = self.pool.req_to_token[rows, pos].long()
        k, v = self.pool.k_buffers[layer_id][slots], self.pool.v_buffers[layer_id][slots]
        cu_q = torch.tensor([0] + batch.extend_lens_cpu, device=dev).cumsum(0).int()
        out = self.fn(q, k, v, cu_q, cu_k.int(), max(batch.extend_lens_cpu), max(seq), self.scale)
        return out.reshape(q.shape[0], -1)


BACKENDS = {"torch": TorchBackend, "triton": TritonBackend, "fa": FlashBackend, "fa3": FlashBackend}


def make_backend(name: str, pool: KVPool, num_heads: int, num_kv_heads: int, head_dim: int) -> AttentionBackend:
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {sorted(BACKENDS)}, got {name!r}")
    backend = BACKENDS[name](pool, num_heads, num_kv_heads, head_dim)
    log.info("Attention backend: %s", backend.name)
    return backend
