"""The one trick every streaming parser needs: do not emit what a later delta may change.

A tag such as `</think>` can arrive split over several deltas ("</thi" + "nk>"), so the tail
of the text that could still grow into a tag is held back until the next delta (or the end)
decides. Trailing whitespace can be held back too, for parsers that strip it at a tag.
"""
from __future__ import annotations


def partial_tag_len(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `tags`."""
    best = 0
    for tag in tags:
        for k in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:k]):
                best = k
                break
    return best


def split_safe(text: str, tags: tuple[str, ...], hold_space: bool = False) -> tuple[str, str]:
    """(emit now, hold back): the held part may begin a tag, or is trailing whitespace."""
    cut = len(text) - partial_tag_len(text, tags)
    if hold_space:
        cut = len(text[:cut].rstrip())
    return text[:cut], text[cut:]
