"""Stage 5: the fused model (merged GEMMs + fused kernels) == stage 1's model == HF.

Both models load the same `save_pretrained` checkpoint, so this also tests the packed
loading of q/k/v and gate/up from their separate tensors. CPU runs the kernels under
Triton's interpreter (fp32); GPU tests (marker gpu) add stage 2's ModelRunner with the
triton backend, bf16, and a Qwen3-0.6B-shaped model.
Run: python -m pytest -m gpu tests/stage5/test_fused_model.py
"""
import shutil

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()     # without it, tests/conftest.py runs Triton's interpreter
from safetensors.torch import load_file, save_file

from helpers import TINY_CONFIGS, hf_greedy, make_hf, make_runner, random_prompts
from stage1_model.config import ModelConfig
from stage1_model.generate import forward_logits, generate
from stage1_model.weights import WeightError, build_model, init_dummy, load_model
from stage5_tp_cudagraph.fused_model import CheckpointView, build_fused_model, load_fused_model

pytestmark = pytest.mark.stage5
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
DEV = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(params=list(TINY_CONFIGS), scope="module")
def trio(request, tmp_path_factory):
    """(cfg, HF model, stage-1 model, fused model), the last two loaded from one checkpoint."""
    cfg = TINY_CONFIGS[request.param]
    hf = make_hf(cfg, seed=5)
    path = tmp_path_factory.mktemp(f"ckpt-{request.param}")
    hf.save_pretrained(path)
    return cfg, hf, load_model(path, device=DEV), load_fused_model(path, device=DEV)


@torch.inference_mode()
def test_merged_weights_are_the_checkpoint_tensors(trio):
    cfg, _, ref, fused = trio
    for a, b in zip(ref.model.layers, fused.model.layers):
        qkv = torch.cat([a.self_attn.q_proj.weight, a.self_attn.k_proj.weight, a.self_attn.v_proj.weight])
        assert torch.equal(b.self_attn.qkv_proj.weight, qkv)
        gate_up = torch.cat([a.mlp.gate_proj.weight, a.mlp.up_proj.weight])
        assert torch.equal(b.mlp.gate_up_proj.weight, gate_up)
    ref_params = dict(ref.named_parameters())
    for name, p in fused.named_parameters():          # everything else: same name, same tensor
        if "qkv_proj" not in name and "gate_up_proj" not in name:
            assert torch.equal(p, ref_params[name]), name
    assert (fused.lm_head.weight is fused.model.embed_tokens.weight) == cfg.tie_word_embeddings


@torch.inference_mode()
def test_projections_go_through_gemv_linear(trio, monkeypatch):
    """Every projection of every layer calls gemv.linear (which picks the batch-1 GEMV on a
    GPU): 4 per layer, with the module's own (sharded) weight, and nothing else does."""
    from stage5_tp_cudagraph import fused_model
    cfg, _, _, fused = trio
    seen = []
    real = fused_model.linear
    monkeypatch.setattr(fused_model, "linear", lambda x, w: seen.append(w) or real(x, w))
    forward_logits(fused, [1, 2, 3])
    projections = [m.weight for layer in fused.model.layers
                   for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)]
    assert len(seen) == 4 * cfg.num_hidden_layers and all(a is b for a, b in zip(seen, projections))


def test_logits_match_stage1_and_hf(trio):
    cfg, hf, ref, fused = trio
    for prompt in random_prompts(cfg.vocab_size, [1, 6, 19], seed=1):   # odd lengths
        got = forward_logits(fused, prompt)
        torch.testing.assert_close(got, forward_logits(ref, prompt), atol=1e-4, rtol=1e-4)
        hf_logits = hf.to(DEV)(torch.tensor([prompt], device=DEV)).logits[0]
        torch.testing.assert_close(got, hf_logits, atol=1e-4, rtol=1e-4)


def test_greedy_equals_stage1_and_hf(trio):
    cfg, hf, ref, fused = trio
    prompt = random_prompts(cfg.vocab_size, [9], seed=2)[0]
    out = generate(fused, prompt, 8)                  # prefill + 7 single-token decode steps
    assert out == generate(ref, prompt, 8)
    assert out == hf_greedy(hf.to("cpu"), prompt, 8)


def test_stage2_runner_runs_the_fused_model(tiny_model_dir):
    """The seam: ModelRunner's paged backend takes the fused model's q/k/v views unchanged."""
    from stage2_runner.batch_generate import batch_generate
    path, _, cfg = tiny_model_dir
    prompts = random_prompts(cfg.vocab_size, [4, 5, 11], seed=31)   # > split_prefill_at
    runs = []
    for fused in (False, True):
        runner = make_runner(path, device=DEV, dtype="float32", page_size=4)
        if fused:
            runner.model = load_fused_model(path, runner.dtype, runner.device)
        runs.append(batch_generate(runner, prompts, 4, split_prefill_at=3, return_logits=True))
    assert runs[1][0] == runs[0][0]
    torch.testing.assert_close(torch.stack(runs[1][1]), torch.stack(runs[0][1]), atol=1e-4, rtol=1e-4)


def broken_checkpoint(src, dst, edit):
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_packed_loading_names_the_bad_tensor(tiny_model_dir, tmp_path):
    src = tiny_model_dir[0]
    name = "model.layers.1.self_attn.k_proj.weight"
    missing = broken_checkpoint(src, tmp_path / "missing", lambda t: t.pop(name))
    with pytest.raises(WeightError, match=name):
        load_fused_model(missing)
    short = "model.layers.0.mlp.up_proj.weight"
    bad = broken_checkpoint(src, tmp_path / "bad", lambda t: t.update({short: t[short][:-1]}))
    with pytest.raises(WeightError, match=f"{short}.*shape mismatch"):
        load_fused_model(bad)


def test_dummy_format_fills_merged_weights(tiny_model_dir):
    model = load_fused_model(tiny_model_dir[0], load_format="dummy")
    w = model.model.layers[0].self_attn.qkv_proj.weight
    norm = model.model.norm.weight
    assert 0.01 < w.std() < 0.03 and torch.equal(norm, torch.ones_like(norm))   # std 0.02, norms 1


def test_dummy_weights_equal_stage1_dummy_weights(tiny_model_dir):
    """Same seed, same weights as stage 1's dummy init: benchmarks compare like with like."""
    fused = load_fused_model(tiny_model_dir[0], load_format="dummy")
    ref = load_model(tiny_model_dir[0], load_format="dummy")
    attn, mlp = fused.model.layers[1].self_attn, fused.model.layers[1].mlp
    r_attn, r_mlp = ref.model.layers[1].self_attn, ref.model.layers[1].mlp
    assert torch.equal(attn.qkv_proj.weight, torch.cat([r_attn.q_proj.weight, r_attn.k_proj.weight,
                                                        r_attn.v_proj.weight]))
    assert torch.equal(mlp.gate_up_proj.weight, torch.cat([r_mlp.gate_proj.weight, r_mlp.up_proj.weight]))
    assert torch.equal(fused.lm_head.weight, ref.lm_head.weight)


# ------------------------------------------------------------------ GPU

def copy_weights(ref, fused):
    """Stage-1 parameters -> fused model, through the same per-tensor loaders as a checkpoint."""
    targets = dict(CheckpointView(fused).named_parameters())
    for name, p in ref.named_parameters():
        targets[name].weight_loader(targets[name], p.data)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("page", [1, 16])
def test_runner_triton_fused_equals_stock_fp32(tiny_model_dir, page):
    from stage2_runner.batch_generate import batch_generate
    path, _, cfg = tiny_model_dir
    prompts = random_prompts(cfg.vocab_size, [17, 21, 30, 40, 90], seed=31)   # all longer than the split
    runs = []
    for fused in (False, True):
        runner = make_runner(path, attention_backend="triton", device="cuda", dtype="float32", page_size=page)
        if fused:
            runner.model = load_fused_model(path, runner.dtype, runner.device)
        runs.append(batch_generate(runner, prompts, 24, split_prefill_at=16, return_logits=True))
    assert runs[1][0] == runs[0][0]
    torch.testing.assert_close(torch.stack(runs[1][1]), torch.stack(runs[0][1]), atol=1e-3, rtol=1e-3)


QWEN3_06B_LIKE = ModelConfig(vocab_size=8192, hidden_size=1024, intermediate_size=3072, num_hidden_layers=4,
                             num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                             tie_word_embeddings=True, max_position_embeddings=40960)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@torch.inference_mode()
def test_real_shapes_fused_close_to_stage1(dtype):
    """Qwen3-0.6B layer shapes (4 layers, smaller vocab), dummy weights shared by both."""
    ref = build_model(QWEN3_06B_LIKE, dtype, "cuda")
    init_dummy(ref)
    fused = build_fused_model(QWEN3_06B_LIKE, dtype, "cuda")
    copy_weights(ref, fused)
    prompt = random_prompts(QWEN3_06B_LIKE.vocab_size, [257], seed=4)[0]
    a, b = forward_logits(ref, prompt), forward_logits(fused, prompt)       # [257, vocab]
    # Random weights leave near-ties at the top (median top-2 gap ~0.15); argmax must agree
    # wherever the gap exceeds the dtype's drift (bf16 stage 1 vs fp32 stage 1: <= ~0.045).
    margin = 1e-3 if dtype == torch.float32 else 0.06
    top2 = a.topk(2, dim=-1).values
    decisive = (top2[:, 0] - top2[:, 1]) > margin
    assert decisive.float().mean() > 0.3, "too few decisive rows to test argmax"
    assert torch.equal(a.argmax(-1)[decisive], b.argmax(-1)[decisive])
    if dtype == torch.float32:
        torch.testing.assert_close(b, a, atol=1e-3, rtol=1e-3)
    else:   # bf16: the kernels round like stage 1, but GEMM and sum orders differ
        assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.999


def test_packed_weights_are_read_as_file_slices(tiny_model_dir, monkeypatch):
    """The merged q/k/v and gate/up weights read their parts through the file's lazy slice
    (so a TP rank reads only its rows); everything else is read whole."""
    import stage1_model.weights as weights
    calls = {"slice": set(), "tensor": set()}
    real_open = weights.safe_open

    class SpyOpen:
        def __init__(self, *a, **kw):
            self.f = real_open(*a, **kw)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_slice(self, name):
            calls["slice"].add(name)
            return self.inner.get_slice(name)

        def get_tensor(self, name):
            calls["tensor"].add(name)
            return self.inner.get_tensor(name)

    monkeypatch.setattr(weights, "safe_open", SpyOpen)
    path, _, _ = tiny_model_dir
    load_fused_model(path, torch.float32, DEV)
    packed = {n for n in calls["slice"] | calls["tensor"]
              if any(f".{p}." in n for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))}
    assert packed and packed <= calls["slice"] and not packed & calls["tensor"]
    assert "model.norm.weight" in calls["tensor"]
