"""Structured output: a grammar per request decides which tokens it may sample next.

    grammar_spec(params)                  -> ("regex" | "json_schema" | "ebnf", text) or None
    GrammarBackend(tokenizer, vocab, stop_ids).compile(spec) -> CompiledGrammar  (cached)
                                             raises GrammarError (the server answers 400)
    RequestGrammar(compiled): accept(token), terminated, failed, resync(output_ids)
    batch_bitmask(reqs, words, device)    -> (rows [N] int64, bitmask [N, W] int32) or None

xgrammar does the grammar work: it compiles a regex, JSON schema or EBNF grammar against
the tokenizer's vocabulary once, and a per-request matcher, advanced by every committed
token, fills a bitmask of the tokens allowed next (bit t of word t // 32 set = token t
allowed; W = ceil(vocab / 32)). The stop ids count as the grammar's end: once the grammar
is complete and cannot continue, only they are allowed, so the request stops with
finish_reason "stop". Stage 2's sampler turns the bitmask into -inf logits on the device.

Why it lives here, in stage 3: a grammar is a per-request sampling parameter with state
that follows the request's committed tokens, and the scheduler is what commits tokens,
retracts and aborts requests. Stage 2's sampler only sees a mask tensor, as it only sees
logit_bias. xgrammar is imported lazily, so engines that never see a grammar never need it.

The matcher mirrors `req.output_ids`: `accepted` counts the tokens it has consumed. A
retraction keeps the output, so the matcher stays valid; `resync` rebuilds it by replaying
the output whenever the two disagree, so no code path can sample from a stale matcher.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict

import torch

from stage2_runner.forward_batch import to_device

KINDS = ("regex", "json_schema", "ebnf")
MAX_GRAMMAR_CHARS = 64 * 1024          # a bigger spec is refused before any compile work
CACHE_ENTRIES, CACHE_BYTES = 256, 256 << 20   # compiled grammars kept (LRU); errors are cached too


class GrammarError(ValueError):
    """The grammar does not compile; the message says why (shown to the client)."""


def grammar_spec(params) -> tuple[str, str] | None:
    """The request's one grammar as (kind, text), or None. Validation allows at most one."""
    for kind in KINDS:
        text = getattr(params, kind, None)
        if text is not None:
            return kind, text
    return None


class GrammarBackend:
    """One per process: xgrammar's tokenizer info (built once, ~0.5 s for Qwen's 152k
    tokens) and a compile cache keyed by (kind, text). Thread-safe: the server compiles on
    a worker pool."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int]):
        import xgrammar as xgr          # lazy: only a process that meets a grammar imports it
        self.xgr, self.vocab_size, self.stop_ids = xgr, vocab_size, list(stop_ids)
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=self.stop_ids)
        self.compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        self.words = (vocab_size + 31) // 32          # W: int32 words per bitmask row
        self.cache: OrderedDict = OrderedDict()       # (kind, text) -> CompiledGrammar or GrammarError
        self.cache_bytes = 0
        self.lock = threading.Lock()

    def compile(self, spec: tuple[str, str]):
        """The compiled grammar of (kind, text), from the cache when it was seen before."""
        with self.lock:
            hit = self.cache.get(spec)
            if hit is not None:
                self.cache.move_to_end(spec)
        if hit is None:
            hit = self._compile(*spec)
            with self.lock:
                if spec not in self.cache:
                    self.cache[spec] = hit
                    self.cache_bytes += _size(hit)
                # Least recently used out first; a compiled grammar holds per-token masks (KBs to MBs).
                while len(self.cache) > CACHE_ENTRIES or self.cache_bytes > CACHE_BYTES:
                    self.cache_bytes -= _size(self.cache.popitem(last=False)[1])
        if isinstance(hit, GrammarError):
            raise GrammarError(str(hit))       # a fresh exception: a cached one would grow its traceback
        return hit

    def _compile(self, kind: str, text: str):
        """A CompiledGrammar, or the GrammarError to raise (cached, so a bad grammar sent
        again costs nothing)."""
        if len(text) > MAX_GRAMMAR_CHARS:
            return GrammarError(f"{kind}: longer than {MAX_GRAMMAR_CHARS} characters")
        try:
            if kind == "regex":
                return self.compiler.compile_regex(text)
            if kind == "ebnf":
                return self.compiler.compile_grammar(text)
            json.loads(text)                # a clear message for text that is not JSON at all
            # Compact JSON (no free whitespace): a model cannot loop on spaces and newlines.
            return self.compiler.compile_json_schema(text, any_whitespace=False)
        except json.JSONDecodeError as e:
            return GrammarError(f"json_schema: not valid JSON ({e})")
        except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError with its parser's message
            return GrammarError(f"{kind}: does not compile: {_clean(str(e))}")

    def matcher(self, spec: tuple[str, str]) -> "RequestGrammar":
        return RequestGrammar(self.xgr.GrammarMatcher(self.compile(spec), override_stop_tokens=self.stop_ids))


def _size(entry) -> int:
    return 0 if isinstance(entry, GrammarError) else entry.memory_size_bytes


def _clean(message: str) -> str:
    """xgrammar's messages start with '[time] /path/file.cc:line: '; keep the reason."""
    reason = message.strip().splitlines()[0] if message.strip() else "unknown error"
    return reason.split(": ", 1)[1] if reason.startswith("[") and ": " in reason else reason


class RequestGrammar:
    """One request's matcher and how many of its output tokens it has consumed."""

    def __init__(self, matcher):
        self.matcher, self.accepted, self.failed = matcher, 0, False

    @property
    def terminated(self) -> bool:
        """A stop token was accepted: the grammar is finished."""
        return self.matcher.is_terminated()

    def accept(self, token: int) -> None:
        """Advance by one committed token. A token the mask should have forbidden (only when
        another rule masked every allowed token, e.g. min_new_tokens against a finished
        grammar) marks the grammar failed; the scheduler then ends the request."""
        if not self.failed and not self.matcher.accept_token(token):
            self.failed = True
        self.accepted += 1

    def resync(self, output_ids: list[int]) -> None:
        """Make the matcher's state that of `output_ids` (replay from the start if needed)."""
        if self.accepted == len(output_ids):
            return
        self.matcher.reset()
        self.accepted, self.failed = 0, False
        for t in output_ids:
            self.accept(t)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)


def batch_bitmask(reqs: list, generated: list[int], words: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The allowed-token bitmask of each batch row that has a grammar: (rows [N], bits [N, W]).
    None when no row has one, so a batch without grammars does no work at all. The bits are
    filled on the host (the matcher is CPU code) and reach the device in one non-blocking copy.
    `generated[i]`: tokens row i has generated, in-flight ones included (stage 5)."""
    rows = [i for i, r in enumerate(reqs) if r.grammar is not None]
    if not rows:
        return None
    # The mask follows the matcher, which must have seen every earlier token: stage 5's
    # overlap commits a batch holding grammar rows before it launches the next one.
    assert all(generated[i] == len(reqs[i].output_ids) for i in rows), \
        "a grammar row was launched before its previous token was committed"
    bits = torch.full((len(rows), words), -1, dtype=torch.int32)       # all allowed until filled
    for k, i in enumerate(rows):
        g = reqs[i].grammar
        g.resync(reqs[i].output_ids)
        if not (g.terminated or g.failed):
            g.fill(bits, k)
    return to_device(torch.tensor(rows, dtype=torch.int64), device), to_device(bits, device)
