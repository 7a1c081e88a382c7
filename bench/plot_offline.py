"""Offline throughput as bars: Hugging Face `generate`, our Engine, and the decode bound.

    python -m bench.plot_offline docs/data/offline/qwen3-0.6b.jsonl --out docs/offline_throughput.png

Input: bench/bench_offline.py's JSON lines (any number of runs; extra keys such as
`chunked_prefill_size` are kept but not needed). Runs are grouped by model, one panel each:
  HF generate       median `hf_output_tok_s` of the runs that had the baseline
  mini-sglang       median `output_tok_s`, with a whisker from the slowest to the fastest run
  decode bound      median `bound_tok_s`: decode's bytes over the copy bandwidth measured
                    in the same run (nothing can beat it on that GPU)
--where KEY=VALUE keeps only the runs with that field, e.g. chunked_prefill_size=8192.
A markdown table of the same numbers goes to stdout.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench.common import parser, save_figure


def load(paths: list[str], where: list[str]) -> dict[str, list[dict]]:
    """model -> its runs, filtered by every KEY=VALUE of `where` (compared as strings)."""
    runs: dict[str, list[dict]] = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if not line.startswith("{"):
                continue
            r = json.loads(line)
            if all(str(r.get(k)) == v for k, v in (w.split("=", 1) for w in where)):
                runs.setdefault(r["model"], []).append(r)
    if not runs:
        raise ValueError(f"no bench_offline runs in {paths} match {where}")
    return runs


def summary(runs: list[dict]) -> dict:
    """Medians (and our min / max) over a model's runs; None where no run has the field."""
    def med(key):
        vals = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(vals) if vals else None
    ours = [r["output_tok_s"] for r in runs]
    # ours / HF only within a run that had both (the same weights, prompts and GPU state)
    same_run = [r["output_tok_s"] / r["hf_output_tok_s"] for r in runs if r.get("hf_output_tok_s")]
    return dict(runs=len(runs), ours=statistics.median(ours), lo=min(ours), hi=max(ours),
                hf=med("hf_output_tok_s"), bound=med("bound_tok_s"),
                speedup=statistics.median(same_run) if same_run else None)


def main(argv=None) -> None:
    ap, add = parser(__doc__)
    add("files", nargs="+")
    add("--where", action="append", default=[], metavar="KEY=VALUE")
    add("--out", default="offline_throughput.png")
    args = ap.parse_args(argv)
    models = {m: summary(r) for m, r in load(args.files, args.where).items()}
    print("| model | runs | HF generate tok/s | ours tok/s (median, range) | ours / HF (same run) "
          "| decode bound tok/s | ours / bound |\n| --- | --- | --- | --- | --- | --- | --- |")
    for m, s in models.items():
        num = lambda v: "-" if v is None else f"{v:,.0f}"
        speedup = "-" if s["speedup"] is None else f"{s['speedup']:.1f}x"
        of_bound = "-" if s["bound"] is None else f"{s['ours'] / s['bound']:.0%}"
        print(f"| {m} | {s['runs']} | {num(s['hf'])} | {s['ours']:,.0f} ({s['lo']:,.0f}-{s['hi']:,.0f}) | "
              f"{speedup} | {num(s['bound'])} | {of_bound} |")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, (model, s) in zip(axes[0], models.items()):
        bars = [("HF generate", s["hf"], "tab:gray"), ("mini-sglang", s["ours"], "tab:blue"),
                ("decode bound", s["bound"], "tab:orange")]
        bars = [b for b in bars if b[1] is not None]
        xs = range(len(bars))
        ax.bar(xs, [v for _, v, _ in bars], color=[c for _, _, c in bars])
        i = [n for n, _, _ in bars].index("mini-sglang")       # whisker: slowest .. fastest run
        ax.errorbar([i], [s["ours"]], yerr=[[s["ours"] - s["lo"]], [s["hi"] - s["ours"]]], color="k", capsize=6)
        for x, (_, v, _) in zip(xs, bars):
            ax.annotate(f"{v:,.0f}", (x, v), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=8)
        ax.set_xticks(list(xs), [n for n, _, _ in bars])
        ax.set_ylabel("output tokens / s")
        ax.set_title(f"{model.split('/')[-1]}, {s['runs']} runs", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    save_figure(fig, args.out)


if __name__ == "__main__":
    main()
