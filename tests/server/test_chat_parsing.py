"""Reasoning, tool calls and logprobs through the real routes, with forced output tokens
(scripted_app.py), read back by the official `openai` client's typed objects."""
from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient

from scripted_app import EOS, scripted_app

openai = pytest.importorskip("openai", reason="the dev extra installs the openai client")
pytestmark = pytest.mark.server

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
USER = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def app(tokenizer):
    app, tm, endpoints = scripted_app(tokenizer, "--served_model_name", "m", "--reasoning_parser", "qwen3",
                                      "--tool_call_parser", "qwen25", "--enable_cache_report")
    with TestClient(app, base_url="http://localhost") as http:
        yield http, tm, openai.OpenAI(base_url="http://localhost/v1", api_key="x", http_client=http, max_retries=0)
    endpoints.remove()


def force(app, tokenizer, text: str, eos: bool = True):
    app[1].script = tokenizer.encode(text) + ([EOS] if eos else [])
    return app[2]


def collect(stream):
    """Join a chat stream: reasoning, content, tool calls (by index), finish reasons, chunks."""
    reasoning, content, calls, reasons, chunks = "", "", {}, [], list(stream)
    for ch in chunks:
        for c in ch.choices:
            d = c.delta
            reasoning += (d.model_extra or {}).get("reasoning_content") or ""
            content += d.content or ""
            for tc in d.tool_calls or []:
                calls.setdefault(tc.index, {"name": "", "arguments": ""})
                calls[tc.index]["name"] += tc.function.name or ""
                calls[tc.index]["arguments"] += tc.function.arguments or ""
            reasons.append(c.finish_reason)
    return reasoning, content, [calls[k] for k in sorted(calls)], [r for r in reasons if r], chunks


THINK = "<think>\nThe user wants the weather.\n</think>\n\nI can look that up."


def test_reasoning_split_stream_and_not(app, tokenizer):
    oai = force(app, tokenizer, THINK)
    c = oai.chat.completions.create(model="m", messages=USER)
    msg = c.choices[0].message
    assert msg.model_extra["reasoning_content"] == "The user wants the weather."
    assert msg.content == "I can look that up." and c.choices[0].finish_reason == "stop"
    assert c.usage.prompt_tokens_details.cached_tokens == 0          # --enable_cache_report
    reasoning, content, _, reasons, _ = collect(oai.chat.completions.create(model="m", messages=USER, stream=True))
    assert (reasoning, content, reasons) == ("The user wants the weather.", "I can look that up.", ["stop"])


def test_reasoning_off_when_thinking_disabled_or_not_separated(app, tokenizer):
    oai = force(app, tokenizer, THINK)
    for extra in ({"chat_template_kwargs": {"enable_thinking": False}}, {"separate_reasoning": False}):
        msg = oai.chat.completions.create(model="m", messages=USER, extra_body=extra).choices[0].message
        assert msg.content == THINK and msg.model_extra.get("reasoning_content") is None


def test_reasoning_buffered_when_not_streamed(app, tokenizer):
    oai = force(app, tokenizer, THINK)
    reasoning, content, _, _, chunks = collect(oai.chat.completions.create(
        model="m", messages=USER, stream=True, extra_body={"stream_reasoning": False}))
    pieces = [c.choices[0].delta.model_extra.get("reasoning_content") for c in chunks if c.choices]
    assert [p for p in pieces if p] == ["The user wants the weather."]       # one piece
    assert content == "I can look that up."


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_tool_call_stream_and_not(app, tokenizer):
    oai = force(app, tokenizer, "Checking.\n" + CALL)
    c = oai.chat.completions.create(model="m", messages=USER, tools=[WEATHER])
    choice = c.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking.\n"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    _, content, calls, reasons, _ = collect(oai.chat.completions.create(model="m", messages=USER, tools=[WEATHER],
                                                                        stream=True))
    assert content == "Checking.\n" and reasons == ["tool_calls"]
    assert [(x["name"], json.loads(x["arguments"])) for x in calls] == [("get_weather", {"city": "Paris"})]


def test_reasoning_then_two_calls_and_parallel_off(app, tokenizer):
    oai = force(app, tokenizer, "<think>\nTwo cities.\n</think>\n\n" + CALL + "\n" + CALL.replace("Paris", "Oslo"))
    msg = oai.chat.completions.create(model="m", messages=USER, tools=[WEATHER]).choices[0].message
    assert msg.model_extra["reasoning_content"] == "Two cities." and msg.content is None
    assert [json.loads(t.function.arguments)["city"] for t in msg.tool_calls] == ["Paris", "Oslo"]
    _, _, calls, _, _ = collect(oai.chat.completions.create(model="m", messages=USER, tools=[WEATHER], stream=True))
    assert [json.loads(x["arguments"])["city"] for x in calls] == ["Paris", "Oslo"]
    msg = oai.chat.completions.create(model="m", messages=USER, tools=[WEATHER],
                                      parallel_tool_calls=False).choices[0].message
    assert [json.loads(t.function.arguments)["city"] for t in msg.tool_calls] == ["Paris"]


def test_tool_call_text_without_tools_or_with_choice_none_stays_text(app, tokenizer):
    oai = force(app, tokenizer, CALL)
    for extra in ({}, {"tools": [WEATHER], "tool_choice": "none"}):
        choice = oai.chat.completions.create(model="m", messages=USER, **extra).choices[0]
        assert choice.message.content == CALL and not choice.message.tool_calls and choice.finish_reason == "stop"


def test_cut_off_call_is_content(app, tokenizer):
    oai = force(app, tokenizer, CALL, eos=False)
    choice = oai.chat.completions.create(model="m", messages=USER, tools=[WEATHER], max_tokens=6).choices[0]
    assert choice.finish_reason == "length" and choice.message.content.startswith("<tool_call>")
    assert not choice.message.tool_calls


def test_tool_round_trip_renders(app, tokenizer):
    """An assistant turn with tool_calls and a tool answer go through the template (400 never)."""
    oai = force(app, tokenizer, "It is sunny.")
    history = USER + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    c = oai.chat.completions.create(model="m", messages=history, tools=[WEATHER])
    assert c.choices[0].message.content == "It is sunny." and c.usage.prompt_tokens > 20


@pytest.mark.parametrize("body,msg", [
    ({"tool_choice": "always"}, "tool_choice: must be"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "no tool named 'nope'"),
    ({"tool_choice": "required", "regex": "a"}, "tool_choice: cannot be combined with regex"),
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name"),
    ({"tools": "get_weather"}, "tools: must be a list"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
])
def test_bad_tool_requests_are_400(app, body, msg):
    r = app[0].post("/v1/chat/completions", json={"messages": USER, "tools": [WEATHER], **body})
    assert r.status_code == 400 and msg in r.json()["error"]["message"], r.text


def test_tools_need_a_parser(tokenizer):
    plain, _, endpoints = scripted_app(tokenizer)
    with TestClient(plain, base_url="http://localhost") as http:
        r = http.post("/v1/chat/completions", json={"messages": USER, "tools": [WEATHER]})
    endpoints.remove()
    assert r.status_code == 400 and "--tool_call_parser" in r.json()["error"]["message"]


def test_chat_top_logprobs_stream_and_not(app, tokenizer):
    oai = force(app, tokenizer, "Hi 🦀")
    ids = app[1].script
    c = oai.chat.completions.create(model="m", messages=USER, logprobs=True, top_logprobs=3)
    content = c.choices[0].logprobs.content
    assert len(content) == len(ids)            # the matched EOS keeps its logprob, as output_ids keep it
    assert b"".join(bytes(e.bytes) for e in content[:-1]).decode() == "Hi 🦀"     # bytes rebuild split emoji
    for e, t in zip(content, ids):
        assert e.logprob == -0.5 and [a.logprob for a in e.top_logprobs] == [-0.5, -1.5, -2.5]
        assert e.top_logprobs[1].token == tokenizer.decode([t + 1])
    chunks = list(oai.chat.completions.create(model="m", messages=USER, logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]


def test_completion_logprobs_stream_and_not(app, tokenizer):
    oai = force(app, tokenizer, " one two three", eos=False)
    c = oai.completions.create(model="m", prompt="Count:", max_tokens=3, logprobs=2)
    lp = c.choices[0].logprobs
    assert "".join(lp.tokens) == c.choices[0].text == " one two three"
    assert lp.token_logprobs == [-0.5] * 3 and lp.text_offset == [0, 4, 8]
    assert all(len(d) == 2 and max(d.values()) == -0.5 for d in lp.top_logprobs)
    chunks = list(oai.completions.create(model="m", prompt="Count:", max_tokens=3, logprobs=2, stream=True))
    tokens = [t for ch in chunks if ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens]
    offsets = [o for ch in chunks if ch.choices[0].logprobs for o in ch.choices[0].logprobs.text_offset]
    assert tokens == lp.tokens and offsets == lp.text_offset
