"""Stage 4 through the Engine: with the radix cache == without it, token for token.

Requests are stepped by hand (`run_checked`) so the leak invariant is checked after every
scheduler step, counted (scheduler.check_invariant) and page by page (cache.check_integrity).
"""
import pytest
import torch

from helpers import random_prompts
from stage3_scheduler.request import Req
from stage3_scheduler.sampling_params import SamplingParams
from stage4_radix.engine import Engine
from stage4_radix.radix_cache import RadixCache

pytestmark = pytest.mark.stage4
GREEDY = {"temperature": 0.0, "ignore_eos": True}


# An optimistic admission estimate (reserve 5% of max_new_tokens) in a small pool: decode
# steps run out of slots and the scheduler must retract.
PRESSURE = dict(max_total_tokens=96, init_new_token_ratio=0.05, min_new_token_ratio=0.05)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: OpenMP threads cost far more than they give (measured 30x slower on a
    busy 2-core machine), so this module runs torch on one thread and restores it after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def engine_for(path, **kw):
    kw.setdefault("max_total_tokens", 2048)
    kw.setdefault("schedule_policy", "cache_aware")
    return Engine(model=str(path), device="cpu", **kw)


@pytest.fixture(scope="module")
def workload(tiny_model_dir):
    """Wave 1 warms the cache; wave 2 shares its prefixes at several depths."""
    _, _, cfg = tiny_model_dir
    S, A, B, C, D, E, F = random_prompts(cfg.vocab_size, [37, 9, 12, 5, 20, 10, 15], seed=41)
    wave1 = [S + A]
    wave2 = [S + A + B, S + C, S + D, S[:20] + E, F, list(S)]
    max_new = [10, 12, 14, 9, 16, 12, 10]
    return wave1, wave2, max_new


@pytest.fixture(scope="module")
def reference(tiny_model_dir, workload):
    wave1, wave2, max_new = workload
    eng = engine_for(tiny_model_dir[0], disable_radix_cache=True, schedule_policy="fifo")
    assert not isinstance(eng.cache, RadixCache)
    outs = eng.generate(input_ids=wave1 + wave2, sampling_params=[dict(GREEDY, max_new_tokens=n) for n in max_new])
    return [o["output_ids"] for o in outs]


def run_checked(eng: Engine, prompts, max_new, on_step=None) -> list[Req]:
    """Engine.generate, one scheduler step at a time, checking the KV books after each step."""
    vocab = eng.runner.config.vocab_size
    reqs = [Req(f"r{i}", list(p), SamplingParams.from_dict(dict(GREEDY, max_new_tokens=n), vocab))
            for i, (p, n) in enumerate(zip(prompts, max_new))]
    for r in reqs:
        eng.scheduler.add_request(r)
    while eng.scheduler.has_work():
        eng.scheduler.step()
        eng.check_integrity()
        if on_step:
            on_step(eng)
    assert all(r.finished for r in reqs) and not eng.scheduler.running
    return reqs


def lcp(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def expected_cached(prompt, finished_seqs, P) -> int:
    """A finished request leaves prompt + output minus its last token (never forwarded),
    page-aligned; a new prompt reuses the longest such prefix, minus at least one token."""
    best = max((lcp(prompt, s[:(len(s) - 1) // P * P]) for s in finished_seqs), default=0)
    return min(best // P * P, (len(prompt) - 1) // P * P)


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_cache_equals_no_cache_and_skips_cached_tokens(tiny_model_dir, workload, reference, page_size):
    wave1, wave2, max_new = workload
    eng = engine_for(tiny_model_dir[0], page_size=page_size)
    first = run_checked(eng, wave1, max_new[:1])
    rest = run_checked(eng, wave2, max_new[1:])
    reqs = first + rest
    assert [r.output_ids for r in reqs] == reference
    warm = [r.all_ids for r in first]
    assert first[0].cached_tokens == 0
    assert [r.cached_tokens for r in rest] == [expected_cached(p, warm, page_size) for p in wave2]
    assert sum(r.cached_tokens for r in rest) > 0
    assert eng.scheduler.cache_hit_tokens == sum(r.cached_tokens for r in reqs)
    # Forwarded: every uncached prompt token once (the extend), then max_new - 1 decode tokens
    # (the first output token comes from the extend's logits).
    expected = sum(len(r.input_ids) - r.cached_tokens + len(r.output_ids) - 1 for r in reqs)
    assert eng.scheduler.forwarded_tokens == expected
    assert eng.scheduler.total_retractions == 0


@pytest.mark.parametrize("page_size", [1, 4])
def test_retraction_with_cache_keeps_outputs(tiny_model_dir, workload, reference, page_size):
    wave1, wave2, max_new = workload
    eng = engine_for(tiny_model_dir[0], page_size=page_size, **PRESSURE)
    reqs = run_checked(eng, wave1, max_new[:1]) + run_checked(eng, wave2, max_new[1:])
    assert eng.scheduler.total_retractions > 0
    assert [r.output_ids for r in reqs] == reference
    assert sum(r.cached_tokens for r in reqs) > 0


@pytest.mark.parametrize("page_size,chunk", [(1, 7), (16, 16)])
def test_chunked_prefill_with_cache_keeps_outputs(tiny_model_dir, workload, reference, page_size, chunk):
    wave1, wave2, max_new = workload
    eng = engine_for(tiny_model_dir[0], page_size=page_size, chunked_prefill_size=chunk)
    # One wave: later requests reuse what earlier ones handed to the cache mid-prefill.
    reqs = run_checked(eng, wave1 + wave2, max_new)
    assert [r.output_ids for r in reqs] == reference
    assert sum(r.cached_tokens for r in reqs) > 0


def test_retracted_request_rehits_the_prefix_cache(tiny_model_dir, workload, reference):
    wave1, wave2, max_new = workload
    eng = engine_for(tiny_model_dir[0], **PRESSURE)
    run_checked(eng, wave1, max_new[:1])
    admitted, retracted, returned = {}, set(), {}   # rid -> cached_tokens; rids; rid -> cached_len

    def watch(eng):
        retracted.update(r.rid for r in eng.scheduler.waiting if r.num_retractions)
        for r in eng.scheduler.running:
            admitted.setdefault(r.rid, r.cached_tokens)
            if r.rid in retracted and r.rid not in returned:
                returned[r.rid] = r.cached_len

    reqs = run_checked(eng, wave2, max_new[1:], on_step=watch)
    assert [r.output_ids for r in reqs] == reference[1:]
    assert returned, "the workload should retract a request and bring it back"
    assert any(n > 0 for n in returned.values()), f"no retracted request re-hit the cache: {returned}"
    # cached_tokens reports the first admission; a re-admission must not change or add to it.
    assert {r.rid: r.cached_tokens for r in reqs} == admitted
    assert eng.scheduler.cache_hit_tokens == sum(admitted.values())     # wave 1 hit nothing


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_fully_cached_prompt_at_a_page_boundary_still_computes(tiny_model_dir, page_size):
    eng = engine_for(tiny_model_dir[0], page_size=page_size)
    long, short = random_prompts(384, [32, page_size], seed=43)     # 2 and 1 pages when P=16
    for prompt in (long, short):
        (a,) = run_checked(eng, [prompt], [4])
        assert len(eng.cache.match_prefix(prompt)[0]) == len(prompt)   # all of it is cached
        fwd = eng.scheduler.forwarded_tokens
        (b,) = run_checked(eng, [prompt], [4])             # ... yet its last page is recomputed
        assert b.output_ids == a.output_ids
        assert b.cached_tokens == (len(prompt) - 1) // page_size * page_size
        assert eng.scheduler.forwarded_tokens - fwd == len(prompt) - b.cached_tokens + 3


def test_a_node_in_use_is_never_evicted(tiny_model_dir, workload, reference):
    wave1, wave2, max_new = workload
    eng = engine_for(tiny_model_dir[0])
    run_checked(eng, wave1, max_new[:1])
    pinned = []

    def evict_everything(eng):
        eng.cache.evict(10**9)            # as hard as the scheduler could ever push
        assert eng.cache.evictable_size() == 0
        for r in eng.scheduler.running:   # every running request's prefix is still there
            slots, _ = eng.cache.match_prefix(r.all_ids[:r.cached_len])
            assert slots.tolist() == r.slots[:r.cached_len]
            pinned.append(r.cached_len)
        eng.check_integrity()

    reqs = run_checked(eng, wave2, max_new[1:], on_step=evict_everything)
    assert [r.output_ids for r in reqs] == reference[1:]
    assert max(pinned) > 0 and eng.cache.protected_size() == 0


def test_flush_is_refused_while_running(tiny_model_dir, workload):
    wave1, _, max_new = workload
    eng = engine_for(tiny_model_dir[0])
    run_checked(eng, wave1, max_new[:1])
    held = eng.cache.evictable_size()
    assert held > 0
    r = Req("busy", wave1[0], SamplingParams.from_dict(dict(GREEDY, max_new_tokens=3), 384))
    eng.scheduler.add_request(r)
    assert eng.flush_cache() is False                      # waiting counts as busy
    eng.scheduler.step()
    assert eng.scheduler.running and eng.flush_cache() is False
    eng.check_integrity()
    while eng.scheduler.has_work():
        eng.scheduler.step()
    assert eng.flush_cache() is True
    assert eng.cache.evictable_size() == 0 and not eng.cache.root.children
    assert eng.runner.pool.allocator.available_size() == eng.runner.pool.size
    eng.check_integrity()
    (again,) = run_checked(eng, wave1, [2])
    assert again.cached_tokens == 0


def test_disable_radix_cache_falls_back_to_stage3(tiny_model_dir, workload, reference):
    wave1, wave2, max_new = workload
    eng = engine_for(tiny_model_dir[0], disable_radix_cache=True)
    reqs = run_checked(eng, wave1, max_new[:1]) + run_checked(eng, wave2, max_new[1:])
    assert [r.output_ids for r in reqs] == reference
    assert all(r.cached_tokens == 0 for r in reqs)


def test_abort_mid_decode_returns_every_slot(tiny_model_dir, workload):
    wave1, wave2, _ = workload
    eng = engine_for(tiny_model_dir[0], page_size=4)
    run_checked(eng, wave1, [3])
    vocab = eng.runner.config.vocab_size
    reqs = [Req(f"a{i}", p, SamplingParams.from_dict(dict(GREEDY, max_new_tokens=20), vocab))
            for i, p in enumerate(wave2[:3])]
    for r in reqs:
        eng.scheduler.add_request(r)
    for _ in range(3):
        eng.scheduler.step()
    eng.scheduler.abort("a0")                              # mid-decode, holding a locked prefix
    eng.check_integrity()
    while eng.scheduler.has_work():
        eng.scheduler.step()
        eng.check_integrity()
    assert reqs[0].finish_reason["type"] == "abort" and eng.cache.protected_size() == 0
    assert eng.flush_cache() and eng.runner.pool.allocator.available_size() == eng.runner.pool.size


@pytest.mark.parametrize("page_size", [1, 4])
def test_requests_arriving_together_share_a_new_prefix(tiny_model_dir, page_size):
    """Nothing is cached yet, and four prompts share 40 new tokens: the scheduler computes
    the first, caches its prompt right after the extend, and the others hit it a step later."""
    T, *tails = random_prompts(384, [40, 6, 5, 7, 4], seed=44)
    prompts, max_new = [T + t for t in tails], [5, 6, 4, 7]
    ref = engine_for(tiny_model_dir[0], disable_radix_cache=True)
    expected = [r.output_ids for r in run_checked(ref, prompts, max_new)]
    eng = engine_for(tiny_model_dir[0], page_size=page_size)
    reqs = run_checked(eng, prompts, max_new)
    assert [r.output_ids for r in reqs] == expected
    P, first = page_size, prompts[0][:len(prompts[0]) // page_size * page_size]
    assert reqs[0].cached_tokens == 0
    assert [r.cached_tokens for r in reqs[1:]] == [min(lcp(p, first) // P * P, (len(p) - 1) // P * P)
                                                  for p in prompts[1:]]
