"""Stop conditions, parameter validation, policies."""
import pytest

from helpers import random_prompts
from stage3_scheduler.engine import Engine
from stage3_scheduler.policy import CacheAwarePolicy, FifoPolicy
from stage3_scheduler.request import Req
from stage3_scheduler.sampling_params import InvalidParams, SamplingParams

pytestmark = pytest.mark.stage3


@pytest.fixture(scope="module")
def eng(tiny_model_dir):
    return Engine(model=str(tiny_model_dir[0]), device="cpu", max_total_tokens=2048)


@pytest.fixture(scope="module")
def prompt_and_free_run(eng):
    prompt = random_prompts(384, [10], seed=41)[0]
    free = eng.generate(input_ids=prompt, sampling_params={"temperature": 0, "max_new_tokens": 20})["output_ids"]
    return prompt, free


def gen(eng, prompt, **sp):
    out = eng.generate(input_ids=prompt, sampling_params={"temperature": 0, "max_new_tokens": 20, **sp})
    eng.scheduler.check_invariant()
    return out


def test_stop_token_ids(eng, prompt_and_free_run):
    prompt, free = prompt_and_free_run
    out = gen(eng, prompt, stop_token_ids=[free[5]])
    k = free.index(free[5])
    assert out["output_ids"] == free[:k + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": free[5]}


def test_eos_and_ignore_eos_and_min_new_tokens(eng, prompt_and_free_run):
    prompt, free = prompt_and_free_run
    eos = free[4]
    k = free.index(eos)
    eng.runner.eos_token_ids = [eos]
    try:
        assert gen(eng, prompt)["output_ids"] == free[:k + 1]
        assert gen(eng, prompt, ignore_eos=True)["output_ids"] == free
        out = gen(eng, prompt, min_new_tokens=k + 3)["output_ids"]
        assert len(out) >= k + 3 and eos not in out[:k + 3]     # EOS suppressed until then
    finally:
        eng.runner.eos_token_ids = []


def test_stop_string_is_trimmed(eng, prompt_and_free_run):
    prompt, free = prompt_and_free_run
    tok = eng.tokenizer
    full = tok.decode(free, skip_special_tokens=False)
    target = tok.decode(free[6:7], skip_special_tokens=False)
    if not target.strip():
        pytest.skip("token 6 decodes to whitespace only")
    out = gen(eng, prompt, stop=[target])
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": target}
    assert out["text"] == full[:full.find(target)]
    kept = gen(eng, prompt, stop=target, no_stop_trim=True)
    assert kept["text"].endswith(target) or target in kept["text"]


@pytest.mark.parametrize("bad, field", [
    ({"temperature": float("nan")}, "temperature"), ({"top_p": 1.5}, "top_p"), ({"top_k": 0}, "top_k"),
    ({"max_new_tokens": -1}, "max_new_tokens"), ({"min_p": -0.1}, "min_p"), ({"n": 0}, "n"),
    ({"stop": [""]}, "stop"), ({"stop_token_ids": [10**9]}, "stop_token_ids"), ({"bogus": 1}, "bogus"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"ignore_eos": "yes"}, "ignore_eos"),
])
def test_invalid_params_name_the_field(bad, field):
    with pytest.raises(InvalidParams, match=f"^{field}:"):
        SamplingParams.from_dict(bad, vocab_size=1000)


def _req(rid, ids):
    return Req(rid, ids, SamplingParams())


class FakeCache:
    """A prefix-cache test double: knows a fixed set of cached prefixes."""
    page_size = 1

    def __init__(self, prefixes):
        self.prefixes = prefixes

    def match_prefix(self, ids):
        import torch
        n = max((len(p) for p in self.prefixes if ids[:len(p)] == p), default=0)
        return torch.arange(n), None


def test_fifo_and_cache_aware_order():
    reqs = [_req("a", [9, 9, 9]), _req("b", [1, 2, 3, 4]), _req("c", [1, 2, 7]), _req("d", [5])]
    cache = FakeCache([[1, 2, 3], [1, 2], [5]])
    assert [r.rid for r in FifoPolicy().order(reqs, cache)] == ["a", "b", "c", "d"]
    assert [r.rid for r in CacheAwarePolicy().order(reqs, cache)] == ["b", "c", "d", "a"]


# ---- regressions found in review ------------------------------------------------------

def test_stop_string_spelled_in_byte_tokens(eng):
    """A rare character can take up to 4 byte-level tokens: the stop-string window must be
    counted in bytes, or a stop string written byte by byte is never seen."""
    from stage3_scheduler.stops import check_stop
    tok, stop = eng.tokenizer, "😀😀😀"
    byte_ids = [tok.convert_tokens_to_ids(_byte_token(b)) for b in stop.encode()]
    assert tok.decode(byte_ids) == stop and len(byte_ids) == 12
    r = Req("bytes", [1, 2, 3], SamplingParams.from_dict({"max_new_tokens": 100, "stop": [stop]}, 151936))
    reason = None
    for t in [9707] + byte_ids:
        r.output_ids.append(t)
        reason = check_stop(r, [], tok, 40960) or reason
    assert reason == {"type": "stop", "matched": stop}


def _byte_token(b: int) -> str:
    """GPT-2 byte-level BPE spells byte b as this one-character token."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    if b in printable:
        return chr(b)
    return chr(256 + [x for x in range(256) if x not in printable].index(b))


def test_prompt_larger_than_the_pool_is_aborted_not_stuck(tiny_model_dir):
    """With chunked prefill the first chunk fits; the rest never would. Refuse it up front."""
    small = Engine(model=str(tiny_model_dir[0]), device="cpu", max_total_tokens=64, chunked_prefill_size=16)
    out = small.generate(input_ids=list(range(1, 101)), sampling_params={"temperature": 0, "max_new_tokens": 4})
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert "does not fit" in out["meta_info"]["finish_reason"]["message"]
    small.scheduler.check_invariant()
    assert small.runner.pool.allocator.available_size() == small.runner.pool.size


def test_huge_valid_seed_samples(eng):
    """Any seed validation accepts (< 2**63) must work in the sampler's generator."""
    sp = {"temperature": 0.8, "seed": 2**62, "max_new_tokens": 3, "ignore_eos": True}
    a = eng.generate(input_ids=[1, 2, 3], sampling_params=sp)["output_ids"]
    assert len(a) == 3 and a == eng.generate(input_ids=[1, 2, 3], sampling_params=sp)["output_ids"]
