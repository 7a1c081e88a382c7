"""Decode attention bandwidth on paged KV: our Triton kernel vs FlashAttention vs torch SDPA.

    python -m bench.bench_attention                                   (GPU only)
    python -m bench.bench_attention --points 64x2048 --splits 8,16,32 --block_n 32,64 --num_warps 4,8

One decode step of one layer at Qwen3-8B shapes by default (32 query heads, 8 KV heads,
head_dim 128, bf16). Each request's KV is scattered over a shuffled pool (`--page_sizes`),
exactly as the engine stores it. Rows of the table:
  triton        stage2_runner.attention.TritonBackend (split-KV kernel, launched eagerly)
  triton-graph  the same call replayed from a CUDA graph (no launch overhead; stage 5 does this)
  fa            stage2_runner.attention.FlashBackend (gather K/V, then FA varlen)
  torch         gather every request's K/V in one indexing op, then batched SDPA (enable_gqa)
  sdpa-contig   SDPA on KV that is already contiguous: no paging, the ceiling to chase
Bandwidth = KV bytes that attention must read (B x ctx x KVH x D x 2 bytes x 2 for K and V)
divided by the median time (triton.testing.do_bench, L2 flushed between runs), shown beside
a big device-to-device copy measured in the same run (read + write bytes / time).
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import sys

import torch
from tqdm import tqdm

BACKENDS = ["triton", "triton-graph", "fa", "torch", "sdpa-contig"]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = lambda name, **kw: ap.add_argument(*dict.fromkeys([name, name.replace("_", "-")]), **kw)  # noqa: E731
    ints = lambda s: [int(x) for x in s.split(",")]                               # noqa: E731
    add("--points", default="64x2048,1x2048,256x1024,16x8192",
        help="comma list of BATCHxCONTEXT decode points")
    add("--backends", default=",".join(BACKENDS), help=f"comma list of {BACKENDS}")
    add("--num_heads", type=int, default=32)
    add("--num_kv_heads", type=int, default=8)
    add("--head_dim", type=int, default=128)
    add("--dtype", default="bfloat16", choices=sorted(DTYPES))
    add("--page_sizes", type=ints, default=[1], help="comma list; pages are shuffled in the pool")
    add("--splits", type=ints, default=[16], help="triton: comma list of num_kv_splits to sweep")
    add("--block_n", type=ints, default=None, help="triton: comma list of DECODE_BLOCK_N to sweep")
    add("--num_warps", type=ints, default=None, help="triton: comma list of num_warps to sweep")
    add("--num_stages", type=ints, default=None, help="triton: comma list of DECODE_NUM_STAGES to sweep")
    add("--copy_gib", type=float, default=4.0, help="size of the copy-bandwidth reference tensor")
    add("--seed", type=int, default=0)
    return ap


def measure_copy_bandwidth(gib: float) -> float:
    """Device-to-device copy, bytes read + written per second."""
    from triton.testing import do_bench
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    del src, dst
    return 2 * n * 2 / (ms * 1e-3)


class Point:
    """One decode step's inputs: a 1-layer KVPool filled with random K/V, paged and shuffled."""

    def __init__(self, batch: int, ctx: int, page: int, args, dtype):
        from stage2_runner.forward_batch import make_batch
        from stage2_runner.kv_cache import KVPool
        H, KVH, D = args.num_heads, args.num_kv_heads, args.head_dim
        self.batch, self.ctx, self.page = batch, ctx, page
        pages_per_req = -(-ctx // page)
        self.pool = KVPool(1, batch * pages_per_req * page, KVH, D, dtype, "cuda", page,
                           max_requests=batch, max_context=ctx)
        self.pool.k_buffers[0].normal_()
        self.pool.v_buffers[0].normal_()
        g = torch.Generator(device="cuda").manual_seed(args.seed)
        pages = torch.randperm(batch * pages_per_req, device="cuda", generator=g).view(batch, pages_per_req)
        pos = torch.arange(ctx, device="cuda")
        self.pool.req_to_token[:, :ctx] = (pages[:, pos // page] * page + pos % page).int()   # [B, ctx]
        self.q = torch.randn(batch, H, D, dtype=dtype, device="cuda")
        self.batch_info = make_batch(list(range(batch)), [ctx - 1] * batch, [[0]] * batch,
                                     torch.zeros(batch, dtype=torch.int64), "cuda")
        self.kv_bytes = 2 * batch * ctx * KVH * D * self.q.element_size()

    def gathered_kv(self):
        """K/V gathered through req_to_token: [B, KVH, ctx, D] each (a copy)."""
        slots = self.pool.req_to_token[:, :self.ctx].long()                      # [B, ctx]
        k = self.pool.k_buffers[0][slots].transpose(1, 2)
        v = self.pool.v_buffers[0][slots].transpose(1, 2)
        return k, v


def sdpa(q, k, v):
    """q [B, H, D], k/v [B, KVH, ctx, D] -> [B, H * D]."""
    out = torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True)
    return out.reshape(q.shape[0], -1)


def triton_variants(args):
    """Triton kernel settings to sweep: dicts of triton_kernels module constants + splits."""
    from stage2_runner import triton_kernels as tk
    grid = itertools.product(args.splits, args.block_n or [tk.DECODE_BLOCK_N],
                             args.num_warps or [tk.NUM_WARPS], args.num_stages or [tk.DECODE_NUM_STAGES])
    return [dict(splits=s, DECODE_BLOCK_N=n, NUM_WARPS=w, DECODE_NUM_STAGES=st) for s, n, w, st in grid]


def make_fn(name: str, p: Point, variant: dict | None):
    """A zero-argument callable running one decode attention for backend `name`."""
    from stage2_runner import attention as attn
    from stage2_runner import triton_kernels as tk
    H, D = p.q.shape[1:]
    KVH = p.pool.k_buffers[0].shape[1]
    if name.startswith("triton"):
        for key in ("DECODE_BLOCK_N", "NUM_WARPS", "DECODE_NUM_STAGES"):
            setattr(tk, key, variant[key])          # read by decode_attention at launch time
        be = attn.TritonBackend(p.pool, H, KVH, D, num_kv_splits=variant["splits"])
        return lambda: be.attend(p.q, 0, p.batch_info)
    if name == "fa":
        be = attn.FlashBackend(p.pool, H, KVH, D)
        return lambda: be.attend(p.q, 0, p.batch_info)
    if name == "torch":
        return lambda: sdpa(p.q, *p.gathered_kv())
    if name == "sdpa-contig":
        k, v = (t.contiguous() for t in p.gathered_kv())
        return lambda: sdpa(p.q, k, v)
    raise ValueError(f"unknown backend {name!r}; choose from {BACKENDS}")


def time_fn(name: str, fn) -> float:
    """Median milliseconds of one call."""
    from triton.testing import do_bench, do_bench_cudagraph
    fn()                                            # compile / warm up outside any capture
    torch.cuda.synchronize()
    if name == "triton-graph":
        return do_bench_cudagraph(fn, return_mode="median")
    return do_bench(fn, return_mode="median")


def label(name: str, variant: dict | None, many: bool) -> str:
    if not variant or not many:
        return name
    v = variant
    return f"{name} s{v['splits']} n{v['DECODE_BLOCK_N']} w{v['NUM_WARPS']} st{v['DECODE_NUM_STAGES']}"


def run(args) -> list[dict]:
    dtype = DTYPES[args.dtype]
    points = [tuple(int(x) for x in pt.split("x")) for pt in args.points.split(",")]
    backends = args.backends.split(",")
    variants = triton_variants(args)
    jobs = [(pt, page, name, var) for pt in points for page in args.page_sizes for name in backends
            for var in (variants if name.startswith("triton") else [None])]
    rows, point, ref = [], None, None
    for (b, ctx), page, name, var in tqdm(jobs, desc="decode attention", unit="run"):
        if point is None or (point.batch, point.ctx, point.page) != (b, ctx, page):
            point = None
            torch.cuda.empty_cache()
            point = Point(b, ctx, page, args, dtype)
            ref = sdpa(point.q, *point.gathered_kv()).float()
        row = dict(point=f"{b} x {ctx}", page=page, backend=label(name, var, len(variants) > 1),
                   mb=point.kv_bytes / 1e6)
        try:
            fn = make_fn(name, point, var)
            row["err"] = (fn().float() - ref).abs().max().item()   # every backend must agree with SDPA
            ms = time_fn(name, fn)
            row.update(us=ms * 1e3, tbs=point.kv_bytes / (ms * 1e-3) / 1e12)
        except Exception as e:                                      # report it, keep benchmarking
            row["failed"] = f"{type(e).__name__}: {e}".replace("|", "/").splitlines()[0][:120]
        rows.append(row)
    return rows


def print_table(rows: list[dict], copy_bw: float, args) -> None:
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}, "
          f"{args.num_heads} q / {args.num_kv_heads} kv heads, head_dim {args.head_dim}, "
          f"{datetime.date.today()}; copy bandwidth {copy_bw / 1e12:.2f} TB/s (read + write)\n")
    print("| batch x context | page | KV read | backend | time | bandwidth | % of copy | max abs err |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "failed" in r:
            print(f"| {r['point']} | {r['page']} | {r['mb']:.0f} MB | {r['backend']} | failed: {r['failed']} | | | |")
            continue
        print(f"| {r['point']} | {r['page']} | {r['mb']:.0f} MB | {r['backend']} | {r['us']:.1f} us | "
              f"{r['tbs']:.2f} TB/s | {100 * r['tbs'] * 1e12 / copy_bw:.0f}% | {r['err']:.1e} |")


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_attention needs a CUDA GPU (it times GPU kernels); none is visible here. "
                 "Run it on the device machine: python -m bench.bench_attention")
    copy_bw = measure_copy_bandwidth(args.copy_gib)
    rows = run(args)
    print_table(rows, copy_bw, args)


if __name__ == "__main__":
    main()
