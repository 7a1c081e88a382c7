"""Qwen3's reasoning format: `<think>` reasoning `</think>` answer -> two fields.

    p = ReasoningParser(in_reasoning=False)
    p.feed(delta) -> (reasoning_delta, content_delta)      while streaming
    p.finish()    -> (reasoning_delta, content_delta)      what was held back, at the end
    p.parse(text) -> (reasoning_content or None, content)  the whole text at once

Qwen3 opens its answer with `<think>` when it reasons. Some chat templates already end the
prompt inside the block (a Qwen3-Thinking template, or a client continuing a partial
assistant message), so the output starts in the middle of the reasoning: the caller says
so with `in_reasoning=True` (see `prompt_opens_reasoning`). A block that never closes (the
answer was cut by max_tokens) is all reasoning. Reasoning is stripped of surrounding
whitespace and the answer of its leading whitespace, in the stream too (held back until
the next visible character), so the streamed pieces join to exactly the parsed fields.
"""
from __future__ import annotations

from server.parsers.text_buffer import split_safe

START, END = "<think>", "</think>"


def prompt_opens_reasoning(prompt_text: str) -> bool:
    """True if the prompt's last turn leaves a `<think>` block open (output starts inside it)."""
    turn = prompt_text[prompt_text.rfind("<|im_start|>") + 1:]
    return turn.rfind(START) > turn.rfind(END)


class ReasoningParser:
    def __init__(self, in_reasoning: bool = False):
        # "start": nothing decided yet; "think": inside the block; "answer": after it
        self.state = "think" if in_reasoning else "start"
        self.saw_reasoning = in_reasoning
        self.held = ""          # text not emitted yet (a possible tag, or whitespace)
        self.skip_space = True  # drop leading whitespace of the reasoning / the answer

    def feed(self, delta: str) -> tuple[str, str]:
        text, reasoning, content = self.held + delta, "", ""
        self.held = ""
        if self.state == "start":
            stripped = text.lstrip()
            if stripped.startswith(START):
                self.state, self.saw_reasoning, self.skip_space = "think", True, True
                text = stripped[len(START):]
            elif START.startswith(stripped):       # "", " ", "<th": cannot tell yet
                self.held = text
                return "", ""
            else:
                self.state, self.skip_space = "answer", False
        if self.state == "think":
            text = self._skip(text)
            end = text.find(END)
            if end < 0:
                reasoning, self.held = split_safe(text, (END,), hold_space=True)
                return reasoning, ""
            reasoning, text = text[:end].rstrip(), text[end + len(END):]
            self.state, self.skip_space = "answer", True
        return reasoning, content + self._skip(text)

    def _skip(self, text: str) -> str:
        if self.skip_space:
            text = text.lstrip()
            self.skip_space = not text
        return text

    def finish(self) -> tuple[str, str]:
        held, self.held = self.held, ""
        if self.state == "think":
            return held.rstrip(), ""                # a cut-off block: a partial tag is reasoning text
        return "", self._skip(held) if self.state == "answer" else held

    def parse(self, text: str) -> tuple[str | None, str]:
        r1, c1 = self.feed(text)
        r2, c2 = self.finish()
        return (r1 + r2 if self.saw_reasoning else None), c1 + c2
