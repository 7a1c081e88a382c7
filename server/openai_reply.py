"""Shaping native results into OpenAI objects, one `Reply` per request.

    reply.response(results)             -> the non-streaming JSON body
    reply.chunks(i, result, previous)   -> stream chunks for choice i since `previous`
    reply.envelope(choices, **extra)    -> {"id", "object", "created", "model", "choices", ...}

A native result is cumulative ({"text", "output_ids", "meta_info"}), so a delta is the new
result minus the previous one of the same choice.
"""
from __future__ import annotations

import time
import uuid


def finish_reason(meta: dict) -> str | None:
    reason = meta.get("finish_reason")
    return None if reason is None else reason.get("type")


def matched_stop(meta: dict):
    return (meta.get("finish_reason") or {}).get("matched")


def usage(results: list[dict], n: int) -> dict:
    """The prompt counts once per prompt, not once per sample (OpenAI's convention)."""
    prompt = sum(r["meta_info"]["prompt_tokens"] for i, r in enumerate(results) if i % n == 0)
    completion = sum(r["meta_info"]["completion_tokens"] for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Reply:
    id_prefix = object_name = chunk_object = ""

    def __init__(self, model: str, n: int, tokenizer, logprobs: bool):
        self.id, self.model, self.n = f"{self.id_prefix}-{uuid.uuid4().hex}", model, n
        self.tokenizer, self.logprobs = tokenizer, logprobs
        self.created = int(time.time())

    def envelope(self, choices: list, obj: str | None = None, **extra) -> dict:
        return {"id": self.id, "object": obj or self.chunk_object, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def token_logprobs(self, meta: dict, start: int = 0) -> list[tuple[str, float]]:
        return [(self.tokenizer.decode([t]), lp) for lp, t, _ in meta.get("output_token_logprobs", [])[start:]]

    def response(self, results: list[dict]) -> dict:
        choices = [self.choice(i, r) for i, r in enumerate(results)]
        return self.envelope(choices, obj=self.object_name, usage=usage(results, self.n))

    def chunks(self, i: int, result: dict, prev: dict | None) -> list[dict]:
        old_text, old_tokens = (prev["text"], len(prev["output_ids"])) if prev else ("", 0)
        delta, reason = result["text"][len(old_text):], finish_reason(result["meta_info"])
        lp = self.format_logprobs(result["meta_info"], old_tokens) if self.logprobs else None
        return self.delta_chunks(i, delta, reason, lp, first=prev is None)


class CompletionReply(Reply):
    id_prefix, object_name, chunk_object = "cmpl", "text_completion", "text_completion"

    def __init__(self, model, n, tokenizer, logprobs, echo: list[str]):
        super().__init__(model, n, tokenizer, logprobs)
        self.echo = echo                          # per prompt: the prompt text, or "" without echo

    def format_logprobs(self, meta: dict, start: int = 0) -> dict:
        pairs = self.token_logprobs(meta, start)
        return {"tokens": [t for t, _ in pairs], "token_logprobs": [lp for _, lp in pairs],
                "top_logprobs": None, "text_offset": None}

    def choice(self, i: int, r: dict) -> dict:
        meta = r["meta_info"]
        return {"index": i, "text": self.echo[i // self.n] + r["text"], "finish_reason": finish_reason(meta),
                "matched_stop": matched_stop(meta), "logprobs": self.format_logprobs(meta) if self.logprobs else None}

    def delta_chunks(self, i, delta, reason, lp, first) -> list[dict]:
        delta = (self.echo[i // self.n] if first else "") + delta
        if not delta and not reason:
            return []
        return [self.envelope([{"index": i, "text": delta, "logprobs": lp, "finish_reason": reason}])]


class ChatReply(Reply):
    id_prefix, object_name, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def format_logprobs(self, meta: dict, start: int = 0) -> dict:
        return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                            for t, lp in self.token_logprobs(meta, start)]}

    def choice(self, i: int, r: dict) -> dict:
        meta = r["meta_info"]
        return {"index": i, "message": {"role": "assistant", "content": r["text"]},
                "finish_reason": finish_reason(meta), "matched_stop": matched_stop(meta),
                "logprobs": self.format_logprobs(meta) if self.logprobs else None}

    def delta_chunks(self, i, delta, reason, lp, first) -> list[dict]:
        out = []
        if first:           # OpenAI streams open each choice with the assistant role
            out.append(self.envelope([{"index": i, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None}]))
        if delta or reason:
            out.append(self.envelope([{"index": i, "delta": {"content": delta} if delta else {},
                                       "logprobs": lp, "finish_reason": reason}]))
        return out
