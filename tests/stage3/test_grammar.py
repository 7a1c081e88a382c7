"""Structured output and stop_regex in the stage-3 engine, on the demo model (real Qwen vocabulary).

The demo model's weights are random, so without a grammar it writes gibberish: each test
that checks a grammar's output also checks that the same request without the grammar does
not conform, so the test fails if the mask stops working. Scheduling must not change what a
grammar request generates: retraction, chunked prefill and batch neighbours are compared
token for token with a plain run, and the KV books are checked after every step.
"""
import json
import re
import time

import pytest

from stage3_scheduler.engine import Engine
from stage3_scheduler.request import Req
from stage3_scheduler.sampling_params import InvalidParams, SamplingParams
from stage3_scheduler.stops import check_stop_regex

pytestmark = pytest.mark.stage3
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}},
          "required": ["ok", "color"], "additionalProperties": False}
PROMPTS = ["Hello", "The weather today is", "Once upon a time", "1 2 3"]
YES_NO = "(yes|no)"
COLORS_EBNF = 'root ::= color ", " color\ncolor ::= "red" | "green" | "blue"'
REPEAT = "(yes |no ){10}"


@pytest.fixture(scope="module")
def eng():
    return Engine(model="demo", device="cpu", max_total_tokens=4096)


def valid(obj) -> bool:
    return isinstance(obj, dict) and set(obj) == {"ok", "color"} and isinstance(obj["ok"], bool) \
        and obj["color"] in ("red", "green", "blue")


def parses(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def test_json_schema_output_parses_and_validates(eng):
    params = [{"temperature": 0, "json_schema": json.dumps(SCHEMA), "max_new_tokens": 64},
              {"temperature": 1.0, "seed": 3, "json_schema": SCHEMA, "max_new_tokens": 64}]
    for p in params:
        outs = eng.generate(PROMPTS, p)
        for o in outs:
            assert valid(parses(o["text"])), o["text"]
            assert o["meta_info"]["finish_reason"]["type"] == "stop"
    plain = eng.generate(PROMPTS, {"temperature": 0, "max_new_tokens": 64})
    assert not any(valid(parses(o["text"])) for o in plain)          # the mask does the work
    eng.scheduler.check_invariant()


@pytest.mark.parametrize("kind,spec,pattern", [("regex", YES_NO, YES_NO), ("ebnf", COLORS_EBNF,
                                                                             "(red|green|blue), (red|green|blue)")])
def test_regex_and_ebnf_outputs_match(eng, kind, spec, pattern):
    for sp in ({"temperature": 0}, {"temperature": 1.0, "seed": 7}):
        outs = eng.generate(PROMPTS, dict(sp, max_new_tokens=32, **{kind: spec}))
        assert all(re.fullmatch(pattern, o["text"]) for o in outs), [o["text"] for o in outs]
        assert all(o["meta_info"]["finish_reason"]["type"] == "stop" for o in outs)
    plain = eng.generate(PROMPTS, {"temperature": 0, "max_new_tokens": 32})
    assert not any(re.fullmatch(pattern, o["text"]) for o in plain)


def test_plain_rows_are_unchanged_by_grammar_neighbours(eng):
    plain = {"temperature": 0, "max_new_tokens": 20, "ignore_eos": True}
    alone = eng.generate(PROMPTS, plain)
    mixed = eng.generate(PROMPTS * 2, [plain] * 4 + [dict(plain, regex=YES_NO), dict(plain, json_schema=SCHEMA),
                                                   dict(plain, ebnf=COLORS_EBNF), dict(plain, regex=REPEAT)])
    assert [o["output_ids"] for o in mixed[:4]] == [o["output_ids"] for o in alone]
    assert re.fullmatch(YES_NO, mixed[4]["text"]) and valid(parses(mixed[5]["text"]))


def step_all(eng, prompts, params, abort=None):
    """Run requests by stepping the scheduler; the KV books must balance after every step.
    abort=(step, index) aborts that request at that step."""
    vocab = eng.runner.config.vocab_size
    reqs = [Req(f"g{i}", eng.tokenizer.encode(p), SamplingParams.from_dict(sp, vocab))
            for i, (p, sp) in enumerate(zip(prompts, params))]
    for r in reqs:
        eng.scheduler.add_request(r)
    step = 0
    while eng.scheduler.has_work():
        eng.scheduler.step()
        eng.scheduler.check_invariant()
        step += 1
        if abort and step == abort[0]:
            eng.scheduler.abort(reqs[abort[1]].rid)
    return reqs


def grammar_workload():
    long_prompt = " ".join(["word"] * 90)
    prompts = [long_prompt, "Hi", "Tell me a story", long_prompt + " again", "Yes or no?", "Colors"]
    greedy = {"temperature": 0, "max_new_tokens": 40}
    params = [dict(greedy, regex=REPEAT), dict(greedy, ignore_eos=True), dict(greedy, json_schema=SCHEMA),
              dict(greedy, regex=REPEAT), dict(greedy, ignore_eos=True), dict(greedy, ebnf=COLORS_EBNF)]
    return prompts, params


def test_retraction_and_chunked_prefill_keep_grammar_outputs(eng):
    prompts, params = grammar_workload()
    ref = [r.output_ids for r in step_all(eng, prompts, params)]
    small = Engine(model="demo", device="cpu", max_total_tokens=240, chunked_prefill_size=16,
                   init_new_token_ratio=0.05, min_new_token_ratio=0.05)
    reqs = step_all(small, prompts, params)
    assert [r.output_ids for r in reqs] == ref
    assert any(r.num_retractions for r in reqs if r.grammar is not None), "no grammar request was retracted"
    assert all(re.fullmatch(REPEAT, small.tokenizer.decode(r.output_ids[:-1])) for r in (reqs[0], reqs[3]))
    assert all(r.grammar.accepted == len(r.output_ids) for r in reqs if r.grammar is not None)


def test_abort_a_grammar_request(eng):
    prompts, params = grammar_workload()
    reqs = step_all(eng, prompts, params, abort=(4, 0))
    assert reqs[0].finish_reason["type"] == "abort" and not eng.scheduler.running
    eng.scheduler.check_invariant()


def test_bad_grammar_offline_is_an_abort(eng):
    out = eng.generate("Hi", {"regex": "(unclosed", "max_new_tokens": 4})
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert "regex: does not compile" in out["meta_info"]["finish_reason"]["message"]


def test_sampling_params_checks():
    with pytest.raises(InvalidParams, match="at most one of regex, json_schema, ebnf"):
        SamplingParams.from_dict({"regex": "a", "ebnf": 'root ::= "a"'})
    with pytest.raises(InvalidParams, match="stop_regex: '\\(a' is not a valid"):
        SamplingParams.from_dict({"stop_regex": "(a"})
    p = SamplingParams.from_dict({"json_schema": {"type": "object"}, "stop_regex": "x+"})
    assert json.loads(p.json_schema) == {"type": "object"} and p.stop_regex == ["x+"]


def test_stop_regex_stops_untrimmed(eng):
    greedy = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
    ref = eng.generate("Once upon a time", greedy)
    piece = eng.tokenizer.decode(ref["output_ids"][8:10])
    out = eng.generate("Once upon a time", dict(greedy, stop_regex=[r"\d{7}", re.escape(piece)]))
    reason = out["meta_info"]["finish_reason"]
    assert reason["type"] == "stop" and reason["regex"] == re.escape(piece) and reason["matched"] == piece
    assert len(out["output_ids"]) <= 10 and out["text"].endswith(piece)      # stopped early, not trimmed


@pytest.mark.parametrize("pattern,ends", [("(a+)+$", None), ("(a|aa)+$", "abort")])
def test_stop_regex_redos_is_bounded(eng, pattern, ends):
    """Catastrophic backtracking: the window keeps (a+)+$ cheap; (a|aa)+$ times out, which
    ends the request with an abort instead of hanging the scheduler."""
    ids = eng.tokenizer.encode("a" * 3000 + "!")
    req = Req("redos", [1], SamplingParams.from_dict({"stop_regex": pattern}), output_ids=ids)
    t0 = time.monotonic()
    reason = check_stop_regex(req, eng.tokenizer)
    assert time.monotonic() - t0 < 2.0
    assert (reason or {}).get("type") == ends


def test_a_finished_grammar_allows_only_a_stop_token(eng):
    """ignore_eos does not run past the grammar's end; min_new_tokens that forbids the only
    allowed token ends the request with an abort saying so, never with an invalid token."""
    out = eng.generate("Hi", {"temperature": 0, "regex": YES_NO, "ignore_eos": True, "max_new_tokens": 10})
    assert out["text"] in ("yes", "no") and out["meta_info"]["finish_reason"]["matched"] in eng.runner.eos_token_ids
    out = eng.generate("Hi", {"temperature": 0, "regex": YES_NO, "min_new_tokens": 5, "max_new_tokens": 10})
    assert out["meta_info"]["finish_reason"]["type"] == "abort" and "min_new_tokens" in \
        out["meta_info"]["finish_reason"]["message"]
    eng.scheduler.check_invariant()


def test_compile_cache(eng, monkeypatch):
    from stage3_scheduler import grammar
    backend = eng.scheduler.grammars or eng.scheduler._grammar_backend()
    assert backend.compile(("regex", "(x|y)z")) is backend.compile(("regex", "(x|y)z"))
    for _ in range(2):                                  # a cached error is raised again, fresh
        with pytest.raises(grammar.GrammarError, match="does not compile"):
            backend.compile(("regex", "(x"))
    monkeypatch.setattr(grammar, "CACHE_BYTES", 0)     # every compiled grammar is over budget
    backend.compile(("regex", "[a-z]{300}"))
    assert all(isinstance(v, grammar.GrammarError) for v in backend.cache.values()) and backend.cache_bytes == 0
