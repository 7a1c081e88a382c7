"""OpenAI request bodies -> SamplingParams, checked field by field (400 on anything wrong).

    completion_params(body, vocab) / chat_params(body, vocab, prompt_len, ctx) -> SamplingParams
    chat_messages(body) -> [{"role", "content"}] ready for the chat template

OpenAI names map to SGLang's (`max_tokens` -> `max_new_tokens`, `min_tokens` ->
`min_new_tokens`); SGLang's extra sampling fields (top_k, min_p, repetition_penalty,
ignore_eos, stop_token_ids, skip_special_tokens, no_stop_trim) are accepted too, since
SGLang's bench_serving and users send them, and `sampling_seed` is SGLang's name for `seed`.
Structured output: OpenAI's `response_format` (json_object, json_schema) becomes a JSON
schema grammar; SGLang's `regex`, `json_schema`, `ebnf` and `stop_regex` pass through (one
grammar per request). Features this server does not have (server/unsupported.py) are
refused with a 400, never silently ignored.
"""
from __future__ import annotations

import json

from server.unsupported import OPENAI, refusal
from server.validation import MAX_TOP_LOGPROBS, BadRequest, sglang_sampling
from stage3_scheduler.sampling_params import InvalidParams, SamplingParams

PASS_THROUGH = ["temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty",
                "repetition_penalty", "stop", "stop_token_ids", "ignore_eos", "skip_special_tokens",
                "no_stop_trim", "seed", "sampling_seed", "n", "logit_bias", "regex", "json_schema", "ebnf",
                "stop_regex"]
RENAMED = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


def get(body: dict, name: str, types, default=None):
    """body[name] if it has one of `types` (bools are not numbers); null means the default."""
    value = body.get(name)
    if value is None:
        return default
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise BadRequest(f"{name}: must be {' or '.join(t.__name__ for t in types)} (got {value!r})")
    return value


def _refuse_unsupported(body: dict) -> None:
    why = refusal(body, OPENAI)
    if why:
        raise BadRequest(why)
    best_of = get(body, "best_of", int, 1)
    if best_of not in (1, get(body, "n", int, 1)):
        raise BadRequest("best_of: ranking best_of samples to return n is not supported; send n alone")


def response_format_schema(body: dict) -> str | None:
    """OpenAI's response_format as JSON-schema text: None for "text" (no constraint); any
    object for "json_object"; the given schema for "json_schema". `strict` is accepted either
    way: the grammar always enforces the schema, which is what strict asks for."""
    rf = body.get("response_format")
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return json.dumps({"type": "object"})
    if kind != "json_schema":
        raise BadRequest('response_format: must be {"type": "text"}, {"type": "json_object"} or '
                         '{"type": "json_schema", "json_schema": {"name", "schema"}}')
    spec = rf.get("json_schema")
    if not (isinstance(spec, dict) and isinstance(spec.get("name"), str) and spec["name"]):
        raise BadRequest("response_format.json_schema: must be an object with a non-empty string 'name'")
    schema, strict = spec.get("schema", {"type": "object"}), spec.get("strict")
    if not isinstance(schema, dict) or not (strict is None or isinstance(strict, bool)):
        raise BadRequest("response_format.json_schema: 'schema' must be an object and 'strict' true or false")
    return json.dumps(schema)


def _params(body: dict, vocab_size: int, max_tokens: int, grammar: tuple[str, str] | None = None) -> SamplingParams:
    d = sglang_sampling({k: body[k] for k in PASS_THROUGH if body.get(k) is not None}, where="")
    forced = [("response_format", ("json_schema", schema))] if (schema := response_format_schema(body)) else []
    forced += [("tool_choice", grammar)] if grammar else []
    for field_name, (kind, text) in forced:     # a grammar the server builds: the client sent none of its own
        others = [k for k in ("regex", "json_schema", "ebnf") if d.get(k) is not None]
        if others:
            raise BadRequest(f"{field_name}: cannot be combined with {others[0]} (one grammar per request)")
        d[kind] = text
    d["max_new_tokens"] = max_tokens
    if body.get("min_tokens") is not None:
        d["min_new_tokens"] = body["min_tokens"]
    try:
        return SamplingParams.from_dict(d, vocab_size)
    except InvalidParams as e:
        msg = str(e)
        for ours, theirs in RENAMED.items():
            msg = msg.replace(ours, theirs)
        raise BadRequest(msg) from None


def completion_params(body: dict, vocab_size: int) -> SamplingParams:
    _refuse_unsupported(body)
    if body.get("tools"):
        raise BadRequest("tools: only /v1/chat/completions takes tools")
    logprobs = get(body, "logprobs", int)
    if logprobs is not None and not (0 <= logprobs <= MAX_TOP_LOGPROBS):
        raise BadRequest(f"logprobs: must be in [0, {MAX_TOP_LOGPROBS}]")
    return _params(body, vocab_size, get(body, "max_tokens", int, 16))     # OpenAI's default is 16


def chat_params(body: dict, vocab_size: int, prompt_len: int, context_length: int,
                grammar: tuple[str, str] | None = None) -> SamplingParams:
    """`grammar`: what tool_choice "required" / a named function forces (openai_tools.py)."""
    _refuse_unsupported(body)
    top = get(body, "top_logprobs", int, 0)
    if not (0 <= top <= MAX_TOP_LOGPROBS):
        raise BadRequest(f"top_logprobs: must be in [0, {MAX_TOP_LOGPROBS}]")
    if top and not get(body, "logprobs", bool, False):
        raise BadRequest("top_logprobs: needs logprobs: true")
    # No max_tokens: the rest of the context, as SGLang does.
    limit = get(body, "max_completion_tokens", int)
    if limit is None:
        limit = get(body, "max_tokens", int)
    if limit is not None and limit > context_length:      # SGLang's words (and its missing space)
        raise BadRequest(f"max_completion_tokens is too large: {limit}."
                         f"This model supports at most {context_length} completion tokens.")
    return _params(body, vocab_size, limit if limit is not None else max(context_length - prompt_len, 0), grammar)


def completion_prompts(body: dict) -> list:
    """`prompt` as a list of str or list[int]: a string, strings, token ids or lists of ids."""
    p = body.get("prompt")
    if isinstance(p, str):
        return [p]
    if isinstance(p, list) and p:
        if all(isinstance(x, str) for x in p):
            return p
        if all(isinstance(x, int) and not isinstance(x, bool) for x in p):
            return [p]
        if all(isinstance(x, list) for x in p):
            return p
    raise BadRequest("prompt: must be a non-empty string, list of strings, list of token ids, or list of those")


def _text_of(content, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise BadRequest(f"messages[{i}].content: only text parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise BadRequest(f"messages[{i}].content: must be a string or a list of text parts")


def chat_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("messages: must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}]: must be an object with a string 'role'")
        if m["role"] not in ("system", "developer", "user", "assistant", "tool"):
            raise BadRequest(f"messages[{i}].role: unknown role {m['role']!r}")
        out.append({"role": m["role"], "content": _text_of(m.get("content"), i), **_tool_fields(m, i)})
    return out


def _tool_call(call, where: str) -> dict:
    fn = call.get("function") if isinstance(call, dict) else None
    if not (isinstance(fn, dict) and isinstance(fn.get("name"), str)):
        raise BadRequest(f"{where}: must be {{\"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}")
    args = fn.get("arguments", {})
    if isinstance(args, str):           # OpenAI sends a JSON string; Qwen's template wants the object
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            raise BadRequest(f"{where}.function.arguments: not valid JSON") from None
    return {"type": "function", "id": call.get("id"), "function": {"name": fn["name"], "arguments": args}}


def _tool_fields(m: dict, i: int) -> dict:
    """The parts of a tool round trip the chat template renders: the assistant's earlier calls,
    the tool's answer id and name, and (Qwen3) earlier reasoning."""
    extra = {}
    if m.get("tool_calls"):
        if not isinstance(m["tool_calls"], list):
            raise BadRequest(f"messages[{i}].tool_calls: must be a list")
        extra["tool_calls"] = [_tool_call(c, f"messages[{i}].tool_calls[{k}]") for k, c in enumerate(m["tool_calls"])]
    for name in ("tool_call_id", "name", "reasoning_content"):
        if m.get(name) is not None:
            if not isinstance(m[name], str):
                raise BadRequest(f"messages[{i}].{name}: must be a string")
            extra[name] = m[name]
    return extra
