"""Output parsers for chat completions: what a model's raw text means to an OpenAI client.

    REASONING_PARSERS["qwen3"]() -> ReasoningParser   <think>...</think> -> reasoning_content
    TOOL_CALL_PARSERS["qwen25"](names) -> ToolCallParser   <tool_call>{json}</tool_call> -> tool_calls

Every parser works on one choice's text and has one streaming interface, `feed(delta)` and
`finish()`; the non-streaming `parse(text)` is `feed(text)` + `finish()`, so a streamed
answer always concatenates to the non-streamed one. The parsers see only text: no model,
no tokenizer, which keeps them unit-testable on strings.
"""
from server.parsers.reasoning import ReasoningParser
from server.parsers.tool_calls import ToolCallParser

REASONING_PARSERS = {"qwen3": ReasoningParser}
TOOL_CALL_PARSERS = {"qwen25": ToolCallParser, "qwen": ToolCallParser}     # SGLang's two names

__all__ = ["REASONING_PARSERS", "TOOL_CALL_PARSERS", "ReasoningParser", "ToolCallParser"]
