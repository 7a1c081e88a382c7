"""The benchmark pictures: bench/plot_serving.py (TTFT/ITL percentiles of bench_serving runs),
bench/plot_step.py (a decode step's kernel time by kind), bench/plot_offline.py (offline
throughput vs HF and the bound), and bench_offline's decode-bytes bound itself. Inputs are
made here, with known answers; matplotlib is installed by the dev extra that CI uses."""
from __future__ import annotations

import json

import pytest

from bench import plot_serving, plot_step

PNG = b"\x89PNG\r\n\x1a\n"


def bench_serving_line(ttfts_ms, itls_ms, errors=None, **extra) -> str:
    """One line as bench_serving --output-details writes it (times in seconds)."""
    return json.dumps({"backend": "sglang", "dataset_name": "generated-shared-prefix", "request_rate": "inf",
                       "completed": len(ttfts_ms), "ttfts": [t / 1e3 for t in ttfts_ms],
                       "itls": [[x / 1e3 for x in row] for row in itls_ms],
                       "errors": errors or [""] * len(ttfts_ms), **extra})


@pytest.mark.server
def test_serving_percentiles_are_right_and_the_png_is_written(tmp_path, capsys):
    # 101 good requests with TTFT 1..101 ms: p50 = 51, p90 = 91, p99 = 100 (linear percentiles).
    # Their inter-token gaps are 1..101 ms too, split unevenly over the requests.
    ttfts = list(range(1, 102))
    gaps = list(range(1, 102))
    itls = [gaps[0:50], gaps[50:51], gaps[51:101]] + [[] for _ in range(98)]
    # A failed request (ttft 0, no gaps) must not count, as in bench_serving's own metrics.
    ttfts.append(0)
    itls.append([])
    errors = [""] * 101 + ["connection reset"]
    run = tmp_path / "cache.jsonl"
    old = bench_serving_line([500.0], [[500.0]])               # an earlier run in the same file
    run.write_text(old + "\n" + bench_serving_line(ttfts, itls, errors) + "\n")
    slow = tmp_path / "slow.jsonl"                               # all ten times slower
    slow.write_text(bench_serving_line([10 * t for t in ttfts[:101]], [[10 * g for g in gaps]] + [[]] * 100) + "\n")
    out = tmp_path / "plots" / "lat.png"

    plot_serving.main([f"{run}:radix-cache", str(slow), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| radix-cache | 101 | 51.00 | 91.00 | 100.00 | 51.00 | 91.00 | 100.00 |" in printed
    assert "| slow | 101 | 510.00 | 910.00 | 1000.00 | 510.00 | 910.00 | 1000.00 |" in printed
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 10_000


@pytest.mark.server
def test_serving_run_without_details_is_a_clear_error(tmp_path):
    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps({"backend": "sglang", "median_ttft_ms": 3.0}) + "\n")
    with pytest.raises(ValueError, match="--output-details"):
        plot_serving.load_run(bare)


@pytest.mark.server
def test_file_label_spec(tmp_path):
    assert plot_serving.parse_spec("/tmp/a_b.jsonl:cache on") == (plot_serving.Path("/tmp/a_b.jsonl"), "cache on")
    assert plot_serving.parse_spec("runs/x.jsonl")[1] == "x"
    odd = tmp_path / "rate:3.jsonl"                              # an existing path keeps its ':'
    odd.write_text("")
    assert plot_serving.parse_spec(str(odd)) == (odd, "rate:3")


# Kernel names as the profiler reports them on an H200 (cuBLAS, cuBLASLt, our Triton kernels,
# NCCL, torch's symmetric-memory all-reduce, torch's generic kernels), and aten ops on CPU.
KERNELS = {
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1": "gemm",
    "nvjet_hsh_128x64_64x4_2x1_v_bz_coopA_NNT": "gemm",
    "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x1_tn_align8>": "gemm",
    "void gemv2T_kernel_val<int, int, __nv_bfloat16, float, float, 128, 16, 4, 4, false>": "gemm",
    "ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_stages_64x3_tn": "gemm",
    "_decode_split_kernel": "attention",
    "_decode_reduce_kernel": "attention",
    "_extend_kernel": "attention",
    "_store_kv_kernel": "attention",
    "void flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128, 64, 128, 4, cutlass::bfloat16_t>>": "attention",
    "_rmsnorm_kernel": "elementwise",
    "_qk_norm_rope_kernel": "elementwise",
    "_silu_and_mul_kernel": "elementwise",
    "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>": "elementwise",
    "ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "communication",
    "ncclKernel_AllReduce_RING_LL_Sum_half(ncclWorkElem)": "communication",
    "void c10d::symmetric_memory::one_shot_all_reduce_kernel<c10::BFloat16, 2>": "communication",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::ArgMaxOps<float>>>": "other",
    "Memcpy DtoD (Device -> Device)": "other",
    "aten::mm": "gemm",
    "aten::scaled_dot_product_attention": "attention",
    "aten::rsqrt": "elementwise",
    "aten::index": "other",
}


@pytest.mark.stage5
@pytest.mark.parametrize("name", list(KERNELS))
def test_kernel_group(name):
    assert plot_step.kernel_group(name) == KERNELS[name]


@pytest.mark.stage5
def test_group_times_are_per_step_and_sum_to_the_total():
    rows = [("nvjet_a", 30.0), ("nvjet_b", 10.0), ("_decode_split_kernel", 6.0), ("_rmsnorm_kernel", 2.0),
            ("ncclDevKernel_AllReduce", 4.0), ("Memset (Device)", 0.5)]
    per_step = plot_step.group_times(rows, steps=2)
    assert per_step == {"gemm": 20.0, "attention": 3.0, "elementwise": 1.0, "communication": 2.0, "other": 0.25}


def step_summary(batch, gemm, attention, gap, step):
    grouped = {"gemm": gemm, "attention": attention, "elementwise": 0.2, "communication": 0.0, "other": 0.05}
    return {"model": "configs/qwen3-8b", "device": "NVIDIA H200", "batch": batch, "grouped_ms": grouped,
            "gap_ms": gap, "step_ms": step}


@pytest.mark.stage5
def test_step_picture_and_table(tmp_path, capsys):
    files = []
    for s in (step_summary(64, 4.3, 1.1, 0.3, 5.95), step_summary(1, 4.2, 0.3, 0.2, 4.95)):
        files.append(tmp_path / f"summary_b{s['batch']}.json")
        files[-1].write_text(json.dumps(s))
    latency = tmp_path / "sweep.jsonl"                    # bench_latency's lines give the limit at batch 1
    latency.write_text("not json\n" + json.dumps({"batch": 1, "gemm_chain_ms": 4.157}) + "\n")
    out = tmp_path / "step.png"
    plot_step.main([str(f) for f in files] + ["--bench_latency", str(latency), "--limit_ms", "64:4.291",
                                             "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| 1 | 4.200 | 0.300 | 0.200 | 0.000 | 0.050 | 0.200 | 4.950 | 4.157 |" in printed   # sorted by batch
    assert "| 64 | 4.300 | 1.100 | 0.200 | 0.000 | 0.050 | 0.300 | 5.950 | 4.291 |" in printed
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 10_000


@pytest.mark.stage5
def test_profile_step_smoke_on_cpu(tiny_model_dir, tmp_path):
    """On CPU the profiler sees aten ops, not kernels: the summary must still have every group,
    and the groups plus the gap must add up to the profiled step."""
    from bench import profile_step
    path, _, _ = tiny_model_dir
    profile_step.main(["--model", str(path), "--device", "cpu", "--batch", "2", "--input_len", "8",
                       "--steps", "2", "--prof_steps", "2", "--out_dir", str(tmp_path)])
    summary = json.loads((tmp_path / "summary_b2.json").read_text())
    assert set(summary["grouped_ms"]) == set(plot_step.GROUPS)
    assert summary["grouped_ms"]["gemm"] > 0 and summary["grouped_ms"]["communication"] == 0
    total = sum(summary["grouped_ms"].values()) + summary["gap_ms"]
    assert total == pytest.approx(summary["prof_step_ms"], abs=1e-3)


@pytest.mark.stage3
def test_offline_bound_counts_weights_per_step_and_each_context():
    """bench_offline's decode bytes: a request with n outputs runs n - 1 decode steps over
    contexts prompt + 1 .. prompt + n - 1; weights are read once per step of the longest."""
    from bench.bench_offline import decode_bytes
    from stage3_scheduler.engine import Engine
    runner = Engine(model="demo", device="cpu", max_total_tokens=256).runner
    tied = runner.config.tie_word_embeddings
    weights = sum(p.numel() * p.element_size() for n, p in runner.model.named_parameters()
                  if tied or "embed_tokens" not in n)
    cfg = runner.config                   # K and V, every layer, fp32 on CPU: from the config alone
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    assert decode_bytes(runner, [[1] * 10, [2] * 5], [3, 1]) == 2 * weights + (11 + 12) * kv
    assert decode_bytes(runner, [[1] * 10], [1]) == 0                 # first token only: no decode


@pytest.mark.stage3
def test_offline_plot_medians_same_run_ratio_and_filter(tmp_path, capsys):
    from bench import plot_offline
    runs = [dict(model="m", output_tok_s=100.0, hf_output_tok_s=10.0, bound_tok_s=200.0, chunk=1),
            dict(model="m", output_tok_s=300.0, hf_output_tok_s=None, bound_tok_s=200.0, chunk=1),
            dict(model="m", output_tok_s=200.0, hf_output_tok_s=None, bound_tok_s=400.0, chunk=1),
            dict(model="m", output_tok_s=999.0, hf_output_tok_s=None, bound_tok_s=1.0, chunk=2)]
    path = tmp_path / "runs.jsonl"
    path.write_text("some log line\n" + "\n".join(json.dumps(r) for r in runs) + "\n")
    s = plot_offline.summary(plot_offline.load([str(path)], ["chunk=1"])["m"])
    assert (s["runs"], s["ours"], s["lo"], s["hi"], s["hf"], s["bound"]) == (3, 200.0, 100.0, 300.0, 10.0, 200.0)
    assert s["speedup"] == 10.0                  # 100 / 10 from the one run with both, not 200 / 10
    plot_offline.main([str(path), "--where", "chunk=1", "--out", str(tmp_path / "o.png")])
    assert "| m | 3 | 10 | 200 (100-300) | 10.0x | 200 | 100% |" in capsys.readouterr().out
    assert (tmp_path / "o.png").stat().st_size > 0
    with pytest.raises(ValueError, match="no bench_offline runs"):
        plot_offline.load([str(path)], ["chunk=3"])
