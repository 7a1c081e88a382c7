"""Sampler: greedy limits, distribution, penalties, seeds, logprobs."""
import math

import pytest
import torch

from stage2_runner.sampler import SamplingInfo, apply_grammar_mask, apply_penalties, sample

pytestmark = pytest.mark.stage2
V = 50


def logits_batch(b=4, seed=0):
    return torch.randn(b, V, generator=torch.Generator().manual_seed(seed)) * 3


def info(b, **p):
    return SamplingInfo.from_params([p] * b, V, "cpu")


def test_greedy_and_its_limits():
    x = logits_batch()
    greedy = x.argmax(-1)
    assert torch.equal(sample(x, info(4, temperature=0.0)).tokens, greedy)
    for _ in range(20):
        assert torch.equal(sample(x, info(4, temperature=1.0, top_k=1)).tokens, greedy)
        assert torch.equal(sample(x, info(4, temperature=1.0, top_p=1e-6)).tokens, greedy)
        assert torch.equal(sample(x, info(4, temperature=1.0, min_p=1.0)).tokens, greedy)


def test_temperature_sampling_matches_softmax():
    """N draws per token; each empirical frequency is within 5 binomial sigmas
    (plus a 2/N floor for rare tokens) of softmax(x / T). False-failure odds ~1e-5."""
    x, T, N = logits_batch(1, seed=1)[0] / 3, 0.7, 20000
    p = torch.softmax(x / T, -1)
    draws = sample(x.expand(N, V).contiguous(), info(N, temperature=T)).tokens
    freq = torch.bincount(draws, minlength=V).float() / N
    bound = 5 * torch.sqrt(p * (1 - p) / N) + 2 / N
    assert torch.all((freq - p).abs() <= bound), (freq - p).abs().max()


def test_top_k_and_top_p_restrict_support():
    x = logits_batch(1, seed=2)[0]
    order = x.argsort(descending=True)
    draws = sample(x.expand(2000, V).contiguous(), info(2000, temperature=5.0, top_k=3)).tokens
    assert set(draws.tolist()) <= set(order[:3].tolist()) and len(set(draws.tolist())) == 3
    p = torch.softmax(x / 5.0, -1)[order]
    nucleus = int((p.cumsum(0) < 0.5).sum()) + 1        # smallest prefix with mass >= 0.5
    draws = sample(x.expand(2000, V).contiguous(), info(2000, temperature=5.0, top_p=0.5)).tokens
    assert set(draws.tolist()) == set(order[:nucleus].tolist())


def test_penalties_change_logits_exactly():
    x = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0] + [0.0] * (V - 5)])
    hist = [([1, 2], [3, 3, 0])]        # prompt tokens 1,2; generated 3 twice and 0 once
    inf = SamplingInfo.from_params([{"frequency_penalty": 0.5, "presence_penalty": 0.25,
                                     "repetition_penalty": 2.0}], V, "cpu", hist)
    got = apply_penalties(x, inf)[0, :5]
    # token 0: 2 - 0.5*1 - 0.25 = 1.25 -> /2 ; 1: -1 (prompt) -> *2 ; 2: 0.5 -> /2 ;
    # 3: 3 - 0.5*2 - 0.25 = 1.75 -> /2 ; 4: unseen, unchanged
    assert torch.allclose(got, torch.tensor([0.625, -2.0, 0.25, 0.875, -2.0]))


def test_same_seed_same_tokens_any_batch():
    x = logits_batch(3, seed=3)
    a = sample(x, SamplingInfo.from_params([{"temperature": 1.0, "seed": 42}] * 3, V, "cpu")).tokens
    b = sample(x, SamplingInfo.from_params([{"temperature": 1.0, "seed": 42}] * 3, V, "cpu")).tokens
    assert torch.equal(a, b)
    # The seeded row draws the same in another batch composition.
    mixed = SamplingInfo.from_params([{"temperature": 1.0}, {"temperature": 1.0, "seed": 42}], V, "cpu")
    c = sample(torch.stack([x[0], x[1]]), mixed).tokens
    assert int(c[1]) == int(a[1])
    draws = {int(sample(x[:1], SamplingInfo.from_params([{"temperature": 1.0, "seed": s}], V, "cpu")).tokens)
             for s in range(40)}
    assert len(draws) > 1                       # different seeds do differ


def test_logprobs_and_top_alternatives():
    x = logits_batch(2, seed=4)
    out = sample(x, SamplingInfo.from_params([{"temperature": 0.0, "top_logprobs_num": 3}] * 2, V, "cpu"))
    ref = torch.log_softmax(x, -1)
    assert torch.allclose(out.logprobs, ref.max(-1).values)
    assert torch.equal(out.top_ids[:, 0], x.argmax(-1))
    assert math.isclose(float(out.top_logprobs[0].exp().sum()), float(ref[0].topk(3).values.exp().sum()), rel_tol=1e-6)


def test_logit_bias_moves_only_its_rows():
    x = logits_batch()
    greedy = x.argmax(-1)
    forced, banned = int((greedy[0] + 1) % V), int(greedy[2])
    params = [{"temperature": 0.0, "logit_bias": {forced: 100.0}}, {"temperature": 0.0},
              {"temperature": 0.0, "logit_bias": {banned: -100.0}}, {"temperature": 1.0, "logit_bias": {forced: 100.0}}]
    out = sample(x.clone(), SamplingInfo.from_params(params, V, "cpu"))
    assert out.tokens[0] == forced and out.tokens[1] == greedy[1] and out.tokens[2] != banned
    assert out.tokens[3] == forced                      # +100 dominates a temperature-1 draw too
    assert SamplingInfo.from_params([{"temperature": 0.0}] * 2, V, "cpu").logit_bias is None   # nobody pays


def test_grammar_mask_forbids_only_in_its_rows():
    """Row 1 may sample only tokens 3 and 40 (bits of words 0 and 1); rows 0, 2, 3 are untouched."""
    logits = logits_batch()
    words = torch.zeros(1, (V + 31) // 32, dtype=torch.int32)
    words[0, 0], words[0, 1] = 1 << 3, 1 << (40 - 32)
    masked = apply_grammar_mask(logits, torch.tensor([1]), words)
    allowed = torch.isfinite(masked[1]).nonzero().flatten().tolist()
    assert allowed == [3, 40] and torch.equal(masked[[0, 2, 3]], logits[[0, 2, 3]])
    assert torch.equal(masked[1, [3, 40]], logits[1, [3, 40]])
    inf = info(4, temperature=1.0)
    inf.grammar_mask = (torch.tensor([1]), words)
    for _ in range(20):                                # sampled, never a forbidden token
        assert sample(logits, inf).tokens[1].item() in (3, 40)
    words[0, 0] = -1                                   # bit 31 (the sign bit) counts as a token too
    assert torch.isfinite(apply_grammar_mask(logits, torch.tensor([1]), words)[1, :32]).all()
