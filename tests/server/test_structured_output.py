"""Structured output, stop_regex and forced tool calls through both APIs, on the real processes.

The demo model is random, so each constrained answer is checked for what the grammar
promises (it parses, it validates, it matches) and a bad grammar is a 400 before the
scheduler. The JSON schema has a bounded shape (a boolean and an enum) and the server's
JSON is compact, so even random weights reach the end of the object and stop.
"""
import json
import re
import threading
import time

import httpx
import pytest
import regex

from live_server import assert_no_leak, wait_idle

openai = pytest.importorskip("openai", reason="the dev extra installs the openai client")
pytestmark = pytest.mark.server
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}},
          "required": ["ok", "color"], "additionalProperties": False}
USER = [{"role": "user", "content": "Is the sky blue?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}, "days": {"enum": [1, 2, 3]}},
    "required": ["unit", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"], "additionalProperties": False}}}
A, OPEN_CLOSE = 64, 6257                  # the tokens "a" and "{}"


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def valid(obj) -> bool:
    return isinstance(obj, dict) and set(obj) == {"ok", "color"} and isinstance(obj["ok"], bool) \
        and obj["color"] in ("red", "green", "blue")


def generate(client, stream=False, **sp):
    body = {"text": "Answer:", "sampling_params": {"max_new_tokens": 48, **sp}, "stream": stream}
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    if not stream:
        return r.json()
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    return events[-1]                     # cumulative: the last event holds the whole answer


@pytest.mark.parametrize("stream", [False, True])
def test_native_grammars(client, stream):
    for seed in (1, 2):
        sp = {"temperature": 1.0, "seed": seed}
        assert valid(json.loads(generate(client, stream, json_schema=json.dumps(SCHEMA), **sp)["text"]))
        assert valid(json.loads(generate(client, stream, json_schema=SCHEMA, **sp)["text"]))    # an object is fine
        assert generate(client, stream, regex="(yes|no)", **sp)["text"] in ("yes", "no")
        out = generate(client, stream, ebnf='root ::= ("red" | "blue") " " ("cat" | "dog")', **sp)
        assert re.fullmatch("(red|blue) (cat|dog)", out["text"]) and out["meta_info"]["finish_reason"]["type"] == "stop"
    plain = generate(client, stream, temperature=0)["text"]
    assert plain not in ("yes", "no")                # the demo model alone writes gibberish


@pytest.mark.parametrize("sp,says", [
    ({"regex": "(yes|no"}, "regex: does not compile"),
    ({"json_schema": '{"type": 5}'}, "json_schema: does not compile"),
    ({"json_schema": "{not json"}, "json_schema: not valid JSON"),
    ({"ebnf": "root ::= missing_rule"}, "ebnf: does not compile"),
    ({"regex": "a", "json_schema": "{}"}, "at most one of regex, json_schema, ebnf"),
    ({"stop_regex": "(a"}, "stop_regex: '(a' is not a valid regular expression"),
])
def test_bad_grammars_are_400(client, oai, sp, says):
    r = client.post("/generate", json={"text": "hi", "sampling_params": sp})
    assert r.status_code == 400 and says in r.json()["error"]["message"], r.text
    with pytest.raises(openai.BadRequestError, match=re.escape(says)):
        oai.completions.create(model="demo", prompt="hi", max_tokens=4, extra_body=sp)
    assert client.post("/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 2}}).status_code == 200


def test_response_format_json_schema(oai):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    c = oai.chat.completions.create(model="demo", messages=USER, response_format=fmt, max_tokens=64, temperature=0)
    assert valid(json.loads(c.choices[0].message.content)) and c.choices[0].finish_reason == "stop"
    chunks = oai.chat.completions.create(model="demo", messages=USER, response_format=fmt, max_tokens=64,
                                         temperature=0, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == c.choices[0].message.content
    comp = oai.completions.create(model="demo", prompt="JSON:", max_tokens=64, temperature=0.8, seed=5,
                                  extra_body={"response_format": fmt})
    assert valid(json.loads(comp.choices[0].text))


def test_response_format_json_object(oai):
    """{"}" biased to +100 is a JSON object only if the mask keeps it in first place; without
    the mask the answer would be "{}{}{}..." and fail to parse."""
    for stream in (False, True):
        c = oai.chat.completions.create(model="demo", messages=USER, response_format={"type": "json_object"},
                                        max_tokens=8, temperature=0, logit_bias={str(OPEN_CLOSE): 100}, stream=stream)
        text = "".join(ch.choices[0].delta.content or "" for ch in c if ch.choices) if stream \
            else c.choices[0].message.content
        assert json.loads(text) == {}
    c = oai.chat.completions.create(model="demo", messages=USER, response_format={"type": "text"}, max_tokens=3,
                                    logit_bias={str(OPEN_CLOSE): 100}, temperature=0)
    assert c.choices[0].message.content == "{}" * 3        # "text": no constraint


def test_stop_regex(client):
    sp = {"temperature": 0, "ignore_eos": True, "max_new_tokens": 16, "logit_bias": {str(A): 100}}
    out = generate(client, stop_regex=["x", "a{5}$"], **sp)
    assert out["text"] == "aaaaa" and out["meta_info"]["finish_reason"] == {"type": "stop", "matched": "aaaaa",
                                                                             "regex": "a{5}$"}
    assert generate(client, stream=True, stop_regex="a{3}", **sp)["text"] == "aaa"


def test_stop_regex_catastrophic_pattern_ends_the_request(client):
    """(a|aa)+b against a run of "a"s backtracks exponentially: the search times out, the
    request ends with an error, and the server goes on serving."""
    t0 = time.monotonic()
    r = client.post("/generate", json={"text": "x", "sampling_params": {
        "temperature": 0, "ignore_eos": True, "max_new_tokens": 100, "logit_bias": {str(A): 100},
        "stop_regex": "(a|aa)+b"}})
    assert r.status_code == 400 and "stop_regex: matching took over" in r.json()["error"]["message"], r.text
    assert time.monotonic() - t0 < 30
    out = generate(client, stop_regex="(a+)+$", temperature=0, logit_bias={str(A): 100})
    assert out["text"] == "a"          # matches at once: the window keeps it cheap
    assert client.post("/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 2}}).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_required_and_named(oai, stream):
    for choice, names in [("required", {"get_weather", "get_time"}),
                          ({"type": "function", "function": {"name": "get_time"}}, {"get_time"})]:
        for seed in (1, 2, 3):
            c = oai.chat.completions.create(model="demo", messages=USER, tools=[WEATHER, CLOCK], tool_choice=choice,
                                            temperature=1.0, seed=seed, max_tokens=64, stream=stream)
            if stream:
                chunks = list(c)
                calls = [tc for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or []]
                reason = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
            else:
                calls, reason = c.choices[0].message.tool_calls or [], [c.choices[0].finish_reason]
            assert len(calls) == 1 and reason == ["tool_calls"], c
            args = json.loads(calls[0].function.arguments)
            assert calls[0].function.name in names
            if calls[0].function.name == "get_weather":
                assert args["unit"] in ("celsius", "fahrenheit") and args["days"] in (1, 2, 3)
            else:
                assert set(args) == {"utc"} and isinstance(args["utc"], bool)


def test_aborted_and_concurrent_grammar_requests_free_every_slot(server, client):
    """A long grammar request aborted by rid, another whose client leaves mid-stream, and a
    concurrent mix of grammar and plain requests: all answer, and every KV slot comes back."""
    long = {"regex": "(yes |no ){600}", "max_new_tokens": 1500, "temperature": 0}
    result = {}
    t = threading.Thread(target=lambda: result.update(r=httpx.post(
        server.url + "/generate", json={"text": "busy", "sampling_params": long, "rid": "g-busy"}, timeout=120)))
    t.start()
    body = {"text": "stream", "sampling_params": long, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as c, c.stream("POST", "/generate", json=body) as r:
        for n, line in enumerate(r.iter_lines()):
            if n > 6:
                break                             # leave mid-stream: the server aborts it
    deadline = time.monotonic() + 20
    while client.post("/abort_request", json={"rid": "g-busy"}).json().get("aborted") != ["g-busy"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    t.join(30)
    out = result["r"].json()
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert regex.fullmatch(long["regex"], out["text"], partial=True)        # a prefix of a match
    batch = client.post("/generate", json={"text": ["a", "b", "c", "d"], "sampling_params": [
        {"regex": "(yes|no)"}, {"max_new_tokens": 8}, {"json_schema": SCHEMA}, {"max_new_tokens": 5}]}).json()
    assert batch[0]["text"] in ("yes", "no") and valid(json.loads(batch[2]["text"]))
    assert all(o["meta_info"]["finish_reason"]["type"] in ("stop", "length") for o in batch)
    assert_no_leak(wait_idle(client))
