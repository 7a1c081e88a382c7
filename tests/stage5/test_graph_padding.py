"""The CUDA-graph runner's padding and static buffers, run eagerly on CPU.

DecodeGraphs(use_graphs=False) copies each decode batch into its static buffers, pads it
to the next captured size and runs the model from those buffers: exactly what a graph
replays on the GPU, minus the graph. Its logits must equal the plain stage-2 decode, and a
padded run may write no KV slot but the batch's own and the scratch slot.
"""
import pytest
import torch

from helpers import make_runner, random_prompts, snapshot, written_slots
from stage2_runner.batch_generate import batch_generate, extend
from stage2_runner.forward_batch import make_batch
from stage2_runner.model_runner import RunnerArgs
from stage5_tp_cudagraph.cuda_graph import DecodeGraphs, capture_sizes
from stage5_tp_cudagraph.runner import GraphModelRunner, Stage5Args

pytestmark = pytest.mark.stage5


def padded_runner(path, max_bs=24, **kw):
    """A stage-5 runner on CPU whose decode goes through the padded static buffers."""
    kw.setdefault("max_total_tokens", 4096)
    runner = GraphModelRunner(RunnerArgs(model=str(path), device="cpu", **kw), Stage5Args())
    assert runner.graphs is None                # no CUDA: graphs off by default
    runner.graphs = DecodeGraphs(runner, max_bs, use_graphs=False)
    return runner


def test_capture_sizes():
    assert capture_sizes(256)[:8] == [1, 2, 4, 8, 16, 24, 32, 40]
    assert capture_sizes(256)[-1] == 256 and capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert all(b - a <= 16 for a, b in zip(capture_sizes(256), capture_sizes(256)[1:]))


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_padded_decode_equals_plain_decode(tiny_model_dir, batch):
    path, _, cfg = tiny_model_dir
    prompts = random_prompts(cfg.vocab_size, [5 + 3 * i for i in range(batch)], seed=batch)
    plain_out, plain_logits = batch_generate(make_runner(path), prompts, 6, return_logits=True)
    runner = padded_runner(path)
    out, logits = batch_generate(runner, prompts, 6, return_logits=True)
    assert out == plain_out
    for a, b in zip(logits, plain_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert runner.graphs.dummy_row not in runner.pool.free_rows


def prefilled(runner, prompts):
    """Prefill `prompts` and give each one slot for its next token: (rows, slots [B])."""
    pool = runner.pool
    rows, last = [pool.alloc_row() for _ in prompts], [-1] * len(prompts)
    extend(runner, rows, [0] * len(prompts), prompts, last)
    locs = torch.cat([pool.allocator.alloc_extend(len(p), last[i], 1) for i, p in enumerate(prompts)])
    for row, p, loc in zip(rows, prompts, locs):
        pool.req_to_token[row, len(p)] = int(loc)
    return rows, locs


def decode(runner, rows, prompts, locs, token: int):
    return runner.forward(make_batch(rows, [len(p) for p in prompts], [[token]] * len(rows), locs, "cpu"))


def test_padded_rows_write_only_the_scratch_slot(tiny_model_dir):
    path, _, cfg = tiny_model_dir
    runner = padded_runner(path)
    prompts = random_prompts(cfg.vocab_size, [7, 4, 9], seed=3)
    rows, locs = prefilled(runner, prompts)
    before = snapshot(runner.pool)
    decode(runner, rows, prompts, locs, 1)              # 3 requests, padded to 4
    assert written_slots(before, runner.pool) == set(locs.tolist()) | {runner.graphs.scratch_slot}


def test_batches_above_max_bs_run_eagerly(tiny_model_dir):
    path, _, cfg = tiny_model_dir
    runner = padded_runner(path, max_bs=4)
    calls = []
    run = runner.graphs.run
    runner.graphs.run = lambda b: calls.append(b.batch_size) or run(b)
    prompts = random_prompts(cfg.vocab_size, [3] * 6, seed=5)
    assert batch_generate(runner, prompts, 3) == batch_generate(make_runner(path), prompts, 3)
    assert calls == []                          # 6 > max_bs: never through the graph path
    batch_generate(runner, prompts[:4], 3)
    assert calls == [4, 4]                      # the two decode steps (the first is a prefill)


def test_rows_left_by_a_bigger_batch_are_padded_again(tiny_model_dir):
    """A batch of 5 (padded to 8), then of 3 (padded to 4): row 3 still holds the first
    batch's values and must be reset, or it would write a real request's KV slot."""
    path, _, cfg = tiny_model_dir
    runner = padded_runner(path)
    prompts = random_prompts(cfg.vocab_size, [4, 6, 5, 7, 3], seed=8)
    rows, locs = prefilled(runner, prompts)
    decode(runner, rows, prompts, locs, 1)
    before = snapshot(runner.pool)
    decode(runner, rows[:3], prompts[:3], locs[:3], 2)     # new token: its 3 slots change
    # (the scratch slot may get the very values it already had: leave it out)
    assert written_slots(before, runner.pool) - {runner.graphs.scratch_slot} == set(locs[:3].tolist())


def test_extend_warm_up_writes_only_the_scratch_slot(tiny_model_dir):
    runner = padded_runner(tiny_model_dir[0])
    pool = runner.pool
    before = snapshot(pool)
    runner.graphs.warm_up_extend()
    changed = written_slots(before, pool)
    assert changed == {runner.graphs.scratch_slot}
