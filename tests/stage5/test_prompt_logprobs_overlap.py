"""Prompt logprobs under stage 5: the overlap scheduler gives what the synchronous one gives,
plain requests pay nothing for the feature, and the decode graphs never see it."""
from types import SimpleNamespace

import pytest
import torch

from helpers import random_prompts
from stage2_runner.model_runner import ModelRunner
from stage3_scheduler.request import Req
from stage3_scheduler.sampling_params import SamplingParams
from stage5_tp_cudagraph.engine import Engine
from stage5_tp_cudagraph.runner import GraphModelRunner

pytestmark = pytest.mark.stage5


def run(path, overlap: bool, prompts, starts, max_new, **kw):
    """Step by hand; returns per request (output ids, streamed outputs with prompt logprobs)."""
    eng = Engine(model=str(path), device="cpu", disable_overlap=not overlap, max_total_tokens=1024, **kw)
    vocab = eng.runner.config.vocab_size
    reqs = [Req(f"r{i}", list(p), SamplingParams.from_dict({"temperature": 0.0, "max_new_tokens": n}, vocab),
                return_logprob=True, top_logprobs_num=2, logprob_start_len=s, token_ids_logprob=[1, 2])
            for i, (p, s, n) in enumerate(zip(prompts, starts, max_new))]
    for r in reqs:
        eng.scheduler.add_request(r)
    seen = {r.rid: [] for r in reqs}
    while eng.scheduler.has_work():
        for out in eng.scheduler.step():
            if out.input_logprobs:
                seen[out.rid].append((out.input_logprobs, out.input_top_logprobs, out.input_ids_logprobs))
        eng.check_integrity()
    return [(r.output_ids, seen[r.rid]) for r in reqs]


def test_overlap_equals_synchronous(tiny_model_dir):
    path, _, cfg = tiny_model_dir
    prompts = random_prompts(cfg.vocab_size, [20, 7, 33, 12, 1], seed=4)
    starts, max_new = [0, -1, 5, 11, 0], [6, 3, 0, 1, 4]
    sync = run(path, False, prompts, starts, max_new, chunked_prefill_size=8)
    over = run(path, True, prompts, starts, max_new, chunked_prefill_size=8)
    for (ids_a, seen_a), (ids_b, seen_b), s, p in zip(sync, over, starts, prompts):
        assert ids_a == ids_b
        assert len(seen_a) == len(seen_b) == (s >= 0)          # once, with the first output
        if s >= 0:
            (lp_a, top_a, ids_lp_a), (lp_b, top_b, ids_lp_b) = seen_a[0], seen_b[0]
            assert len(lp_a) == len(p) - s and lp_a[0] == (None, p[s])
            assert [t for _, t in lp_a] == [t for _, t in lp_b]
            assert torch.allclose(torch.tensor([x or 0.0 for x, _ in lp_a]), torch.tensor([x or 0.0 for x, _ in lp_b]))
            assert top_a[0] is None and [[t for _, t in k] for k in top_a[1:]] == [[t for _, t in k] for k in top_b[1:]]
            assert ids_lp_a[0] is None and all([t for _, t in k] == [1, 2] for k in ids_lp_b[1:])


def test_plain_requests_pay_nothing(tiny_model_dir, monkeypatch):
    """No request asks: no hidden rows are kept and lm_head sees one row per request, as before."""
    path, _, cfg = tiny_model_dir
    eng = Engine(model=str(path), device="cpu", max_total_tokens=1024)
    rows, kept = [], []
    real_logits, real_forward = eng.runner.model.compute_logits, eng.runner.forward
    monkeypatch.setattr(eng.runner.model, "compute_logits", lambda h: rows.append(h.shape[0]) or real_logits(h))
    monkeypatch.setattr(eng.runner, "forward", lambda b: kept.append(b.hidden_rows) or real_forward(b))
    prompts = random_prompts(cfg.vocab_size, [15, 9], seed=6)
    eng.generate(input_ids=prompts, sampling_params={"temperature": 0.0, "max_new_tokens": 3}, return_logprob=True)
    assert all(k is None for k in kept) and rows and max(rows) <= 2
    rows.clear()
    eng.generate(input_ids=prompts[0], sampling_params={"temperature": 0.0, "max_new_tokens": 3},
                 return_logprob=True, logprob_start_len=0)
    assert sum(rows) == 14 + 3               # 14 prompt positions, then the 3 sampling rows


def test_decode_graphs_never_get_a_batch_that_wants_hidden_states(monkeypatch):
    """A one-token-per-request extend is a "decode" batch; if it wants prompt logprobs it runs
    eagerly (the graph returns logits only). Every other decode batch still replays."""
    monkeypatch.setattr(ModelRunner, "forward", lambda self, batch: "eager")
    runner = object.__new__(GraphModelRunner)
    runner.graphs = SimpleNamespace(max_bs=8, run=lambda batch: "graph")
    decode = dict(is_decode=True, batch_size=2)
    assert GraphModelRunner.forward(runner, SimpleNamespace(**decode, hidden_rows=None)) == "graph"
    assert GraphModelRunner.forward(runner, SimpleNamespace(**decode, hidden_rows=torch.tensor([0]))) == "eager"
