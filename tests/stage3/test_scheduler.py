"""Stage 3: continuous batching through the Engine == stage 1 alone, under pressure too."""
import json

import pytest

from helpers import hf_greedy, random_prompts
from stage1_model.generate import generate
from stage3_scheduler.engine import Engine

pytestmark = pytest.mark.stage3
GREEDY = {"temperature": 0.0, "ignore_eos": True}


def engine_for(path, **kw):
    kw.setdefault("max_total_tokens", 4096)
    return Engine(model=str(path), device="cpu", **kw)


@pytest.fixture(scope="module")
def workload(tiny_model_dir):
    _, _, cfg = tiny_model_dir
    lengths = [3, 50, 17, 1, 33, 8, 64, 21, 5, 40, 12, 27]
    prompts = random_prompts(cfg.vocab_size, lengths, seed=31)
    max_new = [12, 5, 20, 9, 16, 3, 10, 24, 7, 14, 18, 6]
    return prompts, max_new


@pytest.fixture(scope="module")
def reference(tiny_model_dir, workload):
    eng = engine_for(tiny_model_dir[0])
    prompts, max_new = workload
    return [generate(eng.runner.model, p, n) for p, n in zip(prompts, max_new)]


def run(eng, workload):
    prompts, max_new = workload
    outs = eng.generate(input_ids=prompts, sampling_params=[dict(GREEDY, max_new_tokens=n) for n in max_new])
    eng.scheduler.check_invariant()
    assert not eng.scheduler.running and not eng.scheduler.waiting
    return [o["output_ids"] for o in outs], outs


def test_concurrent_mixed_lengths_equal_stage1(tiny_model_dir, workload, reference):
    eng = engine_for(tiny_model_dir[0])
    got, outs = run(eng, workload)
    assert got == reference
    hf = tiny_model_dir[1]
    for i in (0, 6):                                   # and the chain ends at HF
        assert got[i] == hf_greedy(hf, workload[0][i], workload[1][i])
    for o, p, n in zip(outs, *workload):
        m = o["meta_info"]
        assert (m["prompt_tokens"], m["completion_tokens"], m["finish_reason"]) == \
               (len(p), n, {"type": "length", "length": n})


@pytest.mark.parametrize("page_size", [1, 4])
def test_retraction_under_a_small_pool_keeps_outputs(tiny_model_dir, workload, reference, page_size):
    eng = engine_for(tiny_model_dir[0], max_total_tokens=160, page_size=page_size)
    got, _ = run(eng, workload)
    assert eng.scheduler.total_retractions > 0
    assert got == reference


@pytest.mark.parametrize("chunk", [7, 16])
def test_chunked_prefill_equals_unchunked(tiny_model_dir, workload, reference, chunk):
    eng = engine_for(tiny_model_dir[0], chunked_prefill_size=chunk)
    got, _ = run(eng, workload)
    assert got == reference


def test_max_running_requests_is_respected(tiny_model_dir, workload, reference, tmp_path):
    trace = tmp_path / "trace.jsonl"
    eng = engine_for(tiny_model_dir[0], max_running_requests=3, trace_path=str(trace))
    got, _ = run(eng, workload)
    assert got == reference
    eng.scheduler.tracer.close()
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    assert rows and max(r["running"] for r in rows) <= 3
    assert {r["mode"] for r in rows} == {"extend", "decode"}
    assert sum(r["tokens"] for r in rows) == eng.scheduler.forwarded_tokens


def test_seeded_sampling_is_batch_independent(tiny_model_dir):
    eng = engine_for(tiny_model_dir[0])
    p = random_prompts(384, [9, 14], seed=32)
    sp = {"temperature": 1.0, "seed": 5, "max_new_tokens": 10, "ignore_eos": True}
    alone = eng.generate(input_ids=p[0], sampling_params=sp)["output_ids"]
    together = eng.generate(input_ids=p, sampling_params=sp)[0]["output_ids"]
    assert alone == together


def test_default_chunk_size_follows_the_device(monkeypatch):
    """None means: 2048 on CPU; on a GPU, by its memory (8192 from 60 GiB, 4096 from 35 GiB)."""
    from types import SimpleNamespace
    import torch
    from stage3_scheduler.scheduler import SchedulerArgs, default_chunked_prefill_size
    assert SchedulerArgs().chunked_prefill_size is None
    assert default_chunked_prefill_size("cpu") == 2048
    eng = engine_for("demo", max_total_tokens=256)
    assert eng.scheduler.args.chunked_prefill_size == 2048
    from stage3_scheduler.scheduler import Scheduler
    given = SchedulerArgs()
    assert Scheduler(eng.runner, given).args.chunked_prefill_size == 2048
    assert given.chunked_prefill_size is None                  # resolved on a copy, not the caller's
    for gib, want in ((141, 8192), (80, 8192), (48, 4096), (24, 2048)):
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda d, gib=gib: SimpleNamespace(total_memory=gib * 2**30))
        assert default_chunked_prefill_size("cuda") == want
