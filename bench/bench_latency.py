"""Decode latency per token at fixed batch sizes, next to the limit measured in the same run.

    python -m bench.bench_latency --model configs/qwen3-8b --load_format dummy --batch_sizes 1 8 64
    python -m bench.bench_latency --model demo --device cpu --batch_sizes 1 --output_len 16   (smoke)

For each batch size B: B random prompts of --input_len tokens, greedy, ignore_eos,
--output_len new tokens each, through the newest stage Engine (CUDA graphs + overlap unless
disabled). Decode ms/token = time from the first sampled token to the last / (output_len - 1).

With --tp N the Engine spawns ranks 1..N-1 (one GPU each) and the limit is rank 0's shard
of the chain (all-reduces not included).

The limit (GPU only): every weight GEMM of one decode step (q, k, v, o, gate, up, down of
each layer, and the LM head) on the model's own weights, at batch B, captured in ONE CUDA
graph and replayed: what a decode step costs with no attention, no norms, no launch gaps.
Printed side by side with the ratio; a markdown table, one JSON line per batch size.
--repeat N times each batch size N times and reports the median (every run in the JSON):
a ratio between two runs (TP=2 / TP=1) means little without their spread.
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch

from bench.common import add_engine_flags, graph_replay_ms, parser


def build_parser() -> argparse.ArgumentParser:
    ap, add = parser(__doc__)
    add_engine_flags(add)
    add("--batch_sizes", type=int, nargs="+", default=[1, 8, 64])
    add("--input_len", type=int, default=128)
    add("--output_len", type=int, default=256)
    add("--skip_limit", action="store_true", help="do not measure the GEMM chain")
    add("--prefill_len", type=int, default=0, help="also time the prefill of one prompt this long")
    add("--peak_tflops", type=float, default=989.0, help="dense bf16 peak for the %% column (H200: 989)")
    add("--seed", type=int, default=0)
    add("--repeat", type=int, default=1, help="time each batch size N times; report the median and the spread")
    return ap


def make_engine(args):
    try:
        from stage5_tp_cudagraph.engine import Engine
        extra = dict(disable_cuda_graph=args.disable_cuda_graph, disable_overlap=args.disable_overlap, tp=args.tp,
                     disable_custom_all_reduce=args.disable_custom_all_reduce)
        if args.cuda_graph_max_bs:
            extra["cuda_graph_max_bs"] = args.cuda_graph_max_bs
    except ImportError:
        from stage4_radix.engine import Engine
        extra = {}
        assert args.tp == 1, "--tp needs stage 5"
    opts = dict(load_format=args.load_format, device=args.device, dtype=args.dtype,
                attention_backend=args.attention_backend, max_total_tokens=args.max_total_tokens,
                gpu_memory_utilization=args.gpu_memory_utilization, max_running_requests=max(args.batch_sizes),
                chunked_prefill_size=args.chunked_prefill_size,
                disable_radix_cache=True, **extra)
    return Engine(model=args.model, **{k: v for k, v in opts.items() if v is not None})


def decode_ms_per_token(engine, batch: int, input_len: int, output_len: int, seed: int) -> float:
    from stage3_scheduler.request import Req
    from stage3_scheduler.sampling_params import SamplingParams
    rng = random.Random(seed)
    vocab = min(engine.runner.config.vocab_size, 151643)
    params = SamplingParams.from_dict({"temperature": 0, "ignore_eos": True, "max_new_tokens": output_len},
                                      engine.runner.config.vocab_size)
    reqs = [Req(f"lat-{batch}-{i}", [rng.randrange(vocab) for _ in range(input_len)], params) for i in range(batch)]
    sched = engine.scheduler
    for r in reqs:
        sched.add_request(r)
    t_first = None
    while sched.has_work():
        sched.step()
        if t_first is None and all(r.output_ids for r in reqs):
            t_first = time.perf_counter()              # every request has its first token
    t_end = time.perf_counter()
    return (t_end - t_first) * 1e3 / (output_len - 1)


def linear_weights(model) -> list[torch.Tensor]:
    """Every GEMM weight [out, in]: nn.Linear and the tensor-parallel linears (2-D weights
    of any module but an embedding, whose lookup is no GEMM)."""
    return [m.weight for m in model.modules()
            if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2
            and "Embedding" not in type(m).__name__]


@torch.inference_mode()
def gemm_chain_ms(model, batch: int, iters: int = 50) -> float:
    """All weight GEMMs of one decode step at batch `batch`, in one CUDA graph."""
    weights = linear_weights(model)
    dtype, dev = weights[0].dtype, weights[0].device
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1], dtype=dtype, device=dev) for w in weights}
    outputs = [torch.empty(batch, w.shape[0], dtype=dtype, device=dev) for w in weights]

    def chain():
        for w, out in zip(weights, outputs):
            torch.matmul(inputs[w.shape[1]], w.t(), out=out)
    return graph_replay_ms(chain, iters)


def prefill_report(engine, n: int, peak_tflops: float) -> dict:
    """One prompt of n tokens, one output token: time, model FLOPs (GEMMs + causal
    attention), TFLOPS and the share of peak, next to cuBLAS running the same GEMMs."""
    cfg, on_gpu = engine.runner.config, engine.runner.device.type == "cuda"
    weights = sum(w.numel() for w in linear_weights(engine.runner.model))
    attn = 2 * 2 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * n * n / 2   # QK^T + PV, causal
    lm_head = cfg.vocab_size * cfg.hidden_size               # logits only for the last token
    flops = 2 * (weights - lm_head) * n + 2 * lm_head + attn
    decode_ms_per_token(engine, 1, n, 2, seed=1)          # warm-up at this length
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    sync()
    t0 = time.perf_counter()
    from stage3_scheduler.request import Req
    from stage3_scheduler.sampling_params import SamplingParams
    rng = random.Random(2)
    r = Req("prefill", [rng.randrange(151643) % cfg.vocab_size for _ in range(n)],
            SamplingParams.from_dict({"temperature": 0, "max_new_tokens": 1}, cfg.vocab_size))
    engine.scheduler.add_request(r)
    while engine.scheduler.has_work():
        engine.scheduler.step()
    sync()
    ms = (time.perf_counter() - t0) * 1e3
    gemm = gemm_chain_ms(engine.runner.model, n, iters=5) if on_gpu else None
    return dict(prefill_tokens=n, prefill_ms=round(ms, 2), tflops=round(flops / ms / 1e9, 1),
                pct_of_peak=round(100 * flops / ms / 1e9 / peak_tflops, 1),
                cublas_gemms_ms=gemm and round(gemm, 2),
                cublas_pct_of_peak=gemm and round(100 * 2 * weights * n / gemm / 1e9 / peak_tflops, 1))


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    assert args.output_len >= 2, "need at least two output tokens to time a decode step"
    engine = make_engine(args)
    decode_ms_per_token(engine, 1, 16, 4, args.seed)            # warm-up (kernels, allocator)
    on_gpu = engine.runner.device.type == "cuda"
    graphs = getattr(engine.runner, "graphs", None) is not None
    mode = f"graphs={'on' if graphs else 'off'}, overlap={'off' if args.disable_overlap else 'on'}"
    print(f"| model | batch | decode ms/token | GEMM-chain limit ms | ratio | {mode}")
    print("| --- | --- | --- | --- | --- |")
    rows = []
    for b in args.batch_sizes:
        runs = sorted(decode_ms_per_token(engine, b, args.input_len, args.output_len, args.seed + b)
                      for _ in range(args.repeat))
        ms = runs[len(runs) // 2]                                   # median (upper one for even N)
        limit = gemm_chain_ms(engine.runner.model, b) if on_gpu and not args.skip_limit else None
        ratio = f"{ms / limit:.2f}x" if limit else "-"
        print(f"| {args.model} | {b} | {ms:.3f} | {limit and f'{limit:.3f}' or '-'} | {ratio} |", flush=True)
        rows.append(dict(model=args.model, tp=args.tp, batch=b, input_len=args.input_len, output_len=args.output_len,
                         decode_ms_per_token=round(ms, 4), decode_ms_runs=[round(r, 4) for r in runs],
                         gemm_chain_ms=limit and round(limit, 4),
                         cuda_graphs=graphs, overlap=not args.disable_overlap,
                         tok_per_s=round(b * 1e3 / ms, 1)))
    for r in rows:
        print(json.dumps(r))
    if args.prefill_len:
        print(json.dumps(dict(model=args.model, **prefill_report(engine, args.prefill_len, args.peak_tflops))))


if __name__ == "__main__":
    main()
