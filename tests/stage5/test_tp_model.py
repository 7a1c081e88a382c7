"""Tensor parallelism, model level (CPU, gloo): TP=N sharded model == the TP=1 model.

Each case loads one model (a saved tiny HF checkpoint, or the demo model with real or
dummy weights) with stage 1's modules built by `TPLayerFactory` on N spawned ranks, and
compares every rank's fp32 logits and greedy tokens with the whole model in this process.
TP=4 on configs with 2 KV heads checks the replicated KV heads. All TP=2 cases share one
spawn and all TP=4 cases another, to keep the test quick.
"""
import pytest
import torch

from helpers import TINY_CONFIGS, make_hf, random_prompts
from stage1_model.config import load_config
from stage1_model.generate import forward_logits, generate
from stage1_model.model_source import resolve_model_path
from stage1_model.weights import build_model, load_model
from stage5_tp_cudagraph.fused_model import fill_weights, load_fused_model
from stage5_tp_cudagraph.tp_layers import TPLayerFactory, shard_of
from tp_harness import run_ranks

pytestmark = pytest.mark.stage5
NEW_TOKENS = 8


def run_cases(tp, cases):
    """On each rank: (logits, greedy tokens, layer-0 k_proj shard) per (model_dir, load_format, prompt)."""
    out = []
    for model_dir, load_format, prompt in cases:
        cfg = load_config(model_dir)
        model = build_model(cfg, torch.float32, "cpu", TPLayerFactory(cfg, tp))
        fill_weights(model, model_dir, load_format, cfg, torch.float32, "cpu")
        k_proj = model.model.layers[0].self_attn.k_proj.weight.detach().clone()
        out.append((forward_logits(model, prompt), generate(model, prompt, NEW_TOKENS), k_proj))
    return out


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """(name, model_dir, load_format, prompt) of every model the TP runs compare."""
    demo = str(resolve_model_path("demo"))
    found = [("demo", demo, "auto", [9707, 1879, 11, 358, 1079, 264]),
             ("demo-dummy", demo, "dummy", [151644, 872, 198, 9707])]
    for name in ("gqa4-untied", "gqa2-tied"):
        cfg = TINY_CONFIGS[name]
        path = tmp_path_factory.mktemp(name)
        make_hf(cfg, seed=3).save_pretrained(path)
        found.append((name, str(path), "auto", random_prompts(cfg.vocab_size, [7], seed=1)[0]))
    return found


def reference(model_dir, load_format, prompt):
    model = load_model(model_dir, torch.float32, "cpu", load_format)
    return model, forward_logits(model, prompt), generate(model, prompt, NEW_TOKENS)


def check(size: int, cases):
    results = run_ranks(size, run_cases, [c[1:] for c in cases])
    for i, (name, model_dir, load_format, prompt) in enumerate(cases):
        model, logits, tokens = reference(model_dir, load_format, prompt)
        k_full = model.model.layers[0].self_attn.k_proj.weight
        for rank in range(size):
            tp_logits, tp_tokens, k_shard = results[rank][i]
            assert tp_tokens == tokens, (name, rank)
            torch.testing.assert_close(tp_logits, logits, rtol=1e-4, atol=1e-4, msg=f"{name} rank {rank}")
            heads, D = model.config.num_key_value_heads, model.config.head_dim
            first = rank * heads // size                     # first KV head of this rank
            rows = D if heads < size else heads // size * D
            assert torch.equal(k_shard, shard_of(k_full, 0, first * D, rows, heads * D)), (name, rank)


def test_tp2_equals_tp1(cases):
    check(2, cases)


def test_tp4_replicates_kv_heads(cases):
    """2 KV heads on 4 ranks: ranks 0-1 hold KV head 0, ranks 2-3 KV head 1."""
    check(4, [c for c in cases if c[0] in ("gqa4-untied", "gqa2-tied")])


def fused_run(tp, model_dir, prompt):
    cfg = load_config(model_dir)
    model = load_fused_model(model_dir, torch.float32, "cpu", "auto", TPLayerFactory(cfg, tp), cfg)
    return forward_logits(model, prompt), generate(model, prompt, NEW_TOKENS)


def test_fused_model_tp2_equals_tp1(cases):
    """The fused model (Triton kernels, under the interpreter on CPU) at TP=2: o_proj and
    down_proj leave partial sums and the norms after them all-reduce (gloo here)."""
    name, model_dir, _, prompt = next(c for c in cases if c[0] == "gqa4-untied")
    _, logits, tokens = reference(model_dir, "auto", prompt)
    for rank, (tp_logits, tp_tokens) in enumerate(run_ranks(2, fused_run, model_dir, prompt)):
        assert tp_tokens == tokens, rank
        torch.testing.assert_close(tp_logits, logits, rtol=1e-4, atol=1e-4, msg=f"rank {rank}")


def test_factory_refuses_what_cannot_split():
    class FakeTP:
        rank, size = 0, 3
    with pytest.raises(ValueError, match="tp=3 must divide"):
        TPLayerFactory(TINY_CONFIGS["gqa4-untied"], FakeTP())


def test_a_rank_that_never_joins_is_a_clear_error():
    """Rank 0 of 2 alone: after the timeout, a TPJoinError naming the address, not a hang."""
    import subprocess
    import sys
    code = ("import torch; from stage5_tp_cudagraph.parallel import free_port, init_tp\n"
            "addr = f'127.0.0.1:{free_port()}'\n"
            "try:\n    init_tp(0, 2, addr, torch.device('cpu'), timeout_s=2)\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("TPJoinError TP rank 0/2: the 2 ranks did not all join at tcp://127.0.0.1:"), out
    assert "within 2 s" in out.stdout


@pytest.mark.parametrize("dim,start,size", [(0, 0, 3), (0, 5, 4), (1, 2, 6), (0, 6, 4)])   # last: padded
def test_shard_of_reads_only_its_part_of_the_file(tmp_path, dim, start, size):
    """A safetensors slice gives the same shard as the loaded tensor (zero padding past the
    end included), and stage 1's loader hands TP parameters the slice, not the tensor."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from stage5_tp_cudagraph.tp_layers import sharded_weight_loader
    full = torch.randn(8, 10, dtype=torch.bfloat16)
    save_file({"w": full}, str(tmp_path / "w.safetensors"))
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        lazy = f.get_slice("w")
        got = shard_of(lazy, dim, start, size, full.shape[dim])
    assert torch.equal(got, shard_of(full, dim, start, size, full.shape[dim]))
    assert got.shape[dim] == size and getattr(sharded_weight_loader, "reads_slices", False)
