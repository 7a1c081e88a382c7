"""One chat choice's output through the parsers the server and the request ask for.

    ChatParsing(reasoning, in_reasoning, tool_names, parallel, stream_reasoning)
    p = parsing.start()                      # a fresh parser chain per choice
    p.feed(delta, final) -> Delta(reasoning, content, tool_calls)
    p.parse(text)        -> Delta            # the whole text (non-streaming)

The chain is reasoning first (the answer follows `</think>`), then tool calls, which Qwen
writes in the answer. With `stream_reasoning=False` (SGLang's option) the reasoning is sent
in one piece, when the answer starts or the output ends. With `parallel=False`
(`parallel_tool_calls: false`) only the first tool call is kept.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from server.parsers.reasoning import ReasoningParser
from server.parsers.tool_calls import ToolCallParser


@dataclass
class Delta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)


@dataclass
class ChatParsing:
    reasoning: bool = False            # split <think> blocks (a reasoning parser is on, and wanted)
    in_reasoning: bool = False         # the prompt left a <think> block open
    tool_names: list[str] | None = None
    parallel: bool = True
    stream_reasoning: bool = True

    @property
    def active(self) -> bool:
        return self.reasoning or self.tool_names is not None

    def start(self) -> "ChoiceParser":
        return ChoiceParser(self)


class ChoiceParser:
    def __init__(self, cfg: ChatParsing):
        self.cfg = cfg
        self.reasoner = ReasoningParser(cfg.in_reasoning) if cfg.reasoning else None
        self.tools = ToolCallParser(cfg.tool_names) if cfg.tool_names is not None else None
        self.pending_reasoning = ""      # stream_reasoning=False: held until the answer starts
        self.num_calls = 0

    def feed(self, delta: str, final: bool = False) -> Delta:
        out = Delta(content=delta)
        if self.reasoner is not None:
            out.reasoning, out.content = self.reasoner.feed(delta)
            if final:
                r, c = self.reasoner.finish()
                out.reasoning, out.content = out.reasoning + r, out.content + c
            if not self.cfg.stream_reasoning:
                self.pending_reasoning += out.reasoning
                answer_started = self.reasoner.state == "answer" or final
                out.reasoning = self.pending_reasoning if answer_started else ""
                self.pending_reasoning = "" if answer_started else self.pending_reasoning
        if self.tools is not None:
            out.content, out.tool_calls = self.tools.feed(out.content)
            if final:
                c, calls = self.tools.finish()
                out.content, out.tool_calls = out.content + c, out.tool_calls + calls
            if not self.cfg.parallel:
                out.tool_calls = out.tool_calls[:max(0, 1 - self.num_calls)]
            self.num_calls += len(out.tool_calls)
        return out

    def parse(self, text: str) -> Delta:
        return self.feed(text, final=True)
