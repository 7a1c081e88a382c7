"""Offline throughput: our Engine vs Hugging Face `generate` on the same random workload.

    python -m bench.bench_offline --model demo --device cpu --num_seqs 8 --min_len 16 --max_len 64
    python -m bench.bench_offline --model configs/qwen3-0.6b --load_format dummy      (GPU)

The nano-vllm / mini-sglang offline workload: `--num_seqs` sequences of random token ids,
each with an input length and an output length drawn uniformly from [--min_len, --max_len]
(or the separate --*_input_len / --*_output_len ranges), greedy, ignore_eos, so every
sequence produces exactly its output length. All are submitted at once.

Engine: stage4_radix's if it is importable, else stage3_scheduler's. We drive its scheduler
step by step (as `Engine.generate` does) only to show a progress bar.
HF: `Qwen3ForCausalLM.generate` in static batches of --hf_batch, left-padded with an
attention mask. A static batch runs until its longest output is done; only the requested
tokens count, so time spent on finished rows is HF's real cost. Both sides hold the very
same weights: HF gets a copy of the state dict our stage-1 loader produces (for
`--load_format dummy` too: the dummy init is seeded), and the run prints a check.
`--shared_prefix G P Q` runs bench/bench_prefix.py's workload instead.
Output: a markdown table row and one JSON line.
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import time

import torch
from tqdm import tqdm

from bench.common import add_engine_flags, parser

FIRST_SPECIAL_ID = 151643            # random prompts stay below Qwen's special tokens
STAGE5_KEYS = ("disable_cuda_graph", "disable_overlap", "cuda_graph_max_bs", "tp", "disable_custom_all_reduce")


def build_parser() -> argparse.ArgumentParser:
    ap, add = parser(__doc__)
    add_engine_flags(add)
    add("--max_running_requests", type=int, default=None)
    add("--page_size", type=int, default=None)
    add("--schedule_policy", default=None, choices=["fifo", "cache_aware"])
    add("--disable_radix_cache", action="store_true")
    add("--num_seqs", type=int, default=256)
    add("--min_len", type=int, default=100, help="lower bound of input and output lengths")
    add("--max_len", type=int, default=1024, help="upper bound of input and output lengths")
    for side in ("input", "output"):
        add(f"--min_{side}_len", type=int, default=None, help=f"override --min_len for {side}s")
        add(f"--max_{side}_len", type=int, default=None, help=f"override --max_len for {side}s")
    add("--seed", type=int, default=0)
    add("--trace_path", default=None, help="one JSON line per scheduler step (stage3_scheduler/trace.py): "
        "where the run's time goes; draw it with python -m stage3_scheduler.plot_trace")
    add("--hf_batch", type=int, default=64, help="static batch size of the HF baseline")
    add("--skip_hf", action="store_true", help="skip the HF transformers baseline")
    add("--shared_prefix", type=int, nargs=3, metavar=("N_GROUPS", "PREFIX_LEN", "Q_LEN"), default=None,
        help="shared-prefix workload (bench/bench_prefix.py), e.g. 32 2048 128")
    add("--group_size", type=int, default=16, help="prompts per shared prefix (--shared_prefix)")
    add("--prefix_output_len", type=int, default=64, help="output tokens per prompt (--shared_prefix)")
    return ap


# ---- workload and engine ------------------------------------------------------------
def random_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(min(vocab, FIRST_SPECIAL_ID)) for _ in range(n)]


def random_workload(args, vocab: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(args.seed)
    lo_in, hi_in = args.min_input_len or args.min_len, args.max_input_len or args.max_len
    lo_out, hi_out = args.min_output_len or args.min_len, args.max_output_len or args.max_len
    prompts = [random_ids(rng, rng.randint(lo_in, hi_in), vocab) for _ in range(args.num_seqs)]
    return prompts, [rng.randint(lo_out, hi_out) for _ in range(args.num_seqs)]


def engine_class():
    """(Engine class, name): the most complete stage available at run time."""
    for name in ("stage5_tp_cudagraph", "stage4_radix", "stage3_scheduler"):
        try:
            module = __import__(f"{name}.engine", fromlist=["Engine"])
            return module.Engine, name
        except ImportError:
            continue
    raise ImportError("no stage Engine found")


def make_engine(args, **override):
    keys = ("load_format", "device", "dtype", "attention_backend", "max_total_tokens", "gpu_memory_utilization",
            "max_running_requests", "chunked_prefill_size", "page_size", "schedule_policy", "disable_radix_cache",
            "trace_path")
    opts = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    opts.update(override)
    cls, name = engine_class()
    if name == "stage5_tp_cudagraph":
        opts.update({k: getattr(args, k) for k in STAGE5_KEYS if getattr(args, k) not in (None, False)})
    eng = cls(model=args.model, **opts)
    run_engine(eng, [[1, 2, 3, 4] * 4] * 2, [4, 4], None)        # warm-up: kernels, allocator
    eng.flush_cache()
    return eng, name


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_engine(eng, prompts, out_lens, desc: str | None) -> dict:
    """Submit everything, step the scheduler to the end; time, tokens, cache hits."""
    from stage3_scheduler.request import Req
    from stage3_scheduler.sampling_params import SamplingParams
    sched = eng.scheduler
    reqs = [Req(f"bench-{i}", list(p), SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True))
            for i, (p, n) in enumerate(zip(prompts, out_lens))]
    sync(eng.runner.device)
    t0 = time.perf_counter()
    for r in reqs:
        sched.add_request(r)
    done: set[str] = set()                     # a finished request may be reported twice
    with tqdm(total=len(reqs), desc=desc, unit="seq", disable=desc is None) as bar:
        while sched.has_work():
            new = {o.rid for o in sched.step() if o.finished} - done
            done |= new
            bar.update(len(new))
    sync(eng.runner.device)
    dt = time.perf_counter() - t0
    return dict(time_s=dt, output_tokens=sum(len(r.output_ids) for r in reqs),
                prompt_tokens=sum(len(r.input_ids) for r in reqs),
                cached_tokens=sum(r.cached_tokens for r in reqs),
                retractions=sched.total_retractions, first_tokens=[r.output_ids[0] for r in reqs])


def free_memory() -> None:
    """After the caller dropped its last reference: collect, and give GPU memory back."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- the HF baseline ------------------------------------------------------------------
def weights_fingerprint(model) -> float:
    """Sum of every weight in float64 (no float64 copy of the tensors is made)."""
    return float(sum(p.detach().sum(dtype=torch.float64) for p in model.parameters()))


def build_hf(args, device, dtype):
    """HF Qwen3ForCausalLM holding a copy of the weights our stage-1 loader produces."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from stage1_model.config import load_config
    from stage1_model.model_source import resolve_model_path
    from stage1_model.weights import load_model
    path = resolve_model_path(args.model)
    cfg = load_config(path)
    ours = load_model(path, dtype, device, args.load_format, cfg=cfg)
    hf_cfg = Qwen3Config(**{k: v for k, v in cfg.to_hf_dict().items()
                            if k not in ("architectures", "model_type", "torch_dtype")})
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)             # as HF's from_pretrained(torch_dtype=...) does
    try:
        with torch.device(device):
            hf = Qwen3ForCausalLM(hf_cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"HF and our parameter names differ: missing {missing[:3]}, unexpected {unexpected[:3]}")
    fp = weights_fingerprint(ours)
    del ours
    free_memory()
    return hf, fp


@torch.inference_mode()
def run_hf(hf, prompts, out_lens, batch: int, device) -> dict:
    pad = 0                                     # any id: the attention mask hides it
    first = []
    sync(device)
    t0 = time.perf_counter()
    for s in tqdm(range(0, len(prompts), batch), desc="HF generate", unit="batch"):
        ps, ns = prompts[s:s + batch], out_lens[s:s + batch]
        L = max(len(p) for p in ps)
        ids = torch.full((len(ps), L), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(ps):              # left padding: every prompt ends at column L-1
            ids[i, L - len(p):] = torch.tensor(p)
            mask[i, L - len(p):] = 1
        out = hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                          max_new_tokens=max(ns), min_new_tokens=max(ns), eos_token_id=None, pad_token_id=pad)
        first += out[:, L].tolist()
    sync(device)
    return dict(time_s=time.perf_counter() - t0, output_tokens=sum(out_lens), first_tokens=first)


# ---- the limit ------------------------------------------------------------------------
def decode_bytes(runner, prompts, out_lens) -> int:
    """Bytes the decode steps must read at least: every weight once per step (the embedding
    table only where the LM head shares it; otherwise it is only indexed) and, per request
    and step, its whole K/V. A request with n output tokens runs n - 1 decode steps, over
    contexts len(prompt) + 1 .. len(prompt) + n - 1. Prefill is left out (compute-bound)."""
    tied = getattr(runner.config, "tie_word_embeddings", False)
    weights = sum(p.numel() * p.element_size() for name, p in runner.model.named_parameters()
                  if tied or "embed_tokens" not in name)
    pool = runner.pool
    kv_per_token = sum(b[0].numel() * b.element_size() for b in (*pool.k_buffers, *pool.v_buffers))
    kv_tokens = sum((n - 1) * len(p) + (n - 1) * n // 2 for p, n in zip(prompts, out_lens))
    return (max(out_lens) - 1) * weights + kv_tokens * kv_per_token


def copy_bandwidth(device) -> float | None:
    """Device-to-device copy bandwidth (read + write bytes / s), measured before the engine
    takes its KV pool; None off the GPU."""
    if torch.device(device).type != "cuda":
        return None
    from bench.bench_attention import measure_copy_bandwidth
    bw = measure_copy_bandwidth(2.0)
    free_memory()
    return bw


def bandwidth_bound(runner, prompts, out_lens, bw: float | None) -> dict:
    """Decode's memory traffic over the copy bandwidth of the same run: a time no engine can
    beat on this GPU (it ignores prefill, sampling and every launch)."""
    if bw is None:
        return {}
    seconds = decode_bytes(runner, prompts, out_lens) / bw
    return dict(bound_time_s=round(seconds, 3), bound_tok_s=round(sum(out_lens) / seconds, 1),
                copy_tb_s=round(bw / 1e12, 3))


# ---- main ---------------------------------------------------------------------------
def report(args, name: str, ours: dict, hf: dict | None, same_weights, extra: dict) -> None:
    """The table row and one JSON line; `extra` (the bound, the chunk size) joins the JSON."""
    tps = ours["output_tokens"] / ours["time_s"]
    hf_tps = hf["output_tokens"] / hf["time_s"] if hf else None
    agree = sum(a == b for a, b in zip(ours["first_tokens"], hf["first_tokens"])) / len(ours["first_tokens"]) \
        if hf else None
    rng_in = f"{args.min_input_len or args.min_len}-{args.max_input_len or args.max_len}"
    rng_out = f"{args.min_output_len or args.min_len}-{args.max_output_len or args.max_len}"
    print("\n| engine | model | device | seqs | input | output | output tokens | time (s) | tok/s "
          "| HF tok/s | ours / HF |\n|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {name} | {args.model} ({args.load_format}) | {args.device} | {args.num_seqs} | {rng_in} | "
          f"{rng_out} | {ours['output_tokens']} | {ours['time_s']:.2f} | {tps:.1f} | "
          f"{'-' if hf is None else f'{hf_tps:.1f}'} | {'-' if hf is None else f'{tps / hf_tps:.2f}x'} |")
    print(json.dumps(dict(bench="offline", engine=name, model=args.model, load_format=args.load_format,
                          device=args.device, num_seqs=args.num_seqs, input_len=rng_in, output_len=rng_out,
                          output_tokens=ours["output_tokens"], time_s=round(ours["time_s"], 3),
                          output_tok_s=round(tps, 2), retractions=ours["retractions"],
                          hf_time_s=hf and round(hf["time_s"], 3), hf_output_tok_s=hf_tps and round(hf_tps, 2),
                          speedup=hf and round(tps / hf_tps, 3), same_weights=same_weights,
                          first_token_agreement=agree, **extra)))
    if extra.get("bound_tok_s"):
        print(f"decode bandwidth bound: {extra['bound_time_s']:.2f} s = {extra['bound_tok_s']:.0f} tok/s at "
              f"{extra['copy_tb_s']:.2f} TB/s (copy); this run reached {tps / extra['bound_tok_s']:.0%} of it")


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.shared_prefix:
        from bench.bench_prefix import run_prefix_bench
        return run_prefix_bench(args)
    from stage2_runner.model_runner import RunnerArgs
    dtype = RunnerArgs(device=args.device, dtype=args.dtype).resolved_dtype()
    hf_result, hf_fp = None, None
    if not args.skip_hf:                       # HF first, then free it: the Engine sizes its KV pool after
        hf, hf_fp = build_hf(args, args.device, dtype)
        prompts, out_lens = random_workload(args, hf.config.vocab_size)
        hf_result = run_hf(hf, prompts, out_lens, args.hf_batch, args.device)
        del hf
        free_memory()
    bw = copy_bandwidth(args.device)
    eng, name = make_engine(args)
    prompts, out_lens = random_workload(args, eng.runner.config.vocab_size)
    ours = run_engine(eng, prompts, out_lens, f"{name} Engine")
    same = None if hf_fp is None else abs(weights_fingerprint(eng.runner.model) - hf_fp) <= 1e-6 * abs(hf_fp)
    extra = dict(bandwidth_bound(eng.runner, prompts, out_lens, bw),
                 chunked_prefill_size=eng.scheduler.args.chunked_prefill_size)
    report(args, name, ours, hf_result, same, extra)


if __name__ == "__main__":
    main()
