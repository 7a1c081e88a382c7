"""Draw a scheduler trace as a timeline PNG.

    python -m stage3_scheduler.plot_trace TRACE.jsonl -o trace.png

Input: the JSON lines `stage3_scheduler/trace.py` writes, one per forward step (read its
docstring for the fields). Output: one PNG with four panels sharing the step axis:

    1  tokens forwarded per step      bars, blue = extend (prefill / chunk), orange = decode
    2  batch size per step            same colours; lines for running / waiting requests
    3  KV slots                       stacked area: running requests | prefix cache | free
    4  cache-hit tokens (cumulative)  prompt tokens served from the prefix cache

Retractions (a step where the cumulative count rises) are red dashed lines on every panel.
matplotlib is the only extra dependency (`pip install -e ".[plot]"`).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

COLORS = {"extend": "tab:blue", "decode": "tab:orange"}
FIELDS = ("step", "t", "mode", "batch_size", "tokens", "running", "waiting", "slots_used",
          "slots_free", "slots_cached", "cache_hit_tokens", "retractions")


def read_trace(path: str | Path) -> list[dict]:
    """The trace rows, checked for the fields this plot needs."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: empty trace (was the Engine given trace_path and did it run?)")
    missing = [f for f in FIELDS if f not in rows[0]]
    if missing:
        raise ValueError(f"{path}: trace rows lack fields {missing}")
    return rows


def retraction_steps(rows: list[dict]) -> list[int]:
    """Steps whose cumulative retraction count is higher than the step before."""
    prev, out = 0, []
    for r in rows:
        if r["retractions"] > prev:
            out.append(r["step"])
        prev = r["retractions"]
    return out


def _bars_by_mode(ax, rows, key: str) -> None:
    for mode, color in COLORS.items():
        sel = [r for r in rows if r["mode"] == mode]
        ax.bar([r["step"] for r in sel], [r[key] for r in sel], width=1.0, color=color,
               label=mode, linewidth=0)


def plot(rows: list[dict], out: str | Path, title: str | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")                      # files only, no display needed
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(4, 1, figsize=(11, 10), sharex=True,
                             gridspec_kw={"height_ratios": [2, 2, 2, 1]})
    ax_tok, ax_bs, ax_kv, ax_hit = axes

    _bars_by_mode(ax_tok, rows, "tokens")
    ax_tok.set_ylabel("tokens forwarded")
    ax_tok.legend(loc="upper right")

    _bars_by_mode(ax_bs, rows, "batch_size")
    ax_bs.plot(steps, [r["running"] for r in rows], color="black", lw=1, label="running", drawstyle="steps-mid")
    ax_bs.plot(steps, [r["waiting"] for r in rows], color="gray", lw=1, ls=":", label="waiting",
               drawstyle="steps-mid")
    ax_bs.set_ylabel("requests")
    ax_bs.legend(loc="upper right")

    # Slots after each step (the three parts add up to the pool size); "mid" aligns with the bars.
    ax_kv.stackplot(steps, [r["slots_used"] for r in rows], [r["slots_cached"] for r in rows],
                    [r["slots_free"] for r in rows], labels=["running", "prefix cache", "free"],
                    colors=["tab:green", "tab:purple", "#dddddd"], step="mid")
    ax_kv.set_ylabel("KV slots")
    ax_kv.legend(loc="upper right")

    hits = [r["cache_hit_tokens"] for r in rows]
    ax_hit.plot(steps, hits, color="tab:purple", drawstyle="steps-mid")
    ax_hit.set_ylim(bottom=0, top=max(1, max(hits)) * 1.1)
    if not hits[-1]:
        ax_hit.text(0.5, 0.5, "no prefix-cache hits in this run",
                    transform=ax_hit.transAxes, ha="center", va="center", color="gray")
    ax_hit.set_ylabel("cache-hit tokens")
    ax_hit.set_xlabel("scheduler step")

    retracted = retraction_steps(rows)
    for ax in axes:
        for s in retracted:
            ax.axvline(s, color="red", ls="--", lw=0.8)
    n_ext = sum(r["mode"] == "extend" for r in rows)
    fig.suptitle(title or f"{len(rows)} steps ({n_ext} extend, {len(rows) - n_ext} decode), "
                 f"{rows[-1]['retractions']} retractions (red), {rows[-1]['t']:.2f} s")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", help="JSON-lines trace written with Engine(..., trace_path=TRACE)")
    ap.add_argument("-o", "--output", default=None, help="PNG to write (default: TRACE with .png)")
    ap.add_argument("--title", default=None, help="figure title (default: a summary of the run)")
    args = ap.parse_args(argv)
    rows = read_trace(args.trace)
    out = plot(rows, args.output or Path(args.trace).with_suffix(".png"), args.title)
    print(f"wrote {out} ({len(rows)} steps, {len(retraction_steps(rows))} retraction steps)")


if __name__ == "__main__":
    main()
