"""Command-line pieces the benchmark scripts share: one spelling rule, one set of engine flags.

    ap, add = parser(__doc__)      # add("--flag_name", ...) also accepts --flag-name
    add_engine_flags(add)          # model, weights, device, dtype, backend, KV size, stage 5
    ms = graph_replay_ms(fn, iters)   # GPU: fn captured in a CUDA graph, ms per replay
"""
from __future__ import annotations

import argparse


def parser(doc: str | None):
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)

    def add(name: str, **kw) -> None:          # accept --flag_name and --flag-name
        ap.add_argument(*dict.fromkeys([name, name.replace("_", "-")]), **kw)
    return ap, add


def save_figure(fig, out: str) -> None:
    """Lay out and write a matplotlib figure (creating its folder); say where it went."""
    from pathlib import Path
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def add_engine_flags(add) -> None:
    add("--model", default="demo", help="'demo', a local HF Qwen3 directory, or configs/<name>")
    add("--load_format", default="auto", choices=["auto", "dummy"])
    add("--device", default=None, help="cuda or cpu (default: cuda if available)")
    add("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | bfloat16 | float16 | float32")
    add("--attention_backend", default=None, help="torch | triton | fa (default: triton on GPU)")
    add("--max_total_tokens", type=int, default=None, help="KV pool slots (default: from memory)")
    add("--gpu_memory_utilization", type=float, default=0.85)
    add("--chunked_prefill_size", type=int, default=None)
    add("--disable_cuda_graph", action="store_true", help="stage 5: decode eagerly")
    add("--disable_overlap", action="store_true", help="stage 5: synchronous scheduler loop")
    add("--cuda_graph_max_bs", type=int, default=None, help="stage 5: largest graph-replayed batch")
    add("--tp", type=int, default=1, help="stage 5: tensor-parallel ranks (one GPU each; spawned by the Engine)")
    add("--disable_custom_all_reduce", action="store_true", help="stage 5, TP: NCCL for every all-reduce")


def graph_replay_ms(fn, iters: int, before_timing=None) -> float:
    """Capture fn() in one CUDA graph and return the milliseconds per replay over `iters`
    replays (CUDA events). One eager call first (Triton compiles, cuBLAS and NCCL set-up)
    and one replay untimed; `before_timing()` runs just before the clock starts (a barrier
    between ranks, say)."""
    import torch
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    if before_timing is not None:
        before_timing()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters
