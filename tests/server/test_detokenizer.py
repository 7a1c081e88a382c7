"""The incremental detokenizer, without processes: token ids in one at a time, text out.

The demo tokenizer is the real Qwen byte-level BPE, so CJK characters and emoji really are
split across tokens (e.g. "🎉" is 3 tokens). Streamed text must never contain U+FFFD, never
repeat a character, and must add up to the full decode.
"""
from __future__ import annotations

import pytest

from server.managers import io_struct as io
from server.managers.detokenizer import Detokenizer

pytestmark = pytest.mark.server

# Each of these has characters split across tokens (rare CJK, kanji, emoji sequences).
TEXTS = [
    "你好，世界！龘靐齉爩 鱻 𠀀𪚥",
    "こんにちは。蟹缶を食べた。鬱蒼とした森",
    "emoji 🎉👍🏽 and a family 👨‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
    "mixed: naïve café — 日本語 + 中文 + 한국어 ✓ 🦀",
]


def feed_all(detok, ids, rid="r", params=None, finish_reason=None, step=1):
    chunks = []
    for i in range(0, len(ids), step):
        last = i + step >= len(ids)
        out = io.TokenOut(rid, ids[i:i + step], last, finish_reason if last else None, 3, i + step, 0,
                          params=params if i == 0 else None)
        chunks.append(detok.feed(out).text)
    return chunks


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("step", [1, 2])
def test_split_multibyte_characters_stream_cleanly(tokenizer, text, step):
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)      # really split somewhere
    detok = Detokenizer(tokenizer)
    chunks = feed_all(detok, ids, step=step)
    assert all("\ufffd" not in c for c in chunks), chunks
    assert "".join(chunks) == tokenizer.decode(ids) == text
    assert detok.states == {}                       # finished requests leave no state behind


def test_interleaved_requests_keep_separate_state(tokenizer):
    a, b = tokenizer.encode(TEXTS[0]), tokenizer.encode(TEXTS[2])
    detok, got = Detokenizer(tokenizer), {"a": "", "b": ""}
    for i in range(max(len(a), len(b))):
        for rid, ids in (("a", a), ("b", b)):
            if i < len(ids):
                got[rid] += detok.feed(io.TokenOut(rid, [ids[i]], i == len(ids) - 1, None, 1, i + 1, 0)).text
    assert got == {"a": TEXTS[0], "b": TEXTS[2]}


def test_special_tokens_skipped_or_kept(tokenizer):
    ids = tokenizer.encode("Hello world") + [151645]         # ... <|im_end|>
    skip = "".join(feed_all(Detokenizer(tokenizer), ids, params=io.DetokParams(skip_special_tokens=True)))
    keep = "".join(feed_all(Detokenizer(tokenizer), ids, params=io.DetokParams(skip_special_tokens=False)))
    assert skip == "Hello world" and keep == "Hello world<|im_end|>"


def test_stop_string_is_held_back_then_trimmed(tokenizer):
    ids = tokenizer.encode("one two three four")
    params = io.DetokParams(stop=[" three"])
    chunks = feed_all(Detokenizer(tokenizer), ids[:3], params=params,
                      finish_reason={"type": "stop", "matched": " three"})
    assert "".join(chunks) == "one two"
    assert all("thr" not in c for c in chunks)


def test_partial_stop_prefix_is_released_when_it_does_not_match(tokenizer):
    ids = tokenizer.encode("a b c d e")
    chunks = feed_all(Detokenizer(tokenizer), ids, params=io.DetokParams(stop=[" c x"]),
                      finish_reason={"type": "length", "length": len(ids)})
    assert "".join(chunks) == "a b c d e"
    assert " c" not in chunks[2]                    # " c" waited: it could have started " c x"


def test_no_stop_trim_keeps_the_stop_string(tokenizer):
    ids = tokenizer.encode("one two three")
    chunks = feed_all(Detokenizer(tokenizer), ids, params=io.DetokParams(stop=[" three"], no_stop_trim=True),
                      finish_reason={"type": "stop", "matched": " three"})
    assert "".join(chunks) == "one two three"


def test_incomplete_character_at_the_end_is_flushed(tokenizer):
    ids = tokenizer.encode("𪚥")
    assert len(ids) > 1
    chunks = feed_all(Detokenizer(tokenizer), ids[:-1])      # finished mid-character (length limit)
    assert chunks[:-1] == [""] * (len(chunks) - 1)
    assert "".join(chunks) == tokenizer.decode(ids[:-1])     # what a full decode gives, as SGLang
