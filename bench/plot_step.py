"""Where a decode step's time goes: kernel time by kind, per batch size, next to the limit.

    python -m bench.plot_step out/prof/summary_b1.json out/prof/summary_b64.json \
        --limit_ms 1:4.157 64:4.291 --out docs/step_breakdown.png

Input: the summary_b<B>.json files of bench/profile_step.py, whose `grouped_ms` are the
step's kernel times by kind (`kernel_group` below, applied to the torch.profiler table) and
`gap_ms` = step wall time - all kernel time: launch gaps, idle GPU, host work not hidden.
Output: one stacked bar per batch size (ms per decode step) with the limit as a dashed tick
(--limit_ms B:MS ..., or --bench_latency FILE: bench_latency's JSON lines, `gemm_chain_ms`),
and a markdown table of the same numbers on stdout.
"""
from __future__ import annotations

import json
from pathlib import Path

from bench.common import parser, save_figure

GROUPS = ("gemm", "attention", "elementwise", "communication", "other")
LABELS = {"gemm": "GEMMs (weights, LM head)", "attention": "attention + KV store",
          "elementwise": "norms / RoPE / activations", "communication": "communication (all-reduce)",
          "other": "other kernels", "gap": "gap (launch / idle / host)"}
# Checked in this order: the first hit wins. Order matters where names overlap: FlashAttention
# kernels carry "cutlass" in their template names, "_decode_reduce_kernel" is attention, not a
# collective, and torch's argmax is a "reduce_kernel" like the mean inside a norm.
PATTERNS = (
    ("communication", ("nccl", "all_reduce", "allreduce", "all_gather", "allgather", "reduce_scatter",
                       "one_shot", "two_shot", "symmetric_memory", "cross_device_reduce", "c10d::")),
    ("attention", ("_decode_split_kernel", "_decode_reduce_kernel", "_extend_kernel", "_store_kv",
                   "decode_attention", "extend_attention", "store_kv", "flash", "fmha", "attention", "sdpa")),
    ("gemm", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "cublas", "ampere_", "sm80_", "sm90_", "sm100_",
              "aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    # Sampling, copies and indexing run on torch's generic reduce/elementwise templates too;
    # named here so that they do not count as norms or activations.
    ("other", ("argmax", "argmin", "softmax", "topk", "sort", "memcpy", "memset", "copy", "index", "gather",
               "scatter", "embedding", "fill")),
    ("elementwise", ("rmsnorm", "qk_norm_rope", "silu", "rope", "rotary", "norm", "elementwise", "vectorized",
                     "reduce_kernel", "aten::mul", "aten::add", "aten::rsqrt", "aten::pow", "aten::mean",
                     "aten::neg", "aten::cat", "aten::sigmoid", "aten::div", "aten::sub")),
)


def kernel_group(name: str) -> str:
    """The kind of a GPU kernel (or, on CPU, of an aten op) from its name: one of GROUPS."""
    low = name.lower()
    for group, keys in PATTERNS:
        if any(k in low for k in keys):
            return group
    return "other"


def group_times(rows: list[tuple[str, float]], steps: int) -> dict[str, float]:
    """(kernel name, total ms over `steps` steps) -> ms per step for each of GROUPS."""
    out = dict.fromkeys(GROUPS, 0.0)
    for name, ms in rows:
        out[kernel_group(name)] += ms / steps
    return out


def parse_limits(specs: list[str] | None, bench_latency: str | None) -> dict[int, float]:
    """Limit ms per batch size, from B:MS pairs and/or bench_latency JSON lines."""
    limits = {}
    if bench_latency:
        for line in Path(bench_latency).read_text().splitlines():
            if line.startswith("{") and (r := json.loads(line)).get("gemm_chain_ms"):
                limits[int(r["batch"])] = float(r["gemm_chain_ms"])
    for spec in specs or []:
        batch, ms = spec.split(":")
        limits[int(batch)] = float(ms)
    return limits


def step_ms(summary: dict) -> float:
    """The step time the bar adds up to: step_ms on the GPU, the profiled window's on CPU."""
    return summary[summary.get("gap_base", "step_ms")]


def markdown_table(summaries: list[dict], limits: dict[int, float]) -> str:
    cols = list(GROUPS) + ["gap"]
    lines = ["| batch | " + " | ".join(f"{c} (ms)" for c in cols) + " | step (ms) | limit (ms) |",
             "|" + "---|" * (len(cols) + 3)]
    for s in summaries:
        vals = [s["grouped_ms"][g] for g in GROUPS] + [s["gap_ms"]]
        limit = limits.get(s["batch"])
        lines.append(f"| {s['batch']} | " + " | ".join(f"{v:.3f}" for v in vals)
                     + f" | {step_ms(s):.3f} | {'-' if limit is None else f'{limit:.3f}'} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap, add = parser(__doc__)
    add("summaries", nargs="+", help="summary_b<B>.json files of bench/profile_step.py")
    add("--limit_ms", nargs="*", metavar="B:MS", help="the limit per batch size, e.g. 1:4.157 64:4.291")
    add("--bench_latency", default=None, help="bench_latency JSON lines: their gemm_chain_ms is the limit")
    add("--out", default="step_breakdown.png")
    args = ap.parse_args(argv)
    summaries = sorted((json.loads(Path(p).read_text()) for p in args.summaries), key=lambda s: s["batch"])
    limits = parse_limits(args.limit_ms, args.bench_latency)
    print(markdown_table(summaries, limits))

    import matplotlib
    matplotlib.use("Agg")                  # files only: no display on a GPU box
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(1.6 * len(summaries) + 4.5, 4.5))
    xs = range(len(summaries))
    bottom = [0.0] * len(summaries)
    for key in list(GROUPS) + ["gap"]:
        heights = [max(s["gap_ms"] if key == "gap" else s["grouped_ms"][key], 0.0) for s in summaries]
        hatch = "//" if key == "gap" else None          # not a kernel: drawn apart
        ax.bar(xs, heights, 0.55, bottom=bottom, label=LABELS[key], hatch=hatch,
               color="white" if key == "gap" else None, edgecolor="gray")
        bottom = [b + h for b, h in zip(bottom, heights)]
    limit_label = "limit: weight-GEMM chain (bench_latency)"
    for x, s in zip(xs, summaries):
        if s["batch"] in limits:                        # a dashed tick a little wider than the bar
            ax.hlines(limits[s["batch"]], x - 0.4, x + 0.4, colors="black", linestyles="--", label=limit_label)
            limit_label = None                          # one legend entry for all the ticks
        ax.annotate(f"{step_ms(s):.2f} ms", (x, bottom[x]), textcoords="offset points", xytext=(0, 3),
                    ha="center", fontsize=8)
    ax.set_xticks(list(xs), [f"batch {s['batch']}" for s in summaries])
    ax.set_ylabel("ms per decode step")
    first = summaries[0]
    ax.set_title(f"Where a decode step's time goes: {Path(str(first['model'])).name} on {first.get('device', '?')}",
                 fontsize=10)
    ax.set_ylim(0, max(bottom + list(limits.values())) * 1.15)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, args.out)


if __name__ == "__main__":
    main()
