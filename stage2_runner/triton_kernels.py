"""Paged attention in Triton: split-KV decode (flash-decoding) and causal extend.

Contract (the `triton` backend in attention.py calls these two functions):

    decode_attention(q [B, H, D], k_buffer/v_buffer [slots, KVH, D], out [B, H, D],
                     req_to_token [rows, max_ctx] int32, req_pool_indices [B], seq_lens [B] int32,
                     scale, num_kv_splits, workspace)
        request b's single query attends to its positions 0 .. seq_lens[b]-1.
    extend_attention(q [T, H, D], k_buffer, v_buffer, out [T, H, D], req_to_token,
                     req_pool_indices, prefix_lens, extend_lens, extend_start_loc,
                     max_extend_len, scale)
        new token i of request b (row extend_start_loc[b] + i of q) attends to positions
        0 .. prefix_lens[b] + i.

    store_kv(k [T, KVH, D], v [T, KVH, D], k_buffer, v_buffer, loc [T])
        k_buffer[loc[t]] = k[t] and v_buffer[loc[t]] = v[t], in one launch (k, v may be
        strided views, e.g. of a merged qkv output).

The attention kernels read every K/V row through req_to_token (position -> slot), so any page size and any
slot layout works. The new tokens' K/V must already be in the pool (the backend writes
first, then attends). Softmax runs in float32 with exp2 (scores are pre-multiplied by
log2(e)); inputs may be fp32, fp16 or bf16. head_dim need not be a power of two: the
kernels pad it to BLOCK_D and mask.

decode_attention never reads a device value on the host (no .item(), no max(seq_lens)):
the grid depends only on shapes and `num_kv_splits`, so it can be captured in a CUDA graph.
Each split covers ceil(seq_len / splits) positions rounded up to BLOCK_N, computed inside
the kernel; short sequences simply leave the trailing splits empty.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

def _patch_interpreter_for_numpy_2_4() -> None:
    """Under TRITON_INTERPRET=1 (CPU), Triton 3.6's interpreter does int(ndarray of shape (1,))
    for `range(start, end)` bounds that are loaded scalars, which numpy >= 2.4 refuses
    (triton-lang/triton#9171, fixed upstream by #9172). Take the single element explicitly,
    so a reader can run and step through these kernels on a laptop."""
    from triton.runtime import interpreter
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "numpy_fix", False):   # another release, or done
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    patched.numpy_fix = True
    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_interpreter_for_numpy_2_4()

LOG2E = 1.4426950408889634   # exp(x) == exp2(x * log2(e))

# Defaults chosen for the H200 (not autotuned, so the code stays readable).
DECODE_BLOCK_N = 64          # KV positions per inner step of a split
DECODE_NUM_STAGES = 2        # software-pipelined K/V loads in flight per decode program
EXTEND_BLOCK_M = 64          # query rows per extend program
EXTEND_BLOCK_N = 64          # KV positions per extend inner step
NUM_WARPS, NUM_STAGES = 4, 2


def _pow2(n: int, at_least: int = 16) -> int:
    """Block size for a dim of n: a power of two, >= 16 so that tl.dot accepts it."""
    return max(at_least, triton.next_power_of_2(n))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (tf32 would cost ~1e-3 relative error); others ignore it.
    return "ieee" if dtype == torch.float32 else "tf32"


# --------------------------------------------------------------------------------------
# decode, stage 1: one program = (KV head, request, split); all query heads of the group
# --------------------------------------------------------------------------------------

@triton.jit
def _decode_split_kernel(
    Q, K, V, ReqToToken, ReqPoolIdx, SeqLens, PartO, PartLse,
    stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_r2t,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    qk_scale,                                   # softmax scale * log2(e)
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FINAL: tl.constexpr,                        # one split: PartO is the output [B, H, D], no LSE
):
    # KV head is the fastest grid axis: a request's KV heads run side by side and read the same
    # tokens' rows (KVH x D contiguous per slot) together, which DRAM serves better.
    kvh, b, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(SeqLens + b)
    row = tl.load(ReqPoolIdx + b).to(tl.int64)
    # This split's positions [start, end): a whole number of BLOCK_N blocks each.
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_h = tl.arange(0, BLOCK_H)              # query heads of this KV group (padded to >= 16)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + offs_h
    mask_h, mask_d = offs_h < GROUP, offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_h[:, None] & mask_d[None, :], other=0.0)           # [BLOCK_H, BLOCK_D]
    q = q.to(K.dtype.element_ty)

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)   # running max (log2 units)
    l = tl.zeros([BLOCK_H], tl.float32)                 # running sum of exp2
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)      # running weighted sum of V
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        slots = tl.load(ReqToToken + row * stride_r2t + offs_n, mask=mask_n, other=0).to(tl.int64)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + slots[:, None] * stride_kn + kvh * stride_kh + offs_d[None, :],
                    mask=kv_mask, other=0.0)                                  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_H, BLOCK_N]
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m - m_new)                 # rescales what was summed so far
        v = tl.load(V + slots[:, None] * stride_vn + kvh * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0)                                  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        l = l * alpha + tl.sum(p, 1)
        m = m_new

    # An empty split (start >= end) reports lse = -inf, so stage 2 gives it weight 0.
    has_keys = end > start
    o = tl.where(has_keys, acc / tl.where(has_keys, l, 1.0)[:, None], 0.0)
    lse = tl.where(has_keys, m + tl.math.log2(tl.where(has_keys, l, 1.0)), float("-inf"))
    o_ptr = PartO + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :]
    tl.store(o_ptr, o.to(PartO.dtype.element_ty), mask=mask_h[:, None] & mask_d[None, :])
    if not FINAL:
        tl.store(PartLse + b * stride_lb + heads * stride_lh + split, lse, mask=mask_h)


# --------------------------------------------------------------------------------------
# decode, stage 2: one program = (request, query head); merge the splits by their LSE
# --------------------------------------------------------------------------------------

@triton.jit
def _decode_reduce_kernel(
    PartO, PartLse, Out,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh,
    HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b, h = tl.program_id(0), tl.program_id(1)
    offs_s, offs_d = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_D)
    mask_s, mask_d = offs_s < NUM_SPLITS, offs_d < HEAD_DIM
    lse = tl.load(PartLse + b * stride_lb + h * stride_lh + offs_s, mask=mask_s,
                  other=float("-inf"))                                        # [BLOCK_S]
    o = tl.load(PartO + b * stride_ob + h * stride_oh + offs_s[:, None] * stride_os + offs_d[None, :],
                mask=mask_s[:, None] & mask_d[None, :], other=0.0)            # [BLOCK_S, BLOCK_D]
    # softmax over splits: weight_i = 2^(lse_i - max) / sum_j 2^(lse_j - max)
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)   # seq_len 0 (padding): all empty
    w = tl.math.exp2(lse - lse_max)
    denom = tl.maximum(tl.sum(w, 0), 1e-30)
    out = tl.sum(o * w[:, None], 0) / denom                                   # [BLOCK_D]
    tl.store(Out + b * stride_outb + h * stride_outh + offs_d, out.to(Out.dtype.element_ty), mask=mask_d)


def alloc_decode_workspace(max_batch: int, num_heads: int, num_kv_splits: int, head_dim: int,
                           device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-split partial outputs [max_batch, H, splits, D] and their LSE [max_batch, H, splits],
    float32. Allocated once so decode allocates nothing (CUDA-graph friendly)."""
    part_o = torch.empty(max_batch, num_heads, num_kv_splits, head_dim, dtype=torch.float32, device=device)
    part_lse = torch.empty(max_batch, num_heads, num_kv_splits, dtype=torch.float32, device=device)
    return part_o, part_lse


def decode_attention(q, k_buffer, v_buffer, out, req_to_token, req_pool_indices, seq_lens, scale,
                     num_kv_splits: int = 16, workspace=None):
    """One new token per request over its paged KV. q/out [B, H, D]; writes `out`."""
    B, H, D = q.shape
    KVH = k_buffer.shape[1]
    assert H % KVH == 0 and k_buffer.stride(-1) == 1 and v_buffer.stride(-1) == 1
    assert q.stride(-1) == 1 and out.stride(-1) == 1 and req_to_token.stride(-1) == 1
    if workspace is None:
        workspace = alloc_decode_workspace(B, H, num_kv_splits, D, q.device)
    part_o, part_lse = workspace
    if part_o.shape[0] < B or part_o.shape[1] != H or part_o.shape[2] < num_kv_splits or part_o.shape[3] != D:
        raise ValueError(f"decode workspace {tuple(part_o.shape)} does not fit batch {B} x "
                         f"{H} heads x {num_kv_splits} splits x head_dim {D}")
    group = H // KVH
    BLOCK_D = _pow2(D)
    # One split (big batches fill the GPU by themselves): the split kernel normalises and
    # writes `out` itself, and the reduce launch is skipped.
    final = num_kv_splits == 1
    o_dst, o_strides = (out, (out.stride(0), out.stride(1), 0)) if final else \
        (part_o, (part_o.stride(0), part_o.stride(1), part_o.stride(2)))
    _decode_split_kernel[(KVH, B, num_kv_splits)](
        q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, o_dst, part_lse,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1), req_to_token.stride(0),
        *o_strides, part_lse.stride(0), part_lse.stride(1),
        scale * LOG2E,
        GROUP=group, HEAD_DIM=D, NUM_SPLITS=num_kv_splits, BLOCK_H=_pow2(group), BLOCK_D=BLOCK_D,
        BLOCK_N=DECODE_BLOCK_N, DOT_PRECISION=_dot_precision(k_buffer.dtype), FINAL=final,
        num_warps=NUM_WARPS, num_stages=DECODE_NUM_STAGES)
    if final:
        return out
    _decode_reduce_kernel[(B, H)](
        part_o, part_lse, out,
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=D, NUM_SPLITS=num_kv_splits, BLOCK_S=triton.next_power_of_2(num_kv_splits),
        BLOCK_D=BLOCK_D, num_warps=NUM_WARPS)
    return out


# --------------------------------------------------------------------------------------
# extend: one program = (request, query head, block of BLOCK_M new tokens)
# --------------------------------------------------------------------------------------

@triton.jit
def _extend_kernel(
    Q, K, V, Out, ReqToToken, ReqPoolIdx, PrefixLens, ExtendLens, ExtendStart,
    stride_qt, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_ot, stride_oh, stride_r2t,
    qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    b, h, mblk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ext_len = tl.load(ExtendLens + b)
    if mblk * BLOCK_M >= ext_len:                # this request has fewer new tokens
        return
    prefix = tl.load(PrefixLens + b)
    t0 = tl.load(ExtendStart + b).to(tl.int64)   # request's first row in q/out
    row = tl.load(ReqPoolIdx + b).to(tl.int64)
    kvh = h // GROUP

    offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)     # new-token index within the request
    offs_d = tl.arange(0, BLOCK_D)
    mask_m, mask_d = offs_m < ext_len, offs_d < HEAD_DIM
    q_pos = prefix + offs_m                             # absolute position of each query
    q = tl.load(Q + (t0 + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)           # [BLOCK_M, BLOCK_D]
    q = q.to(K.dtype.element_ty)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Keys 0 .. last query's position; key 0 is visible to every row, so m is finite after block 0.
    kv_end = prefix + tl.minimum((mblk + 1) * BLOCK_M, ext_len)
    for n0 in range(0, kv_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < kv_end
        slots = tl.load(ReqToToken + row * stride_r2t + offs_n, mask=mask_n, other=0).to(tl.int64)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + slots[:, None] * stride_kn + kvh * stride_kh + offs_d[None, :],
                    mask=kv_mask, other=0.0)                                  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        causal = (offs_n[None, :] <= q_pos[:, None]) & mask_n[None, :]
        s = tl.where(causal, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m - m_new)
        v = tl.load(V + slots[:, None] * stride_vn + kvh * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0)                                  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        l = l * alpha + tl.sum(p, 1)
        m = m_new

    o = acc / l[:, None]
    tl.store(Out + (t0 + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             o.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def extend_attention(q, k_buffer, v_buffer, out, req_to_token, req_pool_indices, prefix_lens,
                     extend_lens, extend_start_loc, max_extend_len: int, scale):
    """Causal attention of each request's new tokens over prefix + themselves. q/out [T, H, D]."""
    T, H, D = q.shape
    B, KVH = req_pool_indices.shape[0], k_buffer.shape[1]
    assert H % KVH == 0 and k_buffer.stride(-1) == 1 and v_buffer.stride(-1) == 1
    assert q.stride(-1) == 1 and out.stride(-1) == 1 and req_to_token.stride(-1) == 1
    if T == 0 or max_extend_len == 0:
        return out
    grid = (B, H, triton.cdiv(max_extend_len, EXTEND_BLOCK_M))
    _extend_kernel[grid](
        q, k_buffer, v_buffer, out, req_to_token, req_pool_indices, prefix_lens, extend_lens,
        extend_start_loc,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1), out.stride(0), out.stride(1), req_to_token.stride(0),
        scale * LOG2E,
        GROUP=H // KVH, HEAD_DIM=D, BLOCK_M=EXTEND_BLOCK_M, BLOCK_N=EXTEND_BLOCK_N, BLOCK_D=_pow2(D),
        DOT_PRECISION=_dot_precision(k_buffer.dtype), num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out


# --------------------------------------------------------------------------------------
# KV store: one program = one new token; writes its K and V rows into the pool
# --------------------------------------------------------------------------------------

@triton.jit
def _store_kv_kernel(K, V, KBuf, VBuf, Loc, stride_kt, stride_kh, stride_vt, stride_vh, stride_bn, stride_bh,
                     KVH: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    loc = tl.load(Loc + t).to(tl.int64)
    offs_h, offs_d = tl.arange(0, BLOCK_H), tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < KVH) & (offs_d[None, :] < HEAD_DIM)
    dst = loc * stride_bn + offs_h[:, None] * stride_bh + offs_d[None, :]
    k = tl.load(K + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    tl.store(KBuf + dst, k.to(KBuf.dtype.element_ty), mask=mask)
    v = tl.load(V + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    tl.store(VBuf + dst, v.to(VBuf.dtype.element_ty), mask=mask)


def store_kv(k, v, k_buffer, v_buffer, loc):
    """Write new K/V rows into the pool at slots `loc` [T]: one launch instead of two index_put."""
    T, KVH, D = k.shape
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and k_buffer.is_contiguous() and v_buffer.is_contiguous()
    if T == 0:
        return
    _store_kv_kernel[(T,)](k, v, k_buffer, v_buffer, loc, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                           k_buffer.stride(0), k_buffer.stride(1), KVH=KVH, HEAD_DIM=D,
                           BLOCK_H=triton.next_power_of_2(KVH), BLOCK_D=triton.next_power_of_2(D), num_warps=4)
