"""Prompt logprobs with the radix cache on: a cached prefix has no hidden states, so a
request that wants prompt logprobs from position s reuses at most s cached tokens (SGLang
limits its match the same way) and computes the rest; the numbers never depend on what
was cached."""
import pytest
import torch

from helpers import random_prompts
from stage4_radix.engine import Engine
from stage4_radix.radix_cache import RadixCache

pytestmark = pytest.mark.stage4
GREEDY = {"temperature": 0.0, "max_new_tokens": 4}


def engine_for(path, **kw):
    kw = {"max_total_tokens": 1024, "schedule_policy": "cache_aware", **kw}
    return Engine(model=str(path), device="cpu", **kw)


def lps(out):
    return [lp for lp, _, _ in out["meta_info"]["input_token_logprobs"]]


@pytest.mark.parametrize("page_size", [1, 4])
def test_second_identical_request_gives_the_same_input_logprobs(tiny_model_dir, page_size):
    eng = engine_for(tiny_model_dir[0], page_size=page_size)
    assert isinstance(eng.cache, RadixCache)
    ids = random_prompts(tiny_model_dir[2].vocab_size, [23], seed=3)[0]
    kw = dict(input_ids=ids, sampling_params=GREEDY, return_logprob=True, top_logprobs_num=2)
    warm = eng.generate(**kw)                                 # caches the whole prompt (and output)
    first = eng.generate(**kw, logprob_start_len=0)
    second = eng.generate(**kw, logprob_start_len=0)
    assert first["meta_info"]["cached_tokens"] == second["meta_info"]["cached_tokens"] == 0
    assert lps(first)[0] is None and len(lps(first)) == len(ids)
    assert torch.allclose(torch.tensor(lps(first)[1:]), torch.tensor(lps(second)[1:]), atol=1e-5)
    top_ids = lambda o: [[t for _, t, _ in k] for k in o["meta_info"]["input_top_logprobs"][1:]]  # noqa: E731
    assert top_ids(first) == top_ids(second) and len(top_ids(first)) == len(ids) - 1
    assert first["output_ids"] == second["output_ids"] == warm["output_ids"]
    # From position 10 on: the first 10 tokens (whole pages of them) may come from the cache.
    late = eng.generate(**kw, logprob_start_len=10)
    assert late["meta_info"]["cached_tokens"] == 10 // page_size * page_size
    assert torch.allclose(torch.tensor(lps(late)[1:]), torch.tensor(lps(first)[11:]), atol=1e-5)
    # Plain requests still use the whole cached prompt.
    assert eng.generate(**kw)["meta_info"]["cached_tokens"] == (len(ids) - 1) // page_size * page_size
    eng.check_integrity()


def test_under_retraction_and_chunks_the_values_hold(tiny_model_dir):
    """A tight pool retracts requests mid-answer; chunks of 5 split the prompts. A retracted
    request comes back through the cache, and its prompt logprobs are neither lost nor doubled."""
    path, _, cfg = tiny_model_dir
    prompts = random_prompts(cfg.vocab_size, [30, 25, 28, 22], seed=9)
    params = [dict(temperature=0.0, max_new_tokens=20, ignore_eos=True)] * 4
    roomy = engine_for(path).generate(input_ids=prompts, sampling_params=params, return_logprob=True,
                                      logprob_start_len=0)
    tight = engine_for(path, chunked_prefill_size=5, max_total_tokens=120, init_new_token_ratio=0.05,
                       min_new_token_ratio=0.05)
    outs = tight.generate(input_ids=prompts, sampling_params=params, return_logprob=True, logprob_start_len=0)
    assert tight.scheduler.total_retractions > 0
    for a, b in zip(roomy, outs):
        assert a["output_ids"] == b["output_ids"] and len(lps(b)) == len(lps(a))
        assert torch.allclose(torch.tensor(lps(a)[1:]), torch.tensor(lps(b)[1:]), atol=1e-5)
    tight.check_integrity()
