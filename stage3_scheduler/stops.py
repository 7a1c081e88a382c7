"""Stop conditions, checked after every new token, in SGLang's order and shapes.

    check_stop(req, eos_ids, tokenizer, context_length) -> finish_reason dict or None

  length      {"type": "length", "length": max_new_tokens}   (or the context is full)
  stop token  {"type": "stop", "matched": <token id>}         EOS unless ignore_eos, stop_token_ids
  stop string {"type": "stop", "matched": "<the string>"}     found in the decoded tail
  stop_regex  {"type": "stop", "matched": "<matched text>", "regex": "<pattern>"}  in the tail
  grammar     {"type": "stop", "matched": <stop token id>}    the grammar is complete
EOS and stop ids are suppressed while fewer than min_new_tokens were generated (see
`min_tokens_mask`); stop strings and regexes are simply not checked until then.

stop_regex runs a client's pattern on the server, so it is guarded against catastrophic
backtracking (ReDoS): patterns are at most 256 characters, only the last
STOP_REGEX_WINDOW characters of the output are searched, and the `regex` package's
`timeout=` bounds the search; a timeout ends the request with an abort (an error for the
client), never a hung scheduler. A regex match is not trimmed from the text: a stream may
already have sent it.
"""
from __future__ import annotations

import regex

from stage3_scheduler.request import Req
from stage3_scheduler.sampling_params import InvalidParams

TAIL_TOKENS = 8          # extra tokens decoded beyond the stop string's length
STOP_REGEX_WINDOW = 200              # characters of the output tail a stop_regex sees
STOP_REGEX_TOKENS = STOP_REGEX_WINDOW  # a token is >= 1 character: this many tokens cover the window
STOP_REGEX_TIMEOUT_S = 0.05          # per check (all patterns of a request together)


def compile_stop_regex(patterns: list[str]) -> list:
    """Compiled patterns (the `regex` package caches them), or InvalidParams naming the bad one."""
    out = []
    for p in patterns:
        try:
            out.append(regex.compile(p))
        except (regex.error, RecursionError, OverflowError) as e:
            raise InvalidParams(f"stop_regex: {p!r} is not a valid regular expression ({e})") from None
    return out


def check_stop_regex(req: Req, tokenizer) -> dict | None:
    """The first stop_regex found in the output's tail; an abort reason if matching timed out."""
    tail = tokenizer.decode(req.output_ids[-STOP_REGEX_TOKENS:], skip_special_tokens=False)[-STOP_REGEX_WINDOW:]
    try:
        for pattern in compile_stop_regex(req.params.stop_regex):
            if m := pattern.search(tail, timeout=STOP_REGEX_TIMEOUT_S):
                return {"type": "stop", "matched": m.group(0), "regex": pattern.pattern}
    except TimeoutError:
        return {"type": "abort", "message": f"stop_regex: matching took over {STOP_REGEX_TIMEOUT_S} s "
                "(a pattern with catastrophic backtracking?); the request was stopped"}
    return None


def stop_token_ids(req: Req, eos_ids: list[int]) -> set[int]:
    if req.stop_ids is None:          # built once per request, checked after every token
        req.stop_ids = set(req.params.stop_token_ids) | (set() if req.params.ignore_eos else set(eos_ids))
    return req.stop_ids


def check_stop(req: Req, eos_ids: list[int], tokenizer, context_length: int) -> dict | None:
    p, out = req.params, req.output_ids
    if req.grammar is not None and (req.grammar.terminated or req.grammar.failed):
        if req.grammar.failed:
            return {"type": "abort", "message": "the grammar was complete and allowed only a stop token, "
                    "which min_new_tokens forbade"}
        return {"type": "stop", "matched": out[-1]}     # a stop token ended the grammar
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
        if p.stop_regex and tokenizer is not None and (reason := check_stop_regex(req, tokenizer)):
            return reason
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
    if isinstance(matched, str) and not params.no_stop_trim and "regex" not in finish_reason:
        idx = text.find(matched)
        if idx >= 0:
            return idx
    return len(text)


def trim_stop_string(text: str, req_or_params, finish_reason: dict | None) -> str:
    """The text cut at the matched stop string (see `stop_string_end`)."""
    params = getattr(req_or_params, "params", req_or_params)
    return text[:stop_string_end(text, params, finish_reason)]
