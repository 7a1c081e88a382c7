"""Prompt (input) logprobs in the engine: equal to a plain forward pass's log-softmax.

The reference is stage 1's model run once over the whole sequence with no paging, no
batching and no chunks (`forward_logits`, float32): the logits at position p, log-softmaxed,
give the logprob of token p + 1. The engine must give the same numbers however the prompt
was batched or cut into chunks, with SGLang's shape: L - start entries, the first without
a logprob.
"""
import pytest
import torch

from helpers import random_prompts
from stage1_model.generate import forward_logits
from stage3_scheduler import prompt_logprobs
from stage3_scheduler.engine import Engine

pytestmark = pytest.mark.stage3
GREEDY = {"temperature": 0.0, "max_new_tokens": 3}


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    path, _, _ = tiny_model_dir
    make = lambda **kw: Engine(model=str(path), device="cpu", max_total_tokens=1024, **kw)  # noqa: E731
    return make(), make(chunked_prefill_size=3)


@pytest.fixture(scope="module")
def prompts(tiny_model_dir):
    return random_prompts(tiny_model_dir[2].vocab_size, [1, 2, 9, 17, 30], seed=5)


def reference(eng, ids):
    """[T, vocab] log-softmax of one unbatched, unchunked float32 forward pass."""
    return torch.log_softmax(forward_logits(eng.runner.model, ids).float(), dim=-1)


def check(meta, ref, ids, start, top_k=0):
    entries = meta["input_token_logprobs"]
    assert len(entries) == len(ids) - start and entries[0] == [None, ids[start], None]
    assert [t for _, t, _ in entries] == ids[start:]
    got = torch.tensor([lp for lp, _, _ in entries[1:]])
    want = torch.tensor([ref[p, ids[p + 1]].item() for p in range(start, len(ids) - 1)])
    assert torch.allclose(got, want, atol=1e-4), (got, want)
    if top_k:
        tops = meta["input_top_logprobs"]
        assert tops[0] is None and len(tops) == len(entries)
        for p, top in zip(range(start, len(ids) - 1), tops[1:]):
            vals, idx = ref[p].topk(top_k)
            assert [t for _, t, _ in top] == idx.tolist()
            assert torch.allclose(torch.tensor([lp for lp, _, _ in top]), vals, atol=1e-4)


@pytest.mark.parametrize("start", [0, 1, 4])
def test_input_logprobs_equal_a_direct_forward(engines, prompts, start):
    eng, chunked = engines
    ok = [p for p in prompts if len(p) > start]
    for e in (eng, chunked):                    # one batch, and in chunks of 3 tokens
        outs = e.generate(input_ids=ok, sampling_params=GREEDY, return_logprob=True, logprob_start_len=start,
                          top_logprobs_num=3)
        for ids, out in zip(ok, outs):
            ref = reference(e, ids + out["output_ids"])
            check(out["meta_info"], ref, ids, start, top_k=3)
            # output logprobs come from the same forward: position L-1+i predicts output token i
            for i, (lp, t, _) in enumerate(out["meta_info"]["output_token_logprobs"]):
                assert lp == pytest.approx(ref[len(ids) - 1 + i, t].item(), abs=1e-4)
        e.scheduler.check_invariant()


def test_chunked_equals_unchunked_and_outputs_unchanged(engines, prompts):
    eng, chunked = engines
    kw = dict(input_ids=prompts, sampling_params=GREEDY, return_logprob=True)
    plain = eng.generate(**kw)
    a, b = eng.generate(**kw, logprob_start_len=0), chunked.generate(**kw, logprob_start_len=0)
    assert [o["output_ids"] for o in a] == [o["output_ids"] for o in b] == [o["output_ids"] for o in plain]
    for x, y in zip(a, b):
        got, want = (torch.tensor([lp or 0.0 for lp, _, _ in o["meta_info"]["input_token_logprobs"]]) for o in (x, y))
        assert torch.allclose(got, want, atol=1e-5)
    assert all("input_token_logprobs" not in o["meta_info"] for o in plain)


def test_max_new_tokens_zero_scores_the_prompt(engines, prompts):
    eng, _ = engines
    out = eng.generate(input_ids=prompts[3], sampling_params={"max_new_tokens": 0}, return_logprob=True,
                       logprob_start_len=0)
    assert out["output_ids"] == [] and out["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    check(out["meta_info"], reference(eng, prompts[3]), prompts[3], 0)
    plain = eng.generate(input_ids=prompts[3], sampling_params={"max_new_tokens": 0})
    assert plain["output_ids"] == [] and "input_token_logprobs" not in plain["meta_info"]
    eng.scheduler.check_invariant()


def test_an_off_by_one_in_the_positions_is_caught(engines, prompts, monkeypatch):
    """The check above can fail: shift every row by one token and it must."""
    eng, _ = engines
    real = prompt_logprobs.plan

    def shifted(batch):
        p = real(batch)
        if p is not None:
            p.rows = [max(0, r - 1) for r in p.rows]
        return p
    monkeypatch.setattr(prompt_logprobs, "plan", shifted)
    ids = prompts[4]
    out = eng.generate(input_ids=ids, sampling_params=GREEDY, return_logprob=True, logprob_start_len=0)
    with pytest.raises(AssertionError):
        check(out["meta_info"], reference(eng, ids + out["output_ids"]), ids, 0)


def test_bad_start_is_refused(engines, prompts):
    with pytest.raises(ValueError, match="logprob_start_len"):
        engines[0].generate(input_ids=prompts[2], return_logprob=True, logprob_start_len=len(prompts[2]))
