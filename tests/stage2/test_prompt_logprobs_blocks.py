"""block_logprobs: row blocks give exactly what one full-vocab log-softmax over all rows gives."""
import pytest
import torch

from stage2_runner.prompt_logprobs import block_logprobs, rows_per_block

pytestmark = pytest.mark.stage2
N, H, V = 11, 8, 50


@pytest.fixture(scope="module")
def setup():
    g = torch.Generator().manual_seed(0)
    head = torch.randn(V, H, generator=g) * 3
    hidden = torch.randn(N, H, generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    calls = []

    def compute_logits(h):          # the model's lm_head: [n, H] -> [n, V] float32
        calls.append(h.shape[0])
        return h @ head.T
    return hidden, targets, compute_logits, calls, torch.log_softmax(hidden @ head.T, -1)


@pytest.mark.parametrize("block_rows", [1, 3, 4, N, 100])
def test_blocks_equal_one_full_log_softmax(setup, block_rows):
    hidden, targets, fn, calls, ref = setup
    ids = torch.tensor([[3, 7, -1]] * N)                         # -1 pads, as the scheduler sends them
    calls.clear()
    out = block_logprobs(fn, hidden, targets, V, top_k=4, token_ids=ids, block_rows=block_rows)
    assert max(calls) <= block_rows and sum(calls) == N          # never more rows than a block at once
    assert torch.allclose(out.logprobs, ref.gather(-1, targets[:, None])[:, 0], atol=1e-6)
    top_v, top_i = ref.topk(4, dim=-1)
    assert torch.equal(out.top_ids, top_i) and torch.allclose(out.top_logprobs, top_v, atol=1e-6)
    assert torch.allclose(out.ids_logprobs[:, :2], ref[:, [3, 7]], atol=1e-6)


def test_without_extras_only_the_target_logprobs(setup):
    hidden, targets, fn, _, ref = setup
    out = block_logprobs(fn, hidden, targets, V)
    assert out.top_ids is None and out.ids_logprobs is None and out.logprobs.shape == (N,)


def test_block_size_bounds_memory():
    # Qwen's vocabulary: a block's float32 logits + log-softmax stay within the budget
    rows = rows_per_block(151936)
    assert 100 <= rows and rows * 151936 * 8 <= 256 << 20
    assert rows_per_block(10**9) == 1
