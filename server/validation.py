"""Checking a native `/generate` body before anything reaches the scheduler.

    parse_generate(body, vocab_size) -> GenerateBatch      or raises BadRequest("what is wrong")

Everything a client controls is checked here, by type and range: prompts (text or token ids,
one or a batch), sampling params (stage 3's `SamplingParams.from_dict`, which also catches
NaN), logprob options, rids. Length checks that need token counts (prompt + max_new_tokens
vs. the context) run after tokenization, in `check_length`. Unknown top-level fields are
ignored, as SGLang's dataclass parsing ignores them; unknown sampling params are errors.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from server.unsupported import NATIVE, SAMPLING, refusal
from stage3_scheduler.sampling_params import InvalidParams, SamplingParams

MAX_BATCH, MAX_TOP_LOGPROBS, MAX_TOKEN_IDS_LOGPROB = 1024, 20, 64


class BadRequest(ValueError):
    """A client error; the HTTP layer answers `status` (400) with this message."""
    status = 400


@dataclass
class GenerateBatch:
    prompts: list                          # each a str (text) or list[int] (input_ids)
    params: list[SamplingParams]           # one per prompt
    rids: list[str | None]
    is_batch: bool                         # the client sent a list: answer with a list
    stream: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    token_ids_logprob: list[list[int]] | None = None   # per prompt: ids whose logprobs to report
    logprob_start_len: list[int] | None = None         # per prompt: >= 0 asks for prompt logprobs


def _expect(ok: bool, msg: str) -> None:
    if not ok:
        raise BadRequest(msg)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_ids(ids, vocab_size: int, name: str = "input_ids") -> list[int]:
    _expect(isinstance(ids, list) and len(ids) > 0, f"{name}: must be a non-empty list of token ids")
    for t in ids:
        _expect(_is_int(t), f"{name}: token ids must be integers (got {t!r})")
        _expect(0 <= t < vocab_size, f"{name}: token id {t} is outside the vocabulary [0, {vocab_size})")
    return ids


def _prompts(body: dict, vocab_size: int) -> tuple[list, bool]:
    text, ids = body.get("text"), body.get("input_ids")
    _expect((text is None) != (ids is None), "exactly one of 'text' or 'input_ids' is required")
    if text is not None:
        if isinstance(text, str):
            text, single = [text], True
        else:
            _expect(isinstance(text, list) and len(text) > 0, "text: must be a string or a non-empty list of strings")
            single = False
        for t in text:
            _expect(isinstance(t, str), f"text: must be a string (got {type(t).__name__})")
            _expect(len(t) > 0, "text: the prompt is empty")
        return text, single
    _expect(isinstance(ids, list) and len(ids) > 0, "input_ids: must be a non-empty list")
    if all(isinstance(x, list) for x in ids):
        return [check_ids(x, vocab_size) for x in ids], False
    return [check_ids(ids, vocab_size)], True


def _sampling(raw, count: int, vocab_size: int) -> list[SamplingParams]:
    if raw is None or isinstance(raw, dict):
        raw = [raw] * count
    _expect(isinstance(raw, list) and len(raw) == count,
            f"sampling_params: must be an object, or a list with one object per prompt ({count})")
    out = []
    for p in raw:
        _expect(p is None or isinstance(p, dict), "sampling_params: must be an object")
        try:
            out.append(SamplingParams.from_dict(sglang_sampling(p), vocab_size))
        except InvalidParams as e:
            raise BadRequest(f"sampling_params.{e}") from None
    return out


def sglang_sampling(p: dict | None, where: str = "sampling_params.") -> dict | None:
    """SGLang's spellings and known-but-unsupported fields, before stage 3's strict parsing
    (which would call them "unknown"): `sampling_seed` is SGLang's name for `seed`."""
    if not p:
        return p
    why = refusal(p, SAMPLING)
    _expect(why is None, f"{where}{why}")
    if p.get("sampling_seed") is not None:
        p = dict(p)
        seed = p.pop("sampling_seed")
        _expect(p.get("seed") in (None, seed), f"{where}sampling_seed: differs from seed; send one of them")
        p["seed"] = seed
    return p


def rids_of(raw, count: int) -> list[str | None]:
    if raw is None:
        return [None] * count
    rids = [raw] if isinstance(raw, str) else raw
    _expect(isinstance(rids, list) and len(rids) == count and all(isinstance(r, str) and r for r in rids),
            f"rid: must be a non-empty string per prompt ({count})")
    dup = sorted(r for r, k in Counter(rids).items() if k > 1)
    _expect(not dup, f"Duplicate request IDs detected within the request: {dup}")     # SGLang's wording
    return rids


def _flag(body: dict, name: str, default=False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, list) and value and all(isinstance(v, bool) for v in value):
        value = any(value)            # SGLang allows one flag per prompt; we honour it batch-wide
    _expect(isinstance(value, bool), f"{name}: must be true or false")
    return value


def parse_generate(body, vocab_size: int) -> GenerateBatch:
    _expect(isinstance(body, dict), "the request body must be a JSON object")
    prompts, single = _prompts(body, vocab_size)
    _expect(len(prompts) <= MAX_BATCH, f"at most {MAX_BATCH} prompts per request")
    params = _sampling(body.get("sampling_params"), len(prompts), vocab_size)
    top = body.get("top_logprobs_num", 0) or 0
    _expect(_is_int(top) and 0 <= top <= MAX_TOP_LOGPROBS, f"top_logprobs_num: must be in [0, {MAX_TOP_LOGPROBS}]")
    why = refusal(body, NATIVE)         # never silently ignore a field that would change the answer
    _expect(why is None, why or "")
    n_total = sum(p.n for p in params)
    _expect(n_total <= MAX_BATCH, f"at most {MAX_BATCH} sequences per request (prompts x n)")
    return GenerateBatch(prompts, params, rids_of(body.get("rid"), len(prompts)),
                         is_batch=not single or n_total > 1, stream=_flag(body, "stream"),
                         return_logprob=_flag(body, "return_logprob"), top_logprobs_num=top,
                         return_text_in_logprobs=_flag(body, "return_text_in_logprobs"),
                         token_ids_logprob=_token_ids_logprob(body, len(prompts), vocab_size),
                         logprob_start_len=_logprob_start_len(body, len(prompts)))


def _logprob_start_len(body: dict, count: int) -> list[int] | None:
    """SGLang's logprob_start_len: one int for every prompt or one per prompt; -1 (the default)
    means output logprobs only, n >= 0 prompt logprobs from position n on. Without
    return_logprob it has no effect, as in SGLang. `check_length` checks it against the prompt."""
    raw = body.get("logprob_start_len")
    if raw is None or not body.get("return_logprob"):
        return None
    per_prompt = raw if isinstance(raw, list) else [raw] * count
    _expect(len(per_prompt) == count and all(_is_int(x) and x >= -1 for x in per_prompt),
            f"logprob_start_len: must be -1 or a prompt position >= 0, or one such integer per prompt ({count})")
    return None if all(x == -1 for x in per_prompt) else per_prompt


def _token_ids_logprob(body: dict, count: int, vocab_size: int) -> list[list[int]] | None:
    """SGLang's token_ids_logprob: one list of ids for every prompt, or one list per prompt;
    it needs return_logprob (the values come back in meta_info.output_token_ids_logprobs)."""
    raw = body.get("token_ids_logprob")
    if raw is None or raw == []:
        return None
    _expect(bool(body.get("return_logprob")), "token_ids_logprob: needs return_logprob: true")
    per_prompt = raw if isinstance(raw, list) and raw and isinstance(raw[0], list) else [raw] * count
    _expect(isinstance(raw, list) and len(per_prompt) == count,
            f"token_ids_logprob: a list of token ids, or one list per prompt ({count})")
    for ids in per_prompt:
        _expect(isinstance(ids, list) and 0 < len(ids) <= MAX_TOKEN_IDS_LOGPROB
                and all(_is_int(t) and 0 <= t < vocab_size for t in ids),
                f"token_ids_logprob: 1..{MAX_TOKEN_IDS_LOGPROB} token ids in [0, {vocab_size}) per prompt")
    return per_prompt


def check_length(num_prompt: int, params: SamplingParams, context_length: int, pool_size: int,
                 logprob_start_len: int = -1) -> None:
    """Prompt + completion must fit the context (SGLang's two messages, word for word: clients
    match on them), and the prompt must fit the KV pool."""
    _expect(num_prompt > 0, "the prompt is empty after tokenization")
    _expect(num_prompt < context_length,
            f"The input ({num_prompt} tokens) is longer than the model's context length ({context_length} tokens).")
    total = num_prompt + params.max_new_tokens
    _expect(total <= context_length,
            f"Requested token count exceeds the model's maximum context length of {context_length} tokens. "
            f"You requested a total of {total} tokens: {num_prompt} tokens from the input messages and "
            f"{params.max_new_tokens} tokens for the completion. Please reduce the number of tokens in the input "
            "messages or the completion to fit within the limit.")
    _expect(logprob_start_len < num_prompt,
            f"logprob_start_len ({logprob_start_len}) must be less than the prompt length ({num_prompt} tokens)")
    _expect(num_prompt < pool_size,
            f"the prompt has {num_prompt} tokens and cannot fit in the KV cache ({pool_size} token slots)")
