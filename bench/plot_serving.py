"""Plot the TTFT and ITL distributions of bench_serving runs, one curve per run.

    python -m bench.plot_serving /tmp/bench_serving_sglang_cache.jsonl:radix-cache \
        /tmp/bench_serving_sglang_nocache.jsonl:no-cache --out docs/serving_latency.png

Input: JSONL files that SGLang's bench_serving appended with --output-details (as
bench/run_bench_serving.sh asks): per-request `ttfts` (seconds), `itls` (a list of seconds
per request), `errors`. Each FILE[:LABEL] contributes its last line that has details (a file
gathers one line per run; LABEL defaults to the file's name). Output: a PNG with two
empirical CDFs, time to first token and inter-token latency, on log x (a decode step that
waits behind a prefill is 10-100x a plain one; a cached prefix divides TTFT), median and p99
marked and given in the legend; and, on stdout, a markdown table of p50/p90/p99, computed as
bench_serving computes its own (numpy, linear interpolation).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bench.common import parser, save_figure

PERCENTILES = (50, 90, 99)
MARKED = (50, 99)              # drawn on the curves; the table has all of PERCENTILES


def parse_spec(spec: str) -> tuple[Path, str]:
    """FILE[:LABEL]; a path that exists as written wins (it may itself contain ':')."""
    if Path(spec).exists() or ":" not in spec:
        return Path(spec), Path(spec).stem
    path, label = spec.rsplit(":", 1)
    return Path(path), label or Path(path).stem


def load_run(path: Path) -> dict:
    """The last record of a bench_serving JSONL that carries per-request details."""
    # bench_serving appends, so one file may hold several runs; the newest is the last line.
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    detailed = [r for r in records if "ttfts" in r and "itls" in r]
    if not detailed:
        raise ValueError(f"{path}: no line with per-request details; run bench_serving with --output-details")
    return detailed[-1]


def latencies_ms(run: dict) -> tuple[np.ndarray, np.ndarray]:
    """TTFTs and all inter-token gaps of the successful requests, in milliseconds.
    A failed request has ttft 0 and no itls; bench_serving leaves it out of its metrics too."""
    errors = run.get("errors") or [""] * len(run["ttfts"])
    # bench_serving writes "" for a request that succeeded, the exception text otherwise.
    ok = [i for i, e in enumerate(errors) if not e]
    ttft = np.array([run["ttfts"][i] for i in ok], dtype=float) * 1e3
    itl = np.array([x for i in ok for x in run["itls"][i]], dtype=float) * 1e3
    return ttft, itl


def percentiles(values: np.ndarray) -> dict[int, float]:
    # np.percentile's default (linear) is what bench_serving's own p99_ttft_ms etc. use, so
    # the table matches the numbers the client printed.
    return {p: float(np.percentile(values, p)) if len(values) else float("nan") for p in PERCENTILES}


def markdown_table(rows: list[tuple[str, int, dict, dict]]) -> str:
    """rows: (label, requests, ttft percentiles, itl percentiles)."""
    head = ["run", "requests"] + [f"TTFT p{p} (ms)" for p in PERCENTILES] + [f"ITL p{p} (ms)" for p in PERCENTILES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, n, ttft, itl in rows:
        cells = [label, str(n)] + [f"{ttft[p]:.2f}" for p in PERCENTILES] + [f"{itl[p]:.2f}" for p in PERCENTILES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def draw_cdf(ax, values: np.ndarray, label: str, color) -> None:
    """A step CDF; the marked percentiles are dots on it and numbers in the legend (text next
    to the dots collides as soon as two runs are close)."""
    xs = np.sort(values)
    ys = np.arange(1, len(xs) + 1) / len(xs)
    marks = {p: float(np.percentile(values, p)) for p in MARKED}
    ax.step(xs, ys, where="post", color=color,
            label=f"{label} (" + ", ".join(f"p{p} {x:.1f}" for p, x in marks.items()) + " ms)")
    for (p, x), marker in zip(marks.items(), ("o", "^")):
        ax.plot([x], [p / 100], marker, color=color, markersize=6)


def title_of(runs: list[dict]) -> str:
    """What was measured, from the runs' own arguments ("mixed" where they differ)."""
    def common(key: str):
        values = {str(r.get(key, "?")) for r in runs}
        return values.pop() if len(values) == 1 else "mixed"
    return (f"bench_serving: dataset {common('dataset_name')}, request rate {common('request_rate')} req/s, "
            f"backend {common('backend')}")


def main(argv=None) -> None:
    ap, add = parser(__doc__)
    add("runs", nargs="+", metavar="FILE[:LABEL]")
    add("--out", default="serving_latency.png", help="PNG to write")
    args = ap.parse_args(argv)
    specs = [parse_spec(s) for s in args.runs]
    runs = [load_run(path) for path, _ in specs]
    rows, data = [], []
    for (_, label), run in zip(specs, runs):
        ttft, itl = latencies_ms(run)
        rows.append((label, len(ttft), percentiles(ttft), percentiles(itl)))
        data.append((label, ttft, itl))
    print(markdown_table(rows))

    import matplotlib
    matplotlib.use("Agg")                  # files only: no display on a GPU box
    import matplotlib.pyplot as plt
    fig, (ax_ttft, ax_itl) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, ttft, itl) in enumerate(data):
        color = colors[i % len(colors)]     # one color per run, the same in both panels
        if len(ttft):
            draw_cdf(ax_ttft, ttft, label, color)
        if len(itl):
            draw_cdf(ax_itl, itl, label, color)
    ax_ttft.set_xlabel("time to first token (ms, log scale)")
    ax_itl.set_xlabel("inter-token latency (ms, log scale)")
    for ax, what in ((ax_ttft, "requests"), (ax_itl, "inter-token gaps")):
        ax.set_xscale("log")               # runs worth comparing differ by factors, not by ms
        ax.set_ylabel(f"fraction of {what} at or below")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    ax_ttft.set_title("TTFT (o median, ^ p99)", fontsize=10)
    ax_itl.set_title("ITL (o median, ^ p99)", fontsize=10)
    fig.suptitle(title_of(runs), fontsize=11)
    save_figure(fig, args.out)


if __name__ == "__main__":
    main()
