"""Where a decode step's time goes: GPU replay vs host work, kernels, Python hot spots.

    python -m bench.profile_step --model configs/qwen3-0.6b --load_format dummy --batch 1 --out_dir out/prof
    python -m bench.profile_step --model demo --device cpu --batch 4 --steps 5        (smoke)
    python -m bench.plot_step out/prof/summary_b*.json --limit_ms 1:0.907 --out out/prof/step.png

B requests are brought to steady decode, then:
  1. `gpu_ms`: one decode forward alone (graph replay or eager), timed with CUDA events;
  2. `step_ms`: a full scheduler step (overlap or not), wall clock, averaged;
  3. `host_ms`: the same steps under cProfile, which reports the Python time per step;
  4. torch.profiler over --prof_steps steps: the top kernels and a Chrome trace (--out_dir),
     and the kernel time per step grouped by kind (bench/plot_step.py's `kernel_group`:
     GEMMs, attention, norms/RoPE/activations, communication, other) with
     `gap_ms` = step_ms - all kernel time (launch gaps, idle GPU, host work not hidden).
With overlap, step_ms ~ max(gpu_ms, host_ms): whichever is larger is the bottleneck.
On CPU there are no kernels: the groups are of aten ops' self CPU time instead, and the gap
is the Python around them. --out_dir gets summary_b<B>.json with all of it, for plot_step.
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
from bench.plot_step import group_times, kernel_group


def build_parser() -> argparse.ArgumentParser:
    ap, add = parser(__doc__)
    add_engine_flags(add)
    add("--batch", type=int, default=1)
    add("--input_len", type=int, default=128)
    add("--steps", type=int, default=30)
    add("--prof_steps", type=int, default=10, help="steps under torch.profiler (the grouped times' average)")
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


def op_rows(prof, on_gpu: bool) -> list[tuple[str, float]]:
    """(name to group by, ms) for what did the work. On the GPU: every kernel (and memcpy /
    memset), flat. On CPU: each aten op's self time, named after its outermost enclosing op
    that has a kind, so that the bmm and softmax inside scaled_dot_product_attention count as
    attention and the mm inside linear as a GEMM. Self time: nothing is counted twice."""
    from torch.autograd import DeviceType
    if on_gpu:
        return [(ev.name, ev.device_time_total / 1e3) for ev in prof.events()
                if ev.device_type == DeviceType.CUDA]
    rows = []
    for ev in prof.events():
        if ev.device_type != DeviceType.CPU or "::" not in ev.name:
            continue                       # user ranges such as ProfilerStep are not work
        chain, up = [ev.name], ev.cpu_parent
        while up is not None:
            if "::" in up.name:
                chain.append(up.name)
            up = up.cpu_parent
        named = next((n for n in reversed(chain) if kernel_group(n) != "other"), ev.name)
        rows.append((named, ev.self_cpu_time_total / 1e3))
    return rows


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
    # With TP, a forward on rank 0 alone would wait forever for its peers' all-reduces.
    res["gpu_ms"] = gpu_forward_ms(engine, args.steps) if args.tp == 1 else None
    res["step_ms"] = time_steps(engine, args.steps)
    prof = cProfile.Profile()
    prof.enable()
    res["host_ms"] = time_steps(engine, args.steps)      # cProfile inflates it; see the table
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
    on_gpu = engine.runner.device.type == "cuda"
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])
    sync(engine)                           # no earlier step's kernels may land in the window
    with torch.profiler.profile(activities=acts) as p:
        res["prof_step_ms"] = time_steps(engine, args.prof_steps)
    sort = "cuda_time_total" if on_gpu else "cpu_time_total"
    table = p.key_averages().table(sort_by=sort, row_limit=20)
    print(table)
    # Per step: each step in the window launched one decode forward and the window ends with a
    # sync, so the window holds prof_steps forwards. The gap is taken from the unprofiled
    # step_ms on the GPU (the profiler slows the host, not the kernels), but on CPU from the
    # profiled window itself, whose op times the profiler inflates along with the wall time.
    res["device"] = torch.cuda.get_device_name() if on_gpu else "cpu"
    res["grouped_ms"] = {k: round(v, 4) for k, v in group_times(op_rows(p, on_gpu), args.prof_steps).items()}
    res["kernel_ms"] = round(sum(res["grouped_ms"].values()), 4)
    res["gap_base"] = "step_ms" if on_gpu else "prof_step_ms"
    res["gap_ms"] = round(res[res["gap_base"]] - res["kernel_ms"], 4)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}))
    if out:
        (out / f"table_b{args.batch}.txt").write_text(table)
        (out / f"cprofile_b{args.batch}.txt").write_text(buf.getvalue())
        p.export_chrome_trace(str(out / f"trace_b{args.batch}.json"))
        (out / f"summary_b{args.batch}.json").write_text(json.dumps(res))


if __name__ == "__main__":
    main()
