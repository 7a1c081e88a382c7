"""One stop-string trimming rule for the offline Engine and the server's detokenizer.

`stage3_scheduler.stops.stop_string_end` is the rule; `trim_stop_string` (Engine) and the
detokenizer's final chunk both use it, so a streamed answer and an offline one end at
the same character for every finish reason.
"""
from __future__ import annotations

import pytest

from stage3_scheduler.sampling_params import SamplingParams
from stage3_scheduler.stops import stop_string_end, trim_stop_string

pytestmark = pytest.mark.stage3

CASES = [  # (text, finish_reason, no_stop_trim, expected returned text)
    ("Hello world. Bye", {"type": "stop", "matched": "."}, False, "Hello world"),
    ("Hello world. Bye", {"type": "stop", "matched": "."}, True, "Hello world. Bye"),
    ("a STOP b STOP", {"type": "stop", "matched": "STOP"}, False, "a "),            # first match
    ("no match here", {"type": "stop", "matched": "zzz"}, False, "no match here"),
    ("ends on a token", {"type": "stop", "matched": 151645}, False, "ends on a token"),  # ids: not text
    ("ran out", {"type": "length", "length": 2}, False, "ran out"),
    ("aborted", None, False, "aborted"),
]


@pytest.mark.parametrize("text,reason,no_trim,want", CASES)
def test_the_rule(text, reason, no_trim, want):
    params = SamplingParams.from_dict({"no_stop_trim": no_trim}, 1000)
    assert text[:stop_string_end(text, params, reason)] == want
    assert trim_stop_string(text, params, reason) == want


def cut_at_stop(tok, ids: list[int], matched) -> list[int]:
    """The ids a scheduler would have produced: it stops at the token completing the match."""
    if isinstance(matched, str):
        for n in range(1, len(ids) + 1):
            if matched in tok.decode(ids[:n]):
                return ids[:n]
    return ids


def test_detokenizer_uses_the_same_rule():
    from server.managers import detokenizer, io_struct as io
    from stage1_model.model_source import demo_model_dir
    from stage1_model.tokenizer import load_tokenizer

    assert detokenizer.stop_string_end is stop_string_end        # imported, not re-written
    tok = load_tokenizer(demo_model_dir())
    for text, reason, no_trim, _ in CASES:
        matched = (reason or {}).get("matched")
        if isinstance(matched, int):
            continue                               # a stop id is dropped before decoding (ids_for_text)
        ids = cut_at_stop(tok, tok.encode(text), matched)
        params = io.DetokParams(no_stop_trim=no_trim, stop=[matched] if matched else [])
        detok, streamed = detokenizer.Detokenizer(tok), ""
        for i, t in enumerate(ids):                # stream one token at a time
            last = i == len(ids) - 1
            streamed += detok.feed(io.TokenOut("r", [t], last, reason if last else None, 3, i + 1, 0,
                                               params=params if i == 0 else None)).text
        offline = trim_stop_string(tok.decode(ids), SamplingParams.from_dict({"no_stop_trim": no_trim}, 1000), reason)
        assert streamed == offline, (text, reason, no_trim)
        assert no_trim or matched is None or matched not in streamed
