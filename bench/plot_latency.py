"""Plot decode ms/token vs batch size, next to the weight-GEMM-chain limit.

    python -m bench.plot_latency docs/data/decode_sweep_qwen3-0.6b.jsonl docs/data/decode_sweep_qwen3-8b.jsonl \
        --out docs/decode_latency.png

Input: the JSON lines of bench/bench_latency.py (one per batch size; `gemm_chain_ms` is the
limit measured in the same run). One panel per file: our decode step (solid) and the
chain (dashed) on a log-x axis, the ratio printed at each point.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.startswith("{")]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", default="decode_latency.png")
    args = ap.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(args.files), figsize=(5.5 * len(args.files), 4), squeeze=False)
    for ax, path in zip(axes[0], args.files):
        rows = load(path)
        b = [r["batch"] for r in rows]
        ours = [r["decode_ms_per_token"] for r in rows]
        limit = [r["gemm_chain_ms"] for r in rows]
        ax.plot(b, ours, "o-", label="mini-sglang decode step (graphs + overlap)")
        ax.plot(b, limit, "s--", label="weight GEMMs only, one CUDA graph (limit)")
        for x, y, lim in zip(b, ours, limit):
            ax.annotate(f"{y / lim:.2f}x", (x, y), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, max(ours) * 1.2)
        ax.set_xlabel("batch size (requests decoding together)")
        ax.set_ylabel("ms per decode step")
        ax.set_title(rows[0]["model"].split("/")[-1] + f", in {rows[0]['input_len']} / out {rows[0]['output_len']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
