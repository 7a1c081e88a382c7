"""OpenAI's two logprobs shapes, built from the engine's native ones.

The engine reports, per output token, `[logprob, token id, text or null]` in
`meta_info.output_token_logprobs` and, when asked for k alternatives, a list of k such
triples in `meta_info.output_top_logprobs`. OpenAI wants:

    completions (logprobs: k)        {"tokens": [str], "token_logprobs": [float],
                                      "top_logprobs": [{str: float}] | None, "text_offset": [int]}
    chat (logprobs, top_logprobs: k) {"content": [{"token", "logprob", "bytes",
                                      "top_logprobs": [{"token", "logprob", "bytes"}]}]}

`bytes` are the token's own UTF-8 bytes, recovered from the byte-level BPE symbols, so a
token holding half of a character gives its real bytes (decoding it alone gives U+FFFD).
A logprob of -inf (a token the sampler masked) is not valid JSON: it is sent as -9999.0,
the value OpenAI uses.
"""
from __future__ import annotations

import math
from functools import lru_cache

FLOOR = -9999.0


def _byte_symbols() -> dict[str, int]:
    """GPT-2's byte-level alphabet, which Qwen's BPE uses: printable bytes stand for
    themselves, the other 68 (space, control bytes...) are shifted to chr(256 + k)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, k = {chr(b): b for b in printable}, 0
    for b in range(256):
        if chr(b) not in symbols:
            symbols[chr(256 + k)] = b
            k += 1
    return symbols


BYTE_OF = _byte_symbols()                 # byte-level BPE symbol -> byte


def finite(lp: float | None) -> float | None:
    """None stays None: an echoed prompt's first token has no logprob (OpenAI sends null)."""
    return lp if lp is None or math.isfinite(lp) else FLOOR


class TokenText:
    """Per-token text and bytes for one tokenizer (cached: the same ids recur all the time)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.text = lru_cache(maxsize=1 << 16)(lambda t: tokenizer.decode([t]))
        self.bytes = lru_cache(maxsize=1 << 16)(self._bytes)

    def _bytes(self, token_id: int) -> list[int]:
        symbol = self.tokenizer.convert_ids_to_tokens(token_id)
        if symbol is None:
            return list(self.text(token_id).encode())
        if all(ch in BYTE_OF for ch in symbol):         # a byte-level piece
            return [BYTE_OF[ch] for ch in symbol]
        return list(symbol.encode())                     # an added token such as <think>


def completion_logprobs(tt: TokenText, lps: list, tops: list | None, offset: int) -> dict:
    """`lps`: [[logprob, id, _], ...]; `tops`: per token, k triples (or None: a prompt's first
    token), or None; `offset`: where the first token's text starts in the choice's text."""
    tokens = [tt.text(t) for _, t, _ in lps]
    offsets = []
    for tok in tokens:
        offsets.append(offset)
        offset += len(tok)
    top = None
    if tops is not None:
        top = [None if alts is None else {tt.text(t): finite(lp) for lp, t, _ in alts} for alts in tops]
    return {"tokens": tokens, "token_logprobs": [finite(lp) for lp, _, _ in lps], "top_logprobs": top,
            "text_offset": offsets}


def chat_logprobs(tt: TokenText, lps: list, tops: list | None) -> dict:
    def entry(lp, t):
        return {"token": tt.text(t), "logprob": finite(lp), "bytes": tt.bytes(t)}

    content = []
    for i, (lp, t, _) in enumerate(lps):
        alts = tops[i] if tops is not None else []
        content.append({**entry(lp, t), "top_logprobs": [entry(a_lp, a_t) for a_lp, a_t, _ in alts]})
    return {"content": content}
