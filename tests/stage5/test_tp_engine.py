"""The offline Engine with tp=2 (CPU, gloo) == the Engine with tp=1, token for token.

One tp=2 Engine serves the whole module (rank 0 is this process, rank 1 a spawned
follower). Beyond equal greedy outputs, every rank's KV books must balance after each
run (`stats()["tp_ranks"]`), also after an abort and after retractions, and closing
the Engine must leave no follower process behind.
"""
import pytest

from helpers import random_prompts
from stage3_scheduler.request import Req
from stage3_scheduler.sampling_params import SamplingParams
from stage5_tp_cudagraph.engine import Engine
from stage5_tp_cudagraph.parallel import get_tp

pytestmark = pytest.mark.stage5
OPTS = dict(model="demo", device="cpu", max_total_tokens=1024, max_running_requests=8, chunked_prefill_size=64)
PROMPTS = random_prompts(151643, [5, 23, 70, 9, 41], seed=4)


@pytest.fixture(scope="module")
def engines():
    ref = Engine(**OPTS)
    tp = Engine(**OPTS, tp=2)
    followers = list(tp.followers)
    yield ref, tp
    tp.close()
    assert get_tp() is None
    assert not any(p.is_alive() for p in followers), "a TP follower outlived close()"


def assert_books_balance(eng, ranks: int = 2):
    per_rank = eng.scheduler.stats()["tp_ranks"]
    assert len(per_rank) == ranks
    for s in per_rank:
        assert s["num_running"] == s["num_waiting"] == s["kv_running_slots"] == 0, s
        assert s["kv_free_slots"] + s["kv_cached_slots"] == s["kv_pool_size"], s
    assert per_rank[0] == per_rank[1], "ranks drifted apart"


def test_greedy_equals_tp1(engines):
    ref, tp = engines
    params = [{"temperature": 0, "max_new_tokens": n, "ignore_eos": True} for n in (12, 3, 20, 1, 8)]
    want = ref.generate(input_ids=PROMPTS, sampling_params=params)
    got = tp.generate(input_ids=PROMPTS, sampling_params=params)
    assert [g["output_ids"] for g in got] == [w["output_ids"] for w in want]
    assert [g["meta_info"]["cached_tokens"] for g in got] == [w["meta_info"]["cached_tokens"] for w in want]
    assert_books_balance(tp)


def test_seeded_sampling_and_shared_prefix_equal_tp1(engines):
    ref, tp = engines
    prompts = [PROMPTS[2], PROMPTS[2][:50] + PROMPTS[0], "Hello world"]
    params = {"temperature": 0.8, "top_p": 0.9, "seed": 7, "max_new_tokens": 10, "ignore_eos": True}
    ids = [p if isinstance(p, list) else ref.tokenizer.encode(p) for p in prompts]
    want = ref.generate(input_ids=ids, sampling_params=params)
    got = tp.generate(input_ids=ids, sampling_params=params)
    assert [g["output_ids"] for g in got] == [w["output_ids"] for w in want]
    assert_books_balance(tp)


def test_abort_and_retraction_free_slots_on_every_rank(engines):
    _, tp = engines
    sched, vocab = tp.scheduler, tp.runner.config.vocab_size
    reqs = [Req(f"tp-abort-{i}", list(p), SamplingParams.from_dict({"temperature": 0, "max_new_tokens": 150,
                                                                    "ignore_eos": True}, vocab))
            for i, p in enumerate(PROMPTS * 2)]
    for r in reqs:
        sched.add_request(r)
    for _ in range(6):
        sched.step()
    sched.abort(reqs[1].rid)
    sched.abort(reqs[6].rid)
    while sched.has_work():
        sched.step()
    assert reqs[1].finish_reason["type"] == "abort"
    assert sched.total_retractions > 0, "the pool should be small enough to retract"
    assert_books_balance(tp)


def test_stop_regex_is_refused_under_tp(engines):
    """Every rank checks stops itself and a regex search is time-bounded, so one rank could
    end a request the others keep: refused (with a clear message) until that is solved."""
    _, tp = engines
    params = SamplingParams.from_dict({"max_new_tokens": 4, "stop_regex": "x+"}, tp.runner.config.vocab_size)
    with pytest.raises(ValueError, match="stop_regex is not supported with tensor parallelism"):
        tp.scheduler.add_request(Req("tp-regex", list(PROMPTS[0]), params))
    assert_books_balance(tp)


def test_default_chunk_size_is_the_ranks_minimum():
    """With no chunk size given, TP ranks must cut the same chunks: the scheduler gets the
    minimum of the ranks' defaults (here a stand-in group whose smallest rank says 1024)."""
    from types import SimpleNamespace
    from stage3_scheduler.scheduler import SchedulerArgs
    eng = Engine(model="demo", device="cpu", max_total_tokens=256)
    asked = []
    eng.tp = SimpleNamespace(rank=1, min_int=lambda n: asked.append(n) or 1024)   # rank > 0: no broadcaster
    sched = eng.make_scheduler(SchedulerArgs())
    assert asked == [2048] and sched.args.chunked_prefill_size == 1024
    assert eng.make_scheduler(SchedulerArgs(chunked_prefill_size=64)).args.chunked_prefill_size == 64
    eng.tp = None
    eng.close()
