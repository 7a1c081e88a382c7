"""Chat `tools` and `tool_choice`: checked here, rendered by the chat template, parsed back
from the output by a tool-call parser (server/parsers/).

    tool_request(body, parser_name) -> ToolRequest | None     None: no tools in play
    template_tools(tr, template)    -> (tools for apply_chat_template, extra system text)

Tools need `--tool_call_parser`: without a parser the model's `<tool_call>` text would come
back as plain content, which a client that sent tools would misread. `tool_choice` "auto"
(the default with tools) and "none" (tools are not shown to the model, nothing is parsed)
work, and so do "required" and a named function ({"type": "function", "function": {"name"}}):
those constrain the answer with a grammar (stage 3's structured output) to exactly one
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` block (newlines around the JSON,
as Qwen writes it) whose arguments match the tool's parameters schema ("required": any
offered tool; named: that one), then EOS; the usual qwen25 parser turns it into
`tool_calls`. One call, even with parallel_tool_calls: "required" asks for at least one.
Templates that know tools (Qwen2.5/Qwen3's) render them; a template that ignores them (the
demo model's plain ChatML) gets the tool list as a system message in Qwen's `<tools>`
format instead, so the model is told about the tools either way.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from server.validation import BadRequest


@dataclass
class ToolRequest:
    tools: list[dict]             # as sent: [{"type": "function", "function": {"name", ...}}]
    names: list[str]
    parallel: bool = True         # parallel_tool_calls: false keeps only the first call
    grammar: tuple[str, str] | None = None   # ("ebnf", text) forcing a call: tool_choice required / named


def _check_tool(i: int, tool) -> str:
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not (isinstance(fn, dict) and tool.get("type", "function") == "function"):
        raise BadRequest(f"tools[{i}]: must be {{\"type\": \"function\", \"function\": {{...}}}}")
    if not (isinstance(fn.get("name"), str) and fn["name"]):
        raise BadRequest(f"tools[{i}].function.name: must be a non-empty string")
    if not isinstance(fn.get("parameters", {}), dict):
        raise BadRequest(f"tools[{i}].function.parameters: must be a JSON schema object")
    return fn["name"]


def tool_request(body: dict, parser_name: str | None) -> ToolRequest | None:
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not tools:
        if choice not in (None, "none", "auto"):
            raise BadRequest("tool_choice: needs tools")
        return None
    if not isinstance(tools, list):
        raise BadRequest("tools: must be a list of function tools")
    if parser_name is None:
        raise BadRequest("tools: this server was started without --tool_call_parser (use qwen25 for Qwen3)")
    names = [_check_tool(i, t) for i, t in enumerate(tools)]
    forced = _forced_tools(choice, tools, names)
    if choice == "none":
        return None
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise BadRequest("parallel_tool_calls: must be true or false")
    return ToolRequest(tools, names, parallel is not False, tool_call_grammar(forced) if forced else None)


def _forced_tools(choice, tools: list[dict], names: list[str]) -> list[dict] | None:
    """The tools one of which the answer must call: all for "required", one for a named
    function, None when nothing is forced ("auto", "none")."""
    if choice in (None, "auto", "none"):
        return None
    if choice == "required":
        return [t["function"] for t in tools]
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not (isinstance(fn, dict) and isinstance(fn.get("name"), str)):
        raise BadRequest('tool_choice: must be "none", "auto", "required" or {"type": "function", "function": '
                         '{"name": ...}}')
    if fn["name"] not in names:
        raise BadRequest(f"tool_choice: no tool named {fn['name']!r} in tools")
    return [tools[names.index(fn["name"])]["function"]]


def tool_call_grammar(functions: list[dict]) -> tuple[str, str]:
    """("ebnf", grammar) for one Qwen-format call to one of `functions`: the tag, a compact
    JSON object {"name": <one of them>, "arguments": <its parameters schema>}, the closing tag."""
    import xgrammar as xgr                # lazy, as everywhere: only forced tool calls need it
    calls = [{"type": "object", "properties": {"name": {"const": f["name"]},
                                               "arguments": f.get("parameters") or {"type": "object"}},
              "required": ["name", "arguments"]} for f in functions]
    try:
        body = xgr.Grammar.from_json_schema(calls[0] if len(calls) == 1 else {"anyOf": calls}, any_whitespace=False)
    except Exception as e:  # noqa: BLE001 - xgrammar's converter rejects what it cannot constrain
        raise BadRequest(f"tools: a function's parameters schema cannot be enforced: {str(e).strip()[-300:]}") from None
    grammar = xgr.Grammar.concat(xgr.Grammar.from_ebnf('root ::= "<tool_call>\\n"'), body,
                                 xgr.Grammar.from_ebnf('root ::= "\\n</tool_call>"'))
    return "ebnf", str(grammar)


def template_tools(tr: ToolRequest | None, template: str | None) -> tuple[list | None, str | None]:
    """What to hand the chat template: its own `tools` when it renders them, else a system text."""
    if tr is None:
        return None, None
    if template and "tools" in template:
        return tr.tools, None
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tr.tools)
    return None, ("# Tools\n\nThese functions are available. The function signatures are listed inside "
                  f"<tools></tools>:\n<tools>\n{listing}\n</tools>\n\nTo call one, answer with a JSON object "
                  "holding its name and arguments inside <tool_call></tool_call> tags:\n<tool_call>\n"
                  '{"name": <function name>, "arguments": <arguments as a JSON object>}\n</tool_call>')
