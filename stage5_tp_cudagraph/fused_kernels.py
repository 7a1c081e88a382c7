"""Fused elementwise kernels for a Qwen3 decoder layer, in Triton.

A stage-1 layer launches ~65 small kernels (an RMSNorm alone is ~8: cast, square, mean,
add, rsqrt, multiply, cast, scale). In a decode step each is a launch on a few KB of data,
so the cost is the launch, not the math. These three kernels replace those chains:

    rmsnorm(x [T, N], weight [N], eps, residual=None) -> out [T, N]            (or
        -> (out, residual) when `residual` is given: residual <- x + residual, IN PLACE,
        then out = RMSNorm(residual); one kernel for "x = x + sublayer(x); norm(x)")
    qk_norm_rope(qkv [T, (H + 2*KVH) * D], q_weight [D], k_weight [D], cos/sin [P, D/2],
        positions [T], H, KVH, eps, kv_store=None) -> q [T, H, D], k [T, KVH, D], v [T, KVH, D]
        Qwen3's per-head RMSNorm of q and k, then RoPE (rotate-half), IN PLACE in qkv;
        the three results are views of qkv. With kv_store = (k_buffer [S, KVH, D],
        v_buffer [S, KVH, D], loc [T]) the same launch also writes the finished k and v
        rows into the KV pool at slots `loc` (what the attention backend's store would do).
    silu_and_mul(x [T, 2*I]) -> [T, I]: silu(gate) * up, gate = x[:, :I], up = x[:, I:]

Numerics equal stage 1's modules up to float32 summation order: RMSNorm normalises in
float32, rounds to the input dtype, then multiplies by the weight (rounded again); RoPE
computes in float32 from the float32 cos/sin cache and rounds; silu rounds before the
product, as `F.silu(g) * u` does in bf16. Rows may be strided (stride(-1) must be 1).
head_dim need not be a power of two: blocks are padded to one and masked.
No kernel reads a device value on the host, so all are CUDA-graph capturable.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

SILU_BLOCK = 1024            # columns of the intermediate size per silu_and_mul program


def num_warps_for(block: int) -> int:
    # ~256 elements per warp: 4096-wide rows get 16 warps, tiny test rows get 1.
    return max(1, min(16, block // 256))


def _check_rows(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dim() != 2 or t.stride(-1) != 1:
            raise ValueError(f"expected a 2-D tensor with unit last stride, got shape "
                             f"{tuple(t.shape)} strides {t.stride()}")


# --------------------------------------------------------------------------------------
# (residual add +) RMSNorm: one program = one token row
# --------------------------------------------------------------------------------------

@triton.jit
def _rmsnorm_kernel(X, Res, W, Out, stride_x, stride_r, stride_o, N, eps,
                    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)         # [BLOCK]
    if HAS_RESIDUAL:
        r = tl.load(Res + row * stride_r + offs, mask=mask, other=0.0)
        # Round the sum to the input dtype, as stage 1's `x + sublayer(x)` does.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(Res + row * stride_r + offs, x, mask=mask)
    norm_row(x, W, Out + row * stride_o, offs, mask, N, eps)


@triton.jit
def norm_row(x, W, Out, offs, mask, N, eps):
    """Out[offs] = RMSNorm(x) * W: x is one row [BLOCK] in the model dtype, zero past N.
    Shared with the all-reduce + add + norm kernel (symm_all_reduce.py)."""
    xf = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(xf * xf, 0) / N + eps)
    y = (xf * rstd).to(x.dtype)                                           # cast back, then scale
    w = tl.load(W + offs, mask=mask, other=0.0)
    tl.store(Out + offs, (y.to(tl.float32) * w.to(tl.float32)).to(Out.dtype.element_ty), mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm of x [T, N]; with `residual` [T, N], first residual += x (in place) and
    normalise that sum. Returns out, or (out, residual)."""
    _check_rows(x)
    T, N = x.shape
    out = torch.empty_like(x)
    if residual is not None:
        _check_rows(residual)
        assert residual.shape == x.shape and residual.dtype == x.dtype
    if T > 0:
        BLOCK = triton.next_power_of_2(N)
        res = residual if residual is not None else x      # a placeholder, never read
        _rmsnorm_kernel[(T,)](x, res, weight, out, x.stride(0), res.stride(0), out.stride(0), N, eps,
                              HAS_RESIDUAL=residual is not None, BLOCK=BLOCK,
                              num_warps=num_warps_for(BLOCK))
    return out if residual is None else (out, residual)


# --------------------------------------------------------------------------------------
# per-head q/k RMSNorm + RoPE: one program = one (token, head) of q or k
# --------------------------------------------------------------------------------------

@triton.jit
def _qk_norm_rope_kernel(QKV, QW, KW, Cos, Sin, Pos, KBuf, VBuf, Loc, stride_t, stride_cs, stride_bn, eps,
                         NUM_Q: tl.constexpr, NUM_KV: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr,
                         STORE_KV: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)          # 0..H-1: q heads; then KVH k heads; then (STORE_KV) KVH v heads
    offs = tl.arange(0, BLOCK)               # one half of the head: rotate-half pairs i, i + D/2
    mask = offs < HALF
    base = QKV + t * stride_t + h * (2 * HALF)
    x1 = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    dtype = QKV.dtype.element_ty
    if STORE_KV:
        loc = tl.load(Loc + t).to(tl.int64)
        if h >= NUM_Q + NUM_KV:              # a v head: nothing to compute, copy it to the pool
            dst = VBuf + loc * stride_bn + (h - NUM_Q - NUM_KV) * (2 * HALF)
            tl.store(dst + offs, x1.to(VBuf.dtype.element_ty), mask=mask)
            tl.store(dst + HALF + offs, x2.to(VBuf.dtype.element_ty), mask=mask)
            return

    # RMSNorm over the whole head (both halves), rounded as stage 1's q_norm/k_norm
    rstd = tl.math.rsqrt((tl.sum(x1 * x1, 0) + tl.sum(x2 * x2, 0)) / (2 * HALF) + eps)
    if h < NUM_Q:
        w_ptr = QW
    else:
        w_ptr = KW
    w1 = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    y1 = ((x1 * rstd).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
    y2 = ((x2 * rstd).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)

    # RoPE in float32 from the cos/sin row of this token's position
    pos = tl.load(Pos + t).to(tl.int64)
    cos = tl.load(Cos + pos * stride_cs + offs, mask=mask, other=0.0)
    sin = tl.load(Sin + pos * stride_cs + offs, mask=mask, other=0.0)
    o1, o2 = (y1 * cos - y2 * sin).to(dtype), (y2 * cos + y1 * sin).to(dtype)
    tl.store(base + offs, o1, mask=mask)
    tl.store(base + HALF + offs, o2, mask=mask)
    if STORE_KV:
        if h >= NUM_Q:                       # a k head: its pool row too
            dst = KBuf + loc * stride_bn + (h - NUM_Q) * (2 * HALF)
            tl.store(dst + offs, o1.to(KBuf.dtype.element_ty), mask=mask)
            tl.store(dst + HALF + offs, o2.to(KBuf.dtype.element_ty), mask=mask)


def qk_norm_rope(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                 num_heads: int, num_kv_heads: int, eps: float, kv_store=None):
    """Normalise + rotate the q and k heads of qkv [T, (H + 2*KVH) * D] in place.
    cos/sin [P, D/2] float32 (stage 1's RotaryEmbedding buffers). Returns views q, k, v.
    kv_store: (k_buffer, v_buffer, loc) to also write k and v into the KV pool (one launch
    fewer per layer than a separate store)."""
    _check_rows(qkv)
    T = qkv.shape[0]
    D = q_weight.shape[0]
    assert D % 2 == 0 and qkv.shape[1] == (num_heads + 2 * num_kv_heads) * D
    assert cos.shape == sin.shape and cos.shape[1] == D // 2 and cos.stride() == sin.stride()
    assert cos.stride(-1) == 1 and positions.shape == (T,)
    if kv_store is not None:
        k_buffer, v_buffer, loc = kv_store
        assert k_buffer.shape[1:] == v_buffer.shape[1:] == (num_kv_heads, D) and loc.shape == (T,)
        assert k_buffer.is_contiguous() and v_buffer.is_contiguous() and k_buffer.stride() == v_buffer.stride()
    else:
        k_buffer = v_buffer = loc = qkv                      # unused pointers (STORE_KV off)
    if T > 0:
        BLOCK = triton.next_power_of_2(D // 2)
        heads = num_heads + num_kv_heads * (2 if kv_store is not None else 1)
        _qk_norm_rope_kernel[(T, heads)](
            qkv, q_weight, k_weight, cos, sin, positions, k_buffer, v_buffer, loc,
            qkv.stride(0), cos.stride(0), k_buffer.stride(0), eps,
            NUM_Q=num_heads, NUM_KV=num_kv_heads, HALF=D // 2, BLOCK=BLOCK,
            STORE_KV=kv_store is not None, num_warps=1)
    q_end, k_end = num_heads * D, (num_heads + num_kv_heads) * D
    return (qkv[:, :q_end].view(T, num_heads, D), qkv[:, q_end:k_end].view(T, num_kv_heads, D),
            qkv[:, k_end:].view(T, num_kv_heads, D))


# --------------------------------------------------------------------------------------
# SiLU-and-mul: one program = (token, block of SILU_BLOCK intermediate columns)
# --------------------------------------------------------------------------------------

@triton.jit
def _silu_and_mul_kernel(X, Out, stride_x, stride_o, I, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    gate = tl.load(X + t * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + t * stride_x + I + offs, mask=mask, other=0.0).to(tl.float32)
    # silu(g) = g / (1 + e^-g), rounded to the dtype before the product (as F.silu(g) * u)
    act = (gate / (1.0 + tl.exp(-gate))).to(X.dtype.element_ty).to(tl.float32)
    tl.store(Out + t * stride_o + offs, (act * up).to(Out.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2*I] (gate | up, the merged gate_up projection) -> silu(gate) * up [T, I]."""
    _check_rows(x)
    T, two_i = x.shape
    assert two_i % 2 == 0, "the last dim must hold gate and up halves"
    I = two_i // 2
    out = torch.empty(T, I, dtype=x.dtype, device=x.device)
    if T > 0:
        BLOCK = min(SILU_BLOCK, triton.next_power_of_2(I))
        _silu_and_mul_kernel[(T, triton.cdiv(I, BLOCK))](x, out, x.stride(0), out.stride(0), I,
                                                         BLOCK=BLOCK, num_warps=num_warps_for(BLOCK))
    return out
