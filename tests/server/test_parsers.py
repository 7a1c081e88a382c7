"""The reasoning and tool-call parsers on plain strings: every split of a text into stream
deltas must give the same fields as parsing it whole."""
from __future__ import annotations

import json
import random

import pytest

from server.parsers import ReasoningParser, ToolCallParser
from server.parsers.reasoning import prompt_opens_reasoning
from server.parsers.text_buffer import partial_tag_len, split_safe

pytestmark = pytest.mark.server


def chunkings(text: str, seed: int = 0, count: int = 30):
    """Every 1- and 2-way split, plus random multi-way splits (tags cut at every point)."""
    yield [text]
    yield list(text)
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    rng = random.Random(seed)
    for _ in range(count):
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(1, 6))))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def stream_reasoning(chunks, **kw):
    p, r, c = ReasoningParser(**kw), "", ""
    for ch in chunks:
        dr, dc = p.feed(ch)
        r, c = r + dr, c + dc
    dr, dc = p.finish()
    return (r + dr if p.saw_reasoning else None), c + dc


def test_partial_tag_helpers():
    assert partial_tag_len("abc</thi", ("</think>",)) == 5
    assert partial_tag_len("abc<", ("</think>",)) == 1
    assert partial_tag_len("abc", ("</think>",)) == 0
    assert split_safe("x  \n</th", ("</think>",), hold_space=True) == ("x", "  \n</th")


@pytest.mark.parametrize("text,want", [
    ("<think>\nstep 1\nstep 2\n</think>\n\nThe answer is 4.", ("step 1\nstep 2", "The answer is 4.")),
    ("The answer is 4.", (None, "The answer is 4.")),
    ("<think>\nunfinished reason", ("unfinished reason", "")),
    ("  <think>a</think>b", ("a", "b")),
    ("<think></think>", ("", "")),
    ("<thinking is not a tag", (None, "<thinking is not a tag")),
    ("<thi", (None, "<thi")),
    ("a <think>b</think>", (None, "a <think>b</think>")),         # only a block that opens the answer
])
def test_reasoning_parse_and_every_stream_split(text, want):
    assert ReasoningParser().parse(text) == want
    for chunks in chunkings(text):
        assert stream_reasoning(chunks) == want, chunks


def test_reasoning_started_in_the_prompt():
    text = "still thinking\n</think>\n\nDone."
    assert ReasoningParser(in_reasoning=True).parse(text) == ("still thinking", "Done.")
    for chunks in chunkings(text, seed=1):
        assert stream_reasoning(chunks, in_reasoning=True) == ("still thinking", "Done.")
    assert prompt_opens_reasoning("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_reasoning("<|im_start|>user\n<think><|im_end|>\n<|im_start|>assistant\n")


def stream_tools(chunks, names=("get_weather", "add")):
    p, content, calls = ToolCallParser(names), "", []
    for ch in chunks:
        dc, new = p.feed(ch)
        content, calls = content + dc, calls + new
    dc, new = p.finish()
    return content + dc, calls + new


def shape(calls):
    return [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


CALL_A = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}\n</tool_call>'
CALL_B = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": [2, 3]}}\n</tool_call>'


@pytest.mark.parametrize("text,content,calls", [
    ("Let me check.\n" + CALL_A, "Let me check.\n", [("function", "get_weather", {"city": "Paris", "unit": "°C"})]),
    (CALL_A + "\n" + CALL_B + "\n", "", [("function", "get_weather", {"city": "Paris", "unit": "°C"}),
                                         ("function", "add", {"a": 1, "b": [2, 3]})]),
    ("no tools here", "no tools here", []),
    ("<tool_call>\n{not json}\n</tool_call>", "<tool_call>\n{not json}\n</tool_call>", []),
    ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', []),
    ('<tool_call>\n{"name": "add", "argu', '<tool_call>\n{"name": "add", "argu', []),     # cut by max_tokens
    ("a < b <tool", "a < b <tool", []),
    ('<tool_call>{"name": "add", "parameters": {"a": 1}}</tool_call>', "", [("function", "add", {"a": 1})]),
])
def test_tool_calls_parse_and_every_stream_split(text, content, calls):
    got_content, got_calls = ToolCallParser(["get_weather", "add"]).parse(text)
    assert (got_content, shape(got_calls)) == (content, calls)
    assert all(c["id"].startswith("call_") for c in got_calls)
    for chunks in chunkings(text, seed=2):
        got_content, got_calls = stream_tools(chunks)
        assert (got_content, shape(got_calls)) == (content, calls), chunks


def test_reasoning_then_tool_call_chained():
    """The chat route chains them: the reasoning parser's content feeds the tool parser."""
    text = "<think>\nNeed the weather.\n</think>\n\n" + CALL_A
    for chunks in chunkings(text, seed=3):
        rp, tp, reasoning, content, calls = ReasoningParser(), ToolCallParser(["get_weather"]), "", "", []
        for ch in chunks + [None]:
            r, c = rp.feed(ch) if ch is not None else rp.finish()
            tc, new = tp.feed(c)
            reasoning, content, calls = reasoning + r, content + tc, calls + new
        tc, new = tp.finish()
        assert (reasoning, content + tc, shape(calls + new)) == \
            ("Need the weather.", "", [("function", "get_weather", {"city": "Paris", "unit": "°C"})])
