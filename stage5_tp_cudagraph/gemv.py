"""y = x @ W.T for a single token: a Triton matrix-vector kernel for batch-1 decode.

    linear(x [T, K], weight [N, K]) -> [T, N]     the fused model's projections (no bias in Qwen3)
    gemv(x [1, K], weight [N, K]) -> [1, N]       the kernel itself, any float dtype (tests)

At batch 1 every projection of a decoder layer is a matrix-vector product: each weight
byte is read once and used once, so its time is the weight's size over memory bandwidth.
For these shapes cuBLAS picks kernels that leave bandwidth unused on the H200 (a split-K
GEMM plus a separate reduce kernel, or too few thread blocks): 0.33-4.2 TB/s against the
~4.3 TB/s the memory gives, worst for the small matrices of Qwen3-0.6B and of TP shards
(bench/bench_gemv.py measures both side by side). This kernel is the plain algorithm:

    program p: rows [p*BLOCK_N, (p+1)*BLOCK_N) of W
      acc[BLOCK_N, BLOCK_K] = 0 (float32)
      for each BLOCK_K-wide column tile k:  acc += W[rows, k] * x[k]     (elementwise)
      y[rows] = sum of acc over its columns                               (once, at the end)

N / 2 small programs (512-12288 for Qwen3) keep the SMs' loads in flight with no split of K,
so no second kernel and no atomics; the accumulation is float32 and y is rounded once,
as cuBLAS does. `linear` takes this path for one row of bf16/fp16 on a GPU without autograd (the
decode step at batch 1, replayed from a CUDA graph or not) and F.linear everywhere else:
prefill and batches > 1 (tensor cores pay there), fp32, CPU, training.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

if os.environ.get("TRITON_INTERPRET") == "1":     # CPU: stage 2's fix for loop bounds in the interpreter
    from stage2_runner.triton_kernels import _patch_interpreter_for_numpy_2_4
    _patch_interpreter_for_numpy_2_4()

BLOCK_N = 2                  # weight rows per program: many programs, every SM busy
NUM_WARPS, NUM_STAGES = 4, 3


@triton.jit
def _gemv_kernel(X, W, Y, N, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = tl.where(mask_n, offs_n, 0).to(tl.int64)     # past the end: re-read row 0, store nothing
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = W + rows[:, None] * stride_w + offs_k[None, :]                  # [BLOCK_N, BLOCK_K]
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:                                       # no mask: full-width vector loads
            w = tl.load(w_ptrs + k0)
            x = tl.load(X + k0 + offs_k)
        else:
            mask_k = k0 + offs_k < K
            w = tl.load(w_ptrs + k0, mask=mask_k[None, :], other=0.0)
            x = tl.load(X + k0 + offs_k, mask=mask_k, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    tl.store(Y + offs_n, tl.sum(acc, 1).to(Y.dtype.element_ty), mask=mask_n)


def block_k(K: int) -> int:
    # 1024-wide tiles (2 KB of bf16 per row) where K allows; narrower for small K.
    return min(1024 if K >= 2048 else 512, triton.next_power_of_2(K))


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [1, K] @ weight [N, K].T -> [1, N] in x's dtype, by the Triton kernel."""
    N, K = weight.shape
    if x.shape != (1, K) or x.stride(-1) != 1 or weight.stride(-1) != 1 or x.dtype != weight.dtype:
        raise ValueError(f"gemv wants x [1, {K}] and a row-major weight of its dtype, got x "
                         f"{tuple(x.shape)} {x.dtype} strides {x.stride()}, weight strides {weight.stride()} "
                         f"{weight.dtype}")
    y = torch.empty(1, N, dtype=x.dtype, device=x.device)
    BLOCK_K = block_k(K)
    _gemv_kernel[(triton.cdiv(N, BLOCK_N),)](x, weight, y, N, K, weight.stride(0), BLOCK_N=BLOCK_N,
                                             BLOCK_K=BLOCK_K, EVEN_K=K % BLOCK_K == 0,
                                             num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return y


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight), by the GEMV kernel for one bf16/fp16 row on a GPU."""
    if x.is_cuda and x.dim() == 2 and x.shape[0] == 1 and x.dtype in (torch.bfloat16, torch.float16) \
            and weight.dtype == x.dtype and x.stride(-1) == 1 and weight.stride(-1) == 1 \
            and weight.numel() > 0 and not torch.is_grad_enabled():      # the kernel has no backward
        return gemv(x, weight)
    return F.linear(x, weight)
