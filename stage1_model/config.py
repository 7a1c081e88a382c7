"""Typed Qwen3 config read from a Hugging Face `config.json`.

Contract: `load_config(model_dir)` returns a `ModelConfig` or raises `ConfigError`
naming the file and the offending key. Only what mini-sglang implements is accepted:
the Qwen3 architecture with plain RoPE (no rope_scaling), no attention bias.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM",)


class ConfigError(ValueError):
    pass


@dataclass(slots=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str = "bfloat16"

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))

    def to_hf_dict(self) -> dict:
        """The HF config.json view of this config (used to write the demo model)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_act="silu",
                 attention_bias=False, rope_scaling=None, use_sliding_window=False)
        return d


REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads")


def config_from_dict(raw: dict, source: str = "<dict>") -> ModelConfig:
    archs = raw.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ConfigError(f"{source}: key 'architectures' is {archs!r}; "
                          f"mini-sglang supports only {SUPPORTED_ARCHITECTURES}")
    for key in REQUIRED:
        if key not in raw:
            raise ConfigError(f"{source}: missing required key '{key}'")
    rope = raw.get("rope_parameters")          # transformers >= 5 nests rope_theta here
    if rope:
        raw = {**raw, "rope_theta": rope.get("rope_theta", raw.get("rope_theta", 1e6))}
        if rope.get("rope_type", "default") != "default":
            raw["rope_scaling"] = rope
    if raw.get("rope_scaling"):
        # YaRN / dynamic NTK would change the rotary frequencies; we only implement plain RoPE.
        raise ConfigError(f"{source}: key 'rope_scaling'={raw['rope_scaling']!r} is not "
                          "implemented (only plain RoPE); remove it or use a model without it")
    if raw.get("attention_bias"):
        raise ConfigError(f"{source}: key 'attention_bias'=true is not supported by Qwen3 here")
    kwargs = {f.name: raw[f.name] for f in fields(ModelConfig) if f.name in raw and raw[f.name] is not None}
    kwargs.setdefault("head_dim", raw["hidden_size"] // raw["num_attention_heads"])
    cfg = ModelConfig(**kwargs)
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ConfigError(f"{source}: num_attention_heads must be a multiple of num_key_value_heads")
    return cfg


def load_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: config.json not found")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from e
    return config_from_dict(raw, str(path))
