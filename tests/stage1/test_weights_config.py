"""Loading checkpoints written by HF `save_pretrained`, dummy weights, config errors."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import TINY_CONFIGS, make_hf, random_prompts
from stage1_model.config import ConfigError, load_config
from stage1_model.generate import forward_logits
from stage1_model.weights import WeightError, load_model

pytestmark = pytest.mark.stage1


@pytest.mark.parametrize("shard", ["10GB", "20KB"], ids=["single", "sharded"])
@pytest.mark.parametrize("name", ["gqa2-tied", "gqa4-untied"])
@torch.inference_mode()
def test_load_save_pretrained(tmp_path, name, shard):
    cfg = TINY_CONFIGS[name]
    hf = make_hf(cfg)
    hf.save_pretrained(tmp_path, max_shard_size=shard)
    if shard == "20KB":
        assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = load_model(tmp_path, torch.float32, "cpu")
    prompt = random_prompts(cfg.vocab_size, [19], seed=9)[0]
    ref = hf(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(forward_logits(ours, prompt), ref, rtol=1e-4, atol=1e-4)


def test_dummy_load_real_config_shapes():
    cfg = load_config("configs/qwen3-0.6b")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim, cfg.tie_word_embeddings) == (1024, 28, 128, True)
    m = load_model("configs/qwen3-0.6b", torch.float32, "cpu", "dummy", cfg=_one_layer("configs/qwen3-0.6b"))
    p = dict(m.named_parameters())
    assert p["model.layers.0.self_attn.q_proj.weight"].shape == (16 * 128, 1024)
    assert p["model.layers.0.self_attn.k_proj.weight"].shape == (8 * 128, 1024)
    assert p["model.layers.0.mlp.down_proj.weight"].shape == (1024, 3072)
    assert m.lm_head.weight is m.model.embed_tokens.weight      # tied
    assert p["model.layers.0.self_attn.q_norm.weight"].shape == (128,)
    assert p["model.layers.0.self_attn.q_proj.weight"].std() > 0.01  # really random, not zeros


def _one_layer(path):
    cfg = load_config(path)
    cfg.num_hidden_layers = 1
    return cfg


def test_missing_and_misshaped_tensors_are_named(tmp_path):
    cfg = TINY_CONFIGS["gqa4-untied"]
    make_hf(cfg).save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    state = load_file(f)
    bad = dict(state)
    bad.pop("model.layers.1.mlp.up_proj.weight")
    save_file(bad, f)
    with pytest.raises(WeightError, match="model.layers.1.mlp.up_proj.weight"):
        load_model(tmp_path)
    bad = dict(state)
    bad["model.norm.weight"] = torch.ones(3)
    save_file(bad, f)
    with pytest.raises(WeightError, match="model.norm.weight"):
        load_model(tmp_path)


def test_config_errors_name_file_and_key(tmp_path):
    raw = json.loads(open("configs/qwen3-0.6b/config.json").read())
    for key, value, match in [("architectures", ["LlamaForCausalLM"], "architectures"),
                              ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_scaling")]:
        (tmp_path / "config.json").write_text(json.dumps({**raw, key: value}))
        with pytest.raises(ConfigError, match=match):
            load_config(tmp_path)
    del raw["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"config.json: missing required key 'hidden_size'"):
        load_config(tmp_path)
