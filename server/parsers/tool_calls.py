"""Qwen2.5 / Qwen3 tool calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.

    p = ToolCallParser(tool_names)
    p.feed(delta) -> (content_delta, [call, ...])   while streaming
    p.finish()    -> (content_delta, [call, ...])   what was held back, at the end
    p.parse(text) -> (content, [call, ...])         the whole text at once

A call is OpenAI's shape: {"id", "type": "function", "function": {"name", "arguments"}}
with `arguments` a JSON string. Text outside the tags is ordinary content. A block whose
JSON does not parse, or that names a function the request did not offer, or that never
closes (cut by max_tokens) is returned as content, as written: nothing the model said is
lost. While streaming, a call is sent whole once its closing tag arrives (its arguments
are not split over several chunks); text that may begin a tag is held back meanwhile.
Whitespace between and after calls (Qwen puts newlines there) is dropped.
"""
from __future__ import annotations

import json
import uuid

from server.parsers.text_buffer import split_safe

START, END = "<tool_call>", "</tool_call>"


def make_call(name: str, arguments) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


class ToolCallParser:
    def __init__(self, tool_names):
        self.names = set(tool_names)
        self.held = ""            # text not emitted yet: a possible tag, or an open block
        self.in_call = False
        self.after_call = False   # drop whitespace that follows a call
        self.num_calls = 0

    def decode_call(self, body: str) -> dict | None:
        """The call in one block's body, or None when it is not a valid call to an offered tool."""
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or obj.get("name") not in self.names:
            return None
        args = obj.get("arguments", obj.get("parameters", {}))     # some fine-tunes say "parameters"
        return make_call(obj["name"], args) if isinstance(args, dict) else None

    def feed(self, delta: str) -> tuple[str, list[dict]]:
        text, content, calls = self.held + delta, "", []
        self.held = ""
        while text:
            if self.in_call:
                end = text.find(END)
                if end < 0:
                    self.held = text               # wait for the closing tag
                    break
                body, text = text[len(START):end], text[end + len(END):]
                call = self.decode_call(body)
                if call is None:
                    content += START + body + END    # not a call after all: keep it as text
                else:
                    calls.append(call)
                    self.after_call = True
                self.in_call = False
                continue
            if self.after_call:
                text = text.lstrip()
                if not text:
                    break
            start = text.find(START)
            if start < 0:
                emit, self.held = split_safe(text, (START,))
                content += emit
                self.after_call = self.after_call and not emit
                break
            content, text = content + text[:start], text[start:]
            self.in_call, self.after_call = True, False
        self.num_calls += len(calls)
        return content, calls

    def finish(self) -> tuple[str, list[dict]]:
        held, self.held, self.in_call = self.held, "", False
        return held, []          # an unclosed block or a partial tag is plain text

    def parse(self, text: str) -> tuple[str, list[dict]]:
        c1, calls = self.feed(text)
        c2, _ = self.finish()
        return c1 + c2, calls
