"""Where a decode step's time goes: GPU replay vs host work, kernels, Python hot spots.

    python -m bench.profile_step --model configs/qwen3-0.6b --load_format dummy --batch 1 --out_dir out/prof
    python -m bench.profile_step --model demo --device cpu --batch 4 --steps 5        (smoke)

B requests are brought to steady decode, then:
  1. `gpu_ms`: one decode forward alone (graph replay or eager), timed with CUDA events;
  2. `step_ms`: a full scheduler step (overlap or not), wall clock, averaged;
  3. `host_ms`: the same steps under cProfile, which reports the Python time per step;
  4. torch.profiler over a few steps: the top kernels and a Chrome trace (--out_dir).
With overlap, step_ms ~ max(gpu_ms, host_ms): whichever is larger is the bottleneck.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import random
import time
from pathlib import Path

import torch

from bench.bench_latency import make_engine
from bench.common import add_engine_flags, parser


def build_parser() -> argparse.ArgumentParser:
    ap, add = parser(__doc__)
    add_engine_flags(add)
    add("--batch", type=int, default=1)
    add("--input_len", type=int, default=128)
    add("--steps", type=int, default=30)
    add("--out_dir", default=None, help="write the table, trace and cProfile here")
    return ap


def start(engine, batch: int, input_len: int, seed: int = 0):
    from stage3_scheduler.request import Req
    from stage3_scheduler.sampling_params import SamplingParams
    rng = random.Random(seed)
    vocab = engine.runner.config.vocab_size
    params = SamplingParams.from_dict({"temperature": 0, "ignore_eos": True, "max_new_tokens": 100_000}, vocab)
    for i in range(batch):
        engine.scheduler.add_request(Req(f"prof-{i}", [rng.randrange(min(vocab, 151643)) for _ in range(input_len)],
                                         params))
    while any(r.prefilling or not r.output_ids for r in engine.scheduler.running) or engine.scheduler.waiting:
        engine.scheduler.step()
    for _ in range(3):
        engine.scheduler.step()


def sync(engine) -> None:
    if engine.runner.device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(engine, n: int) -> float:
    sync(engine)
    t0 = time.perf_counter()
    for _ in range(n):
        engine.scheduler.step()
    sync(engine)
    return (time.perf_counter() - t0) * 1e3 / n


def gpu_forward_ms(engine, n: int) -> float | None:
    """One decode forward of the running batch, alone (KV writes go to fresh slots' places:
    we re-run the last batch, which rewrites the same slots with the same values)."""
    if engine.runner.device.type != "cuda":
        return None
    from stage2_runner.forward_batch import make_batch
    reqs = [r for r in engine.scheduler.running if not r.prefilling]
    fb = make_batch([r.row for r in reqs], [r.kv_len - 1 for r in reqs], [[0]] * len(reqs),
                    torch.tensor([r.slots[r.kv_len - 1] for r in reqs]), engine.runner.device)
    engine.runner.forward(fb)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(n):
        engine.runner.forward(fb)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    args.batch_sizes = [args.batch]
    engine = make_engine(args)
    start(engine, args.batch, args.input_len)
    out = Path(args.out_dir) if args.out_dir else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    res = dict(model=args.model, batch=args.batch, graphs=getattr(engine.runner, "graphs", None) is not None,
               overlap=not args.disable_overlap)
    res["gpu_ms"] = gpu_forward_ms(engine, args.steps)
    res["step_ms"] = time_steps(engine, args.steps)
    prof = cProfile.Profile()
    prof.enable()
    res["host_ms"] = time_steps(engine, args.steps)      # cProfile inflates it; see the table
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if engine.runner.device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as p:
        time_steps(engine, 5)
    sort = "cuda_time_total" if len(acts) == 2 else "cpu_time_total"
    table = p.key_averages().table(sort_by=sort, row_limit=20)
    print(table)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}))
    if out:
        (out / f"table_b{args.batch}.txt").write_text(table)
        (out / f"cprofile_b{args.batch}.txt").write_text(buf.getvalue())
        p.export_chrome_trace(str(out / f"trace_b{args.batch}.json"))
        (out / f"summary_b{args.batch}.json").write_text(json.dumps(res))


if __name__ == "__main__":
    main()
