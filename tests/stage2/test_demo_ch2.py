"""Chapter 2's demo: the req_to_token rows it prints are the slots the allocator handed out."""
import pytest

from stage2_runner.kv_cache import SlotAllocator

pytestmark = pytest.mark.stage2


@pytest.mark.parametrize("page_size", [4, 1])
def test_demo_rows_pages_and_batched_equals_single(page_size, monkeypatch, capsys):
    from stage2_runner.demo import main
    given = []
    real = SlotAllocator.alloc_extend

    def recording(self, prev_len, last_slot, n):      # every slot the allocator gives out
        slots = real(self, prev_len, last_slot, n)
        given.extend(slots.tolist())
        return slots
    monkeypatch.setattr(SlotAllocator, "alloc_extend", recording)
    res = main(["--page_size", str(page_size)])
    out = capsys.readouterr().out

    rows = list(res["req_to_token"].values())
    printed = [s for r in rows for s in r]
    assert sorted(printed) == sorted(given) and len(set(printed)) == len(printed)   # no slot twice
    owner = {}
    for i, slots in enumerate(rows):                       # a page belongs to one request
        for s in slots:
            assert owner.setdefault(s // page_size, i) == i
        pages = {s // page_size for s in slots}
        assert len(pages) == -(-len(slots) // page_size)   # as few pages as possible
    assert res["same_as_stage1"] and "batched == stage 1 one request at a time: True" in out
    assert res["free"] == res["pool_size"]
    n = len(rows)
    assert res["steps"][1:] == [n] * (len(res["steps"]) - 1)             # decode: one token each
    assert sum(len(r) for r in rows) == sum(res["steps"])                # every fed token has a slot
    assert "req_to_token[row, position] -> slot" in out and "tok/s" not in out
