"""Sampling parameters, SGLang's names and defaults, validated field by field.

Contract: `SamplingParams.from_dict(d)` returns validated params or raises
`InvalidParams("<field>: <what is wrong>")`; the server turns that into HTTP 400.
Range checks are written `not (lo <= x <= hi)` so that NaN fails them too (a NaN
temperature once crashed a scheduler inside torch.multinomial).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields

MAX_STOP_STRINGS, MAX_STOP_LEN, MAX_N, MAX_LOGIT_BIAS = 16, 256, 16, 1024
GRAMMAR_FIELDS = ("regex", "json_schema", "ebnf")      # structured output: at most one per request


class InvalidParams(ValueError):
    pass


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1                      # -1: disabled
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1
    seed: int | None = None
    # token id -> added to its logit before sampling (OpenAI's logit_bias; JSON keys are strings)
    logit_bias: dict[int, float] = field(default_factory=dict)
    # Structured output (grammar.py compiles them; a JSON schema object is kept as its text)
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None
    # Regular expressions searched in the tail of the output (stops.py; `regex` package)
    stop_regex: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict | None, vocab_size: int | None = None) -> "SamplingParams":
        d = dict(d or {})
        for name in ("stop", "stop_regex"):      # a single string means a list of one
            if isinstance(d.get(name), str):
                d[name] = [d[name]]
        if isinstance(d.get("json_schema"), dict):     # SGLang sends text; an object is fine too
            d["json_schema"] = json.dumps(d["json_schema"])
        d = {k: v for k, v in d.items() if v is not None}     # clients send explicit nulls for defaults
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise InvalidParams(f"{unknown[0]}: unknown sampling parameter")
        for name, value in d.items():
            d[name] = _coerce(name, value, known[name].type)
        p = cls(**d)
        p.validate(vocab_size)
        return p

    def validate(self, vocab_size: int | None = None) -> None:
        checks = [
            ("max_new_tokens", 0 <= self.max_new_tokens <= 1 << 20, "must be in [0, 1048576]"),
            ("min_new_tokens", 0 <= self.min_new_tokens <= self.max_new_tokens, "must be in [0, max_new_tokens]"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "must be in [0, 100]"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k == -1 or 1 <= self.top_k <= 1 << 20, "must be -1 (disabled) or >= 1"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 2.0, "must be in (0, 2]"),
            ("n", 1 <= self.n <= MAX_N, f"must be in [1, {MAX_N}]"),
            ("stop", len(self.stop) <= MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} stop strings"),
            ("stop", all(0 < len(s) <= MAX_STOP_LEN for s in self.stop), f"stop strings must be 1..{MAX_STOP_LEN} chars"),
            ("seed", self.seed is None or 0 <= self.seed < 2**63, "must be a non-negative integer"),
            ("logit_bias", len(self.logit_bias) <= MAX_LOGIT_BIAS, f"at most {MAX_LOGIT_BIAS} entries"),
            ("logit_bias", all(-100.0 <= b <= 100.0 for b in self.logit_bias.values()),
             "biases must be in [-100, 100]"),
            ("stop_regex", len(self.stop_regex) <= MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} patterns"),
            ("stop_regex", all(0 < len(s) <= MAX_STOP_LEN for s in self.stop_regex),
             f"patterns must be 1..{MAX_STOP_LEN} chars"),
        ]
        grammars = [name for name in GRAMMAR_FIELDS if getattr(self, name) is not None]
        checks.append((grammars[-1] if grammars else "regex", len(grammars) <= 1,
                       f"at most one of {', '.join(GRAMMAR_FIELDS)} per request"))
        if vocab_size is not None:
            checks.append(("stop_token_ids", all(0 <= t < vocab_size for t in self.stop_token_ids),
                           f"ids must be in [0, {vocab_size})"))
            checks.append(("logit_bias", all(0 <= t < vocab_size for t in self.logit_bias),
                           f"token ids must be in [0, {vocab_size})"))
        for name, ok, msg in checks:
            if not ok:
                got = repr(getattr(self, name))
                raise InvalidParams(f"{name}: {msg} (got {got if len(got) <= 80 else got[:77] + '...'})")
        if self.stop_regex:
            from stage3_scheduler.stops import compile_stop_regex     # stops.py imports this module
            compile_stop_regex(self.stop_regex)

    def to_dict(self) -> dict:
        return asdict(self)


def _coerce(name: str, value, typ: str):
    """Strict JSON typing: ints may stand for floats, bools are not numbers, NaN is caught later."""
    if typ in ("int", "int | None"):
        if value is None and typ == "int | None":
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidParams(f"{name}: must be an integer (got {value!r})")
        return value
    if typ == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidParams(f"{name}: must be a number (got {value!r})")
        try:
            number = float(value)
        except OverflowError:                # an int too big for a float
            number = math.inf
        if not math.isfinite(number):        # NaN fails here too
            raise InvalidParams(f"{name}: must be a finite number (got {value!r})")
        return number
    if typ == "str | None":
        if not isinstance(value, str) or not value:
            raise InvalidParams(f"{name}: must be a non-empty string")
        return value
    if typ == "bool":
        if not isinstance(value, bool):
            raise InvalidParams(f"{name}: must be true or false (got {value!r})")
        return value
    if typ == "list[str]":
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise InvalidParams(f"{name}: must be a string or a list of strings")
        return value
    if typ == "list[int]":
        if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            raise InvalidParams(f"{name}: must be a list of integers")
        return value
    if typ == "dict[int, float]":
        return _bias_dict(name, value)
    return value


def _bias_dict(name: str, value) -> dict[int, float]:
    """{"token id": bias} (JSON object keys are strings; ints are fine in Python) -> {int: float}."""
    if not isinstance(value, dict):
        raise InvalidParams(f"{name}: must be an object mapping token ids to biases")
    out = {}
    for k, v in value.items():
        key = k if isinstance(k, int) and not isinstance(k, bool) else None
        if isinstance(k, str) and k.isdigit() and len(k) <= 12:
            key = int(k)
        if key is None:
            raise InvalidParams(f"{name}: keys must be token ids (got {k!r})")
        out[key] = _coerce(f"{name}[{k}]", v, "float")
    return out
