"""Overlap scheduling == stage 3's synchronous loop, token for token (greedy, CPU).

Every case runs the same requests through the stage-5 Engine twice, with
`disable_overlap=True` (stage 3's Scheduler) and without (OverlapScheduler), stepping by
hand so the KV books are checked after every step. Beyond equal outputs, the streamed
tokens of each request must add up to exactly its output: the extra token a finished
request computes in the step after it stopped is never emitted.
"""
import pytest

from helpers import random_prompts
from stage3_scheduler.request import Req
from stage3_scheduler.sampling_params import SamplingParams
from stage5_tp_cudagraph.engine import Engine
from stage5_tp_cudagraph.overlap import OverlapScheduler

pytestmark = pytest.mark.stage5
GREEDY = {"temperature": 0.0}


def engine(path, overlap: bool, **kw):
    kw.setdefault("max_total_tokens", 2048)
    eng = Engine(model=str(path), device="cpu", disable_overlap=not overlap, **kw)
    assert isinstance(eng.scheduler, OverlapScheduler) == overlap
    return eng


def run(eng, prompts, params, abort_at=None):
    """Step to completion; returns (reqs, streamed tokens per rid). abort_at=(step, index)."""
    vocab = eng.runner.config.vocab_size
    reqs = [Req(f"r{i}", list(p), SamplingParams.from_dict(dict(GREEDY, **sp), vocab))
            for i, (p, sp) in enumerate(zip(prompts, params))]
    for r in reqs:
        eng.scheduler.add_request(r)
    streamed = {r.rid: [] for r in reqs}
    step = 0
    while eng.scheduler.has_work():
        for out in eng.scheduler.step():
            streamed[out.rid] += out.new_token_ids
        eng.check_integrity()
        step += 1
        if abort_at and step == abort_at[0]:
            eng.scheduler.abort(reqs[abort_at[1]].rid)
    assert all(r.finished for r in reqs) and not eng.scheduler.running
    return reqs, streamed


def both(path, prompts, params, **kw):
    results = []
    for overlap in (False, True):
        eng = engine(path, overlap, **kw)
        reqs, streamed = run(eng, prompts, params)
        for r in reqs:
            assert streamed[r.rid] == r.output_ids, f"{r.rid}: streamed tokens != output (overlap={overlap})"
        results.append([(r.output_ids, r.finish_reason) for r in reqs])
        eng.check_integrity()
    assert results[1] == results[0]
    return results[0]


@pytest.fixture(scope="module")
def vocab(tiny_model_dir):
    return tiny_model_dir[2].vocab_size


def test_mixed_lengths_and_tiny_max_new_tokens(tiny_model_dir, vocab):
    prompts = random_prompts(vocab, [3, 17, 40, 9, 25, 1], seed=1)
    params = [dict(max_new_tokens=n) for n in (1, 2, 3, 20, 33, 2)]
    out = both(tiny_model_dir[0], prompts, params)
    assert [len(o) for o, _ in out] == [1, 2, 3, 20, 33, 2]


def test_chunked_prefill(tiny_model_dir, vocab):
    prompts = random_prompts(vocab, [50, 70, 5, 33], seed=2)
    both(tiny_model_dir[0], prompts, [dict(max_new_tokens=n) for n in (9, 4, 12, 7)], chunked_prefill_size=16)


def test_retraction_under_a_tiny_pool(tiny_model_dir, vocab):
    prompts = random_prompts(vocab, [12, 9, 14, 10, 8], seed=3)
    params = [dict(max_new_tokens=n) for n in (20, 25, 18, 22, 24)]
    kw = dict(max_total_tokens=96, init_new_token_ratio=0.05, min_new_token_ratio=0.05)
    both(tiny_model_dir[0], prompts, params, **kw)
    eng = engine(tiny_model_dir[0], True, **kw)
    run(eng, prompts, params)
    assert eng.scheduler.total_retractions > 0           # the case really retracts


@pytest.mark.parametrize("page_size", [1, 4])
def test_radix_hits(tiny_model_dir, vocab, page_size):
    S, A, B, C = random_prompts(vocab, [30, 6, 9, 4], seed=4)
    prompts = [S + A, S + B, S + C, S[:13] + C, list(S)]
    out = both(tiny_model_dir[0], prompts, [dict(max_new_tokens=8)] * 5,
               schedule_policy="cache_aware", page_size=page_size)
    assert all(len(o) == 8 for o, _ in out)


def test_stop_strings_and_stop_tokens(tiny_model_dir, vocab):
    path = tiny_model_dir[0]
    prompts = random_prompts(vocab, [6, 11, 8], seed=5)
    ref, _ = run(engine(path, False), prompts, [dict(max_new_tokens=24)] * 3)
    eng = engine(path, False)
    text = eng.tokenizer.decode(ref[0].output_ids[5:9])
    params = [dict(max_new_tokens=24, stop=[text]), dict(max_new_tokens=24, stop_token_ids=[ref[1].output_ids[6]]),
              dict(max_new_tokens=24, stop_token_ids=[ref[2].output_ids[2]], min_new_tokens=4)]
    out = both(path, prompts, params)
    assert out[0][1]["type"] == "stop" and len(out[0][0]) < 24
    assert out[1][1] == {"type": "stop", "matched": ref[1].output_ids[6]} and len(out[1][0]) <= 7
    assert len(out[2][0]) >= 4


def test_abort_mid_decode(tiny_model_dir, vocab):
    path = tiny_model_dir[0]
    prompts = random_prompts(vocab, [6, 9, 7], seed=6)
    params = [dict(max_new_tokens=30)] * 3
    full, _ = run(engine(path, False), prompts, params)
    for overlap in (False, True):
        reqs, streamed = run(engine(path, overlap), prompts, params, abort_at=(6, 1))
        assert reqs[1].finish_reason == {"type": "abort", "message": "aborted while running"}
        assert 0 < len(reqs[1].output_ids) < 30
        assert reqs[1].output_ids == full[1].output_ids[:len(reqs[1].output_ids)]
        assert streamed["r1"] == reqs[1].output_ids
        assert [r.output_ids for r in reqs[::2]] == [r.output_ids for r in full[::2]]


def test_sampling_with_seeds_and_penalties(tiny_model_dir, vocab):
    """Seeded sampling and penalties see the same step and history with the one-step lag."""
    prompts = random_prompts(vocab, [5, 8, 6], seed=7)
    params = [dict(temperature=0.8, seed=11, max_new_tokens=15),
              dict(temperature=0.7, top_k=20, seed=5, frequency_penalty=0.8, max_new_tokens=15),
              dict(repetition_penalty=1.5, presence_penalty=0.5, max_new_tokens=15, min_new_tokens=10,
                   logit_bias={3: 4.0, 5: -100.0})]
    both(tiny_model_dir[0], prompts, params)


def test_engine_generate_drains_in_flight(tiny_model_dir, vocab):
    eng = engine(tiny_model_dir[0], True)
    outs = eng.generate(input_ids=random_prompts(vocab, [4, 7], seed=8), sampling_params=dict(GREEDY, max_new_tokens=5))
    assert [len(o["output_ids"]) for o in outs] == [5, 5]
    assert eng.scheduler.in_flight is None and not eng.scheduler.has_work()
    eng.check_integrity()


def test_first_token_comes_out_of_its_prefill_step(tiny_model_dir, vocab):
    """A request's first token is reported by the step that ran its prefill, as in stage 3,
    also when it arrives while others decode: time to first token never includes the next
    batch's launch (on CPU, a whole decode step). Later tokens still come one step late."""
    a, b = random_prompts(vocab, [6, 5], seed=13)
    params = SamplingParams.from_dict(dict(GREEDY, max_new_tokens=8), vocab)
    for overlap in (False, True):
        sched = engine(tiny_model_dir[0], overlap).scheduler
        sched.add_request(Req("a", a, params))
        assert [(o.rid, len(o.new_token_ids)) for o in sched.step()] == [("a", 1)]
        sched.step()                                      # "a" decodes
        sched.add_request(Req("b", b, params))
        firsts = [o.new_token_ids for o in sched.step() if o.rid == "b"]
        assert len(firsts) == 1 and len(firsts[0]) == 1, f"overlap={overlap}: no first token for b"
        while sched.has_work():
            sched.step()


def test_abort_reason_says_where_the_request_was(tiny_model_dir, vocab):
    eng = engine(tiny_model_dir[0], True)
    waiting = Req("w", random_prompts(vocab, [5], seed=9)[0], SamplingParams.from_dict(GREEDY, vocab))
    eng.scheduler.add_request(waiting)
    eng.scheduler.abort("w")
    assert waiting.finish_reason == {"type": "abort", "message": "aborted in the waiting queue"}
    eng.check_integrity()


def test_logprob_outputs_equal_with_and_without_overlap(tiny_model_dir, vocab):
    """return_logprob, top_logprobs_num and token_ids_logprob come back for the same tokens,
    with the same values, when results are read one step late."""
    prompts = random_prompts(vocab, [6, 9], seed=10)
    results = []
    for overlap in (False, True):
        eng = engine(tiny_model_dir[0], overlap)
        reqs = [Req(f"l{i}", p, SamplingParams.from_dict(dict(GREEDY, max_new_tokens=6), vocab),
                    return_logprob=True, top_logprobs_num=2, token_ids_logprob=[3, 7, 11][:i + 2])
                for i, p in enumerate(prompts)]
        for r in reqs:
            eng.scheduler.add_request(r)
        got = {r.rid: [] for r in reqs}
        while eng.scheduler.has_work():
            for out in eng.scheduler.step():
                got[out.rid].append((out.new_token_ids, out.logprobs, out.top_logprobs, out.ids_logprobs))
        flat = {rid: [sum((x[k] for x in steps), []) for k in range(4)] for rid, steps in got.items()}
        assert all(len(f[3]) == len(f[0]) == 6 for f in flat.values())     # one entry per token
        results.append(flat)
    for rid in results[0]:
        ids0, lp0, top0, idl0 = results[0][rid]
        ids1, lp1, top1, idl1 = results[1][rid]
        assert ids0 == ids1 and [t for _, t in lp0] == [t for _, t in lp1]
        assert [[t for _, t in pos] for pos in idl0] == [[t for _, t in pos] for pos in idl1]
        for a, b in zip(idl0, idl1):
            assert [lp for lp, _ in a] == pytest.approx([lp for lp, _ in b], abs=1e-5)


def text_run(eng, prompts, params, abort_at=None):
    """`run` for text prompts on the demo model (grammars need its real vocabulary)."""
    return run(eng, [eng.tokenizer.encode(p) for p in prompts], params, abort_at)


GRAMMAR_CASES = [dict(regex="(yes |no ){6}"), dict(max_new_tokens=25, ignore_eos=True),
                 dict(json_schema={"type": "object", "properties": {"ok": {"type": "boolean"}},
                                   "required": ["ok"], "additionalProperties": False}),
                 dict(ebnf='root ::= ("red" | "blue") " " ("cat" | "dog")', temperature=1.0, seed=4),
                 dict(max_new_tokens=30, ignore_eos=True, temperature=0.9, seed=2)]


@pytest.mark.parametrize("kw", [{}, dict(max_total_tokens=64, chunked_prefill_size=8, init_new_token_ratio=0.05,
                                         min_new_token_ratio=0.05)])
def test_grammar_requests_overlap_equals_synchronous(kw):
    """Grammar rows force a synchronous step (their mask needs the token in flight); mixed
    with plain rows, under retraction and chunked prefill, overlap == stage 3 token for token."""
    prompts = ["Hello there", "Once upon a time " * 4, "Is it", "Colors and pets", "Tell me"]
    results = []
    for overlap in (False, True):
        eng = engine("demo", overlap, **kw)
        reqs, streamed = text_run(eng, prompts, GRAMMAR_CASES)
        assert all(streamed[r.rid] == r.output_ids for r in reqs)
        results.append([(r.output_ids, r.finish_reason) for r in reqs])
        if kw:
            assert eng.scheduler.total_retractions > 0
    assert results[1] == results[0]
    assert all(reason["type"] == "stop" for i, (_, reason) in enumerate(results[0]) if i in (0, 2, 3))


def test_grammar_request_aborted_in_flight():
    for overlap in (False, True):
        eng = engine("demo", overlap)
        reqs, _ = text_run(eng, ["Hello", "Hi"], [dict(regex="(yes |no ){20}"), dict(max_new_tokens=20)],
                           abort_at=(4, 0))
        assert reqs[0].finish_reason["type"] == "abort" and reqs[1].finish_reason["type"] == "length"
        eng.check_integrity()
