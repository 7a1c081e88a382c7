"""Stage 3: the scheduler trace has one complete line per step, and plot_trace draws it."""
import json

import pytest

from helpers import random_prompts
from stage3_scheduler import plot_trace
from stage3_scheduler.engine import Engine

pytestmark = pytest.mark.stage3
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def traced_run(tiny_model_dir, tmp_path_factory):
    """A small run under a tight pool (so it retracts), traced to a file."""
    path, _, cfg = tiny_model_dir
    trace = tmp_path_factory.mktemp("trace") / "trace.jsonl"
    eng = Engine(model=str(path), device="cpu", max_total_tokens=96, trace_path=str(trace))
    prompts = random_prompts(cfg.vocab_size, [20, 5, 31, 12, 9, 26], seed=51)
    eng.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": 12, "ignore_eos": True})
    eng.scheduler.tracer.close()
    return eng.scheduler, trace


def test_trace_lines_have_every_field_and_one_per_step(traced_run):
    sched, trace = traced_run
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(rows) == sched.tracer.step > 0
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    for r in rows:
        assert set(plot_trace.FIELDS) <= set(r)
        assert r["mode"] in ("extend", "decode")
        assert r["slots_used"] + r["slots_cached"] + r["slots_free"] == sched.pool.size
    assert sum(r["tokens"] for r in rows) == sched.forwarded_tokens
    assert rows[-1]["retractions"] == sched.total_retractions > 0


def test_plot_writes_a_png_with_retractions_marked(traced_run, tmp_path):
    sched, trace = traced_run
    rows = plot_trace.read_trace(trace)
    assert len(plot_trace.retraction_steps(rows)) >= 1
    out = tmp_path / "trace.png"
    plot_trace.main([str(trace), "-o", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_empty_trace_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty trace"):
        plot_trace.read_trace(empty)
