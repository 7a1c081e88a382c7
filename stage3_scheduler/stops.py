"""Stop conditions, checked after every new token, in SGLang's order and shapes.

    check_stop(req, eos_ids, tokenizer, context_length) -> finish_reason dict or None

  length      {"type": "length", "length": max_new_tokens}   (or the context is full)
  stop token  {"type": "stop", "matched": <token id>}         EOS unless ignore_eos, stop_token_ids
  stop string {"type": "stop", "matched": "<the string>"}     found in the decoded tail
EOS and stop ids are suppressed while fewer than min_new_tokens were generated (see
`min_tokens_mask`); stop strings are simply not checked until then.
"""
from __future__ import annotations

from stage3_scheduler.request import Req

TAIL_TOKENS = 8          # extra tokens decoded beyond the stop string's length


def stop_token_ids(req: Req, eos_ids: list[int]) -> set[int]:
    if req.stop_ids is None:          # built once per request, checked after every token
        req.stop_ids = set(req.params.stop_token_ids) | (set() if req.params.ignore_eos else set(eos_ids))
    return req.stop_ids


def check_stop(req: Req, eos_ids: list[int], tokenizer, context_length: int) -> dict | None:
    p, out = req.params, req.output_ids
    if len(out) >= p.min_new_tokens:
        if out and out[-1] in stop_token_ids(req, eos_ids):
            return {"type": "stop", "matched": out[-1]}
        if p.stop and tokenizer is not None:
            longest = max(len(s.encode("utf-8")) for s in p.stop)
            # A token decodes to >= 1 byte (byte-level tokens may spell a character in up to
            # 4), so the last `longest + 8` tokens hold any match.
            tail = tokenizer.decode(out[-(longest + TAIL_TOKENS):], skip_special_tokens=False)
            for s in p.stop:
                if s in tail:
                    return {"type": "stop", "matched": s}
    if len(out) >= p.max_new_tokens:
        return {"type": "length", "length": p.max_new_tokens}
    if req.seq_len >= context_length:
        return {"type": "length", "length": len(out)}
    return None


def min_tokens_mask(reqs: list[Req], eos_ids: list[int], generated: list[int]) -> list[tuple[int, int]]:
    """(row in batch, token id) pairs to forbid: the stop ids of requests that generated
    fewer than min_new_tokens so far (`generated[i]` counts request i's tokens)."""
    return [(i, t) for i, (r, n) in enumerate(zip(reqs, generated)) if n < r.params.min_new_tokens
            for t in sorted(stop_token_ids(r, eos_ids))]


def ids_for_text(output_ids: list[int], params, finish_reason: dict | None) -> list[int]:
    """The ids whose text is returned: SGLang drops a matched stop token (EOS or one of
    stop_token_ids) from the text unless no_stop_trim. output_ids keep it."""
    if finish_reason and type(finish_reason.get("matched")) is int and not params.no_stop_trim:
        return output_ids[:-1]
    return output_ids


def stop_string_end(text: str, params, finish_reason: dict | None) -> int:
    """Where the returned text ends: at the first occurrence of the matched stop string
    (SGLang trims it unless no_stop_trim), else at len(text). The one trimming rule, used by
    the offline Engine and the server's detokenizer; `params` needs only `no_stop_trim`."""
    matched = (finish_reason or {}).get("matched")
    if isinstance(matched, str) and not params.no_stop_trim:
        idx = text.find(matched)
        if idx >= 0:
            return idx
    return len(text)


def trim_stop_string(text: str, req_or_params, finish_reason: dict | None) -> str:
    """The text cut at the matched stop string (see `stop_string_end`)."""
    params = getattr(req_or_params, "params", req_or_params)
    return text[:stop_string_end(text, params, finish_reason)]
