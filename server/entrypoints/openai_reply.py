"""Shaping native results into OpenAI objects, one `Reply` per request.

    reply.response(results)             -> the non-streaming JSON body
    reply.chunks(i, result, previous)   -> stream chunks for choice i since `previous`
    reply.envelope(choices, **extra)    -> {"id", "object", "created", "model", "choices", ...}

A native result is cumulative ({"text", "output_ids", "meta_info"}), so a delta is the new
result minus the previous one of the same choice. Chat choices go through the request's
parsers (server/parsers/): `<think>` blocks become `reasoning_content`, `<tool_call>`
blocks become `tool_calls` (and finish_reason "tool_calls").
"""
from __future__ import annotations

import time
import uuid

from server.entrypoints.openai_logprobs import TokenText, chat_logprobs, completion_logprobs
from server.parsers.chat import ChatParsing


def finish_reason(meta: dict) -> str | None:
    reason = meta.get("finish_reason")
    return None if reason is None else reason.get("type")


def matched_stop(meta: dict):
    return (meta.get("finish_reason") or {}).get("matched")


def usage(results: list[dict], n: int, cache_report: bool = False) -> dict:
    """The prompt counts once per prompt, not once per sample (OpenAI's convention); with
    `--enable_cache_report`, so do the prompt tokens served from the prefix cache."""
    firsts = [r["meta_info"] for i, r in enumerate(results) if i % n == 0]
    prompt = sum(m["prompt_tokens"] for m in firsts)
    completion = sum(r["meta_info"]["completion_tokens"] for r in results)
    out = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if cache_report:
        out["prompt_tokens_details"] = {"cached_tokens": sum(m.get("cached_tokens", 0) for m in firsts)}
    return out


class Reply:
    id_prefix = object_name = chunk_object = ""
    cache_report = False          # set from --enable_cache_report
    echo_logprobs = False         # completions with echo and logprobs: the prompt's logprobs come first

    def __init__(self, model: str, n: int, token_text: TokenText, logprobs: bool, top_logprobs: int = 0):
        self.id, self.model, self.n = f"{self.id_prefix}-{uuid.uuid4().hex}", model, n
        self.tt, self.logprobs, self.top_logprobs = token_text, logprobs, top_logprobs
        self.created = int(time.time())

    def envelope(self, choices: list, obj: str | None = None, **extra) -> dict:
        return {"id": self.id, "object": obj or self.chunk_object, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def native_logprobs(self, meta: dict, start: int) -> tuple[list, list | None]:
        """The engine's triples for tokens [start:], and their alternatives when asked for."""
        tops = meta.get("output_top_logprobs") if self.top_logprobs else None
        return meta.get("output_token_logprobs", [])[start:], (tops[start:] if tops is not None else None)

    def response(self, results: list[dict]) -> dict:
        choices = [self.choice(i, r) for i, r in enumerate(results)]
        return self.envelope(choices, obj=self.object_name, usage=usage(results, self.n, self.cache_report))

    def chunks(self, i: int, result: dict, prev: dict | None) -> list[dict]:
        old_text, old_tokens = (prev["text"], len(prev["output_ids"])) if prev else ("", 0)
        delta, reason = result["text"][len(old_text):], finish_reason(result["meta_info"])
        new_tokens = len(result["output_ids"]) > old_tokens
        # a first chunk with echoed prompt logprobs says something even without new tokens (max_tokens 0)
        wanted = self.logprobs and (new_tokens or (prev is None and self.echo_logprobs))
        lp = self.format_logprobs(result["meta_info"], old_tokens, i) if wanted else None
        return self.delta_chunks(i, delta, reason, lp, first=prev is None)


class CompletionReply(Reply):
    id_prefix, object_name, chunk_object = "cmpl", "text_completion", "text_completion"

    def __init__(self, model, n, token_text, logprobs, echo: list[str], top_logprobs: int = 0):
        super().__init__(model, n, token_text, logprobs, top_logprobs)
        self.echo = echo                          # per prompt: the prompt text, or "" without echo

    def format_logprobs(self, meta: dict, start: int, i: int) -> dict:
        """Tokens from output token `start` on (a stream's delta); the echoed prompt's tokens
        lead the first delta. Offsets count the echoed prompt and every earlier token, so
        compute all, then slice."""
        lps, tops = self.native_logprobs(meta, 0)
        full = completion_logprobs(self.tt, lps, tops, len(self.echo[i // self.n]))
        if self.echo_logprobs:          # OpenAI's echo: prompt tokens first (from offset 0), first logprob null
            in_tops = meta.get("input_top_logprobs") if self.top_logprobs else None
            prompt = completion_logprobs(self.tt, meta.get("input_token_logprobs", []), in_tops, 0)
            full = {k: prompt[k] + v if isinstance(v, list) else v for k, v in full.items()}
            start = start + len(prompt["tokens"]) if start else 0
        return {k: (v[start:] if isinstance(v, list) else v) for k, v in full.items()}

    def choice(self, i: int, r: dict) -> dict:
        meta, echo = r["meta_info"], self.echo[i // self.n]
        return {"index": i, "text": echo + r["text"], "finish_reason": finish_reason(meta),
                "matched_stop": matched_stop(meta),
                "logprobs": self.format_logprobs(meta, 0, i) if self.logprobs else None}

    def delta_chunks(self, i, delta, reason, lp, first) -> list[dict]:
        delta = (self.echo[i // self.n] if first else "") + delta
        if not delta and not reason and lp is None:     # tokens still held back, nothing to say yet
            return []
        return [self.envelope([{"index": i, "text": delta, "logprobs": lp, "finish_reason": reason}])]


class ChatReply(Reply):
    id_prefix, object_name, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def __init__(self, model, n, token_text, logprobs, top_logprobs: int = 0, parsing: ChatParsing | None = None):
        super().__init__(model, n, token_text, logprobs, top_logprobs)
        self.parsing = parsing or ChatParsing()
        self.parsers: dict[int, object] = {}      # choice -> its parser chain, while streaming
        self.called: set[int] = set()             # choices that made a tool call

    def format_logprobs(self, meta: dict, start: int = 0, i: int = 0) -> dict:
        return chat_logprobs(self.tt, *self.native_logprobs(meta, start))

    def _reason(self, i: int, meta: dict) -> str | None:
        reason = finish_reason(meta)
        return "tool_calls" if reason == "stop" and i in self.called else reason

    def choice(self, i: int, r: dict) -> dict:
        meta, message = r["meta_info"], {"role": "assistant", "content": r["text"]}
        if self.parsing.active:
            d = self.parsing.start().parse(r["text"])
            message["content"] = d.content or (None if d.tool_calls else "")
            if self.parsing.reasoning:
                message["reasoning_content"] = d.reasoning or None
            if d.tool_calls:
                message["tool_calls"] = d.tool_calls
                self.called.add(i)
        return {"index": i, "message": message, "finish_reason": self._reason(i, meta),
                "matched_stop": matched_stop(meta), "logprobs": self.format_logprobs(meta) if self.logprobs else None}

    def delta_chunks(self, i, delta, reason, lp, first) -> list[dict]:
        out = []
        if first:           # OpenAI streams open each choice with the assistant role
            out.append(self.envelope([{"index": i, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None}]))
        fields = self._parse_delta(i, delta, final=reason is not None)
        if fields or reason or lp is not None:
            reason = "tool_calls" if reason == "stop" and i in self.called else reason
            out.append(self.envelope([{"index": i, "delta": fields, "logprobs": lp, "finish_reason": reason}]))
        return out

    def _parse_delta(self, i: int, delta: str, final: bool) -> dict:
        if not self.parsing.active:
            return {"content": delta} if delta else {}
        parser = self.parsers.setdefault(i, self.parsing.start())
        d, fields = parser.feed(delta, final), {}
        if d.reasoning:
            fields["reasoning_content"] = d.reasoning
        if d.content:
            fields["content"] = d.content
        if d.tool_calls:
            first = parser.num_calls - len(d.tool_calls)      # OpenAI numbers a choice's calls
            fields["tool_calls"] = [{"index": first + k, **c} for k, c in enumerate(d.tool_calls)]
            self.called.add(i)
        return fields
