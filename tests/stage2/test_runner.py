"""Stage 2: the batched paged runner against stage 1 and HF."""
import pytest
import torch

from helpers import assert_no_leak, hf_greedy, make_runner, random_prompts
from stage1_model.generate import forward_logits, generate
from stage2_runner.batch_generate import batch_generate
from stage2_runner.kv_cache import OutOfSlots, SlotAllocator

pytestmark = pytest.mark.stage2
LENGTHS = [1, 5, 17, 40, 9]


@pytest.fixture(scope="module", params=[1, 16], ids=["page1", "page16"])
def runner(request, tiny_model_dir):
    return make_runner(tiny_model_dir[0], page_size=request.param)


def test_batched_equals_stage1_and_hf(runner, tiny_model_dir):
    _, hf, cfg = tiny_model_dir
    prompts = random_prompts(cfg.vocab_size, LENGTHS, seed=21)
    outs = batch_generate(runner, prompts, 32)
    for p, o in zip(prompts, outs):
        assert o == generate(runner.model, p, 32)
    for p, o in list(zip(prompts, outs))[:2]:
        assert o == hf_greedy(hf, p, 32)
    assert_no_leak(runner)


def test_batched_logits_match_stage1(runner, tiny_model_dir):
    _, _, cfg = tiny_model_dir
    prompts = random_prompts(cfg.vocab_size, LENGTHS, seed=22)
    outs, step_logits = batch_generate(runner, prompts, 4, return_logits=True)
    for i, (p, o) in enumerate(zip(prompts, outs)):
        full = forward_logits(runner.model, p + o[:-1])       # one pass over prompt + outputs
        ref = full[len(p) - 1:]                               # rows that predicted o[0..3]
        got = torch.stack([s[i] for s in step_logits])
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_two_part_prefill_equals_one(runner, tiny_model_dir):
    _, _, cfg = tiny_model_dir
    prompts = random_prompts(cfg.vocab_size, [20, 33, 48], seed=23)
    one, l1 = batch_generate(runner, prompts, 6, return_logits=True)
    two, l2 = batch_generate(runner, prompts, 6, split_prefill_at=16, return_logits=True)
    assert one == two
    torch.testing.assert_close(torch.stack(l1), torch.stack(l2), rtol=1e-4, atol=1e-4)
    assert_no_leak(runner)


def test_page16_equals_page1(tiny_model_dir):
    _, _, cfg = tiny_model_dir
    prompts = random_prompts(cfg.vocab_size, LENGTHS, seed=24)
    a = batch_generate(make_runner(tiny_model_dir[0], page_size=1), prompts, 20)
    b = batch_generate(make_runner(tiny_model_dir[0], page_size=16), prompts, 20)
    assert a == b


@pytest.mark.parametrize("page", [1, 4, 16])
def test_alloc_free_cycles_restore_pool(page):
    alloc = SlotAllocator(256, page)
    g = torch.Generator().manual_seed(0)
    before = sorted(alloc._free_pages)
    for _ in range(50):
        held = []
        for _ in range(int(torch.randint(1, 6, (1,), generator=g))):
            n, last, lens = int(torch.randint(1, 40, (1,), generator=g)), -1, 0
            try:
                s = alloc.alloc_extend(lens, last, n)
            except OutOfSlots:
                continue
            more = alloc.alloc_extend(n, int(s[-1]), 3)        # grow the same sequence
            seq = torch.cat([s, more])
            assert len(set(seq.tolist())) == len(seq)           # no slot handed out twice
            if page > 1:                                        # positions map into pages in order
                assert all(int(x) // page == int(seq[i - i % page]) // page for i, x in enumerate(seq))
            held.append(seq)
        for seq in held:
            alloc.free(seq)
        assert sorted(alloc._free_pages) == before


def test_out_of_slots_is_typed():
    alloc = SlotAllocator(32, 16)
    alloc.alloc(20)
    with pytest.raises(OutOfSlots):
        alloc.alloc(1)


def test_make_batch_views_are_16_byte_aligned():
    """Triton compiles one kernel variant per pointer alignment: every field must start
    16-byte aligned whatever T and B are, or a new prompt length could stall serving."""
    from stage2_runner.forward_batch import make_batch
    for B in range(1, 7):
        for extra in range(3):
            toks = [[5] * (1 + (i + extra) % 3) for i in range(B)]
            T = sum(map(len, toks))
            fb = make_batch(list(range(B)), list(range(B)), toks, torch.arange(T), "cpu")
            for name in ("input_ids", "positions", "out_cache_loc", "req_pool_indices", "seq_lens",
                         "prefix_lens", "extend_lens", "extend_start_loc"):
                assert getattr(fb, name).data_ptr() % 16 == 0, (B, T, name)
            assert fb.req_pool_indices.tolist() == list(range(B))
            assert fb.extend_lens.tolist() == [len(t) for t in toks]
            assert fb.seq_lens.tolist() == [i + len(t) for i, t in enumerate(toks)]
            assert fb.positions.tolist() == [p for i, t in enumerate(toks) for p in range(i, i + len(t))]
            assert fb.out_cache_loc.tolist() == list(range(T))
