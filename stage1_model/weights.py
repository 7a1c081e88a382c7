"""Build a Qwen3 model and fill its weights.

Contract: `load_model(model_dir, dtype, device, load_format, factory)` returns a ready
`Qwen3ForCausalLM` in eval mode. Checkpoints are HF safetensors, single file or sharded
(`model.safetensors.index.json`). Every checkpoint tensor goes through its parameter's
`weight_loader`, so a sharding factory (stage 5) loads only its slice. A missing,
unexpected or mis-shaped tensor is an error that names it. `dummy` fills random weights
(seeded) of the right shapes directly on the device: real sizes in seconds, no files.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from stage1_model.config import ModelConfig, load_config
from stage1_model.layers import LayerFactory
from stage1_model.model import Qwen3ForCausalLM

log = logging.getLogger(__name__)


class WeightError(ValueError):
    pass


def build_model(cfg: ModelConfig, dtype: torch.dtype, device, factory: LayerFactory | None = None,
                model_cls=Qwen3ForCausalLM) -> Qwen3ForCausalLM:
    """An uninitialised model; `model_cls` lets a later stage build a faster twin the same way."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)          # parameters are created directly in `dtype` ...
    try:
        with torch.device(device):          # ... and on the target device: no CPU copy of 16 GB
            model = model_cls(cfg, factory)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise WeightError(f"{model_dir}: no *.safetensors files (and no index)")
    return files


def load_safetensors(model: Qwen3ForCausalLM, model_dir: Path, progress: bool = True) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = model.config.tie_word_embeddings
    loaded: set[str] = set()
    files = safetensors_files(model_dir)
    for path in tqdm(files, desc="Loading safetensors", unit="file", disable=not progress or len(files) < 2):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if tied and name == "lm_head.weight":
                    continue                      # tied: lm_head shares embed_tokens
                if name not in params:
                    raise WeightError(f"{path.name}: unexpected tensor '{name}' (not a Qwen3 parameter)")
                p = params[name]
                # A loader that wants only part of the tensor (a tensor-parallel shard,
                # stage 5) gets the file's lazy slice and reads just that part.
                if getattr(p.weight_loader, "reads_slices", False):
                    tensor = f.get_slice(name)
                else:
                    tensor = f.get_tensor(name).to(p.dtype)
                try:
                    p.weight_loader(p, tensor)
                except (ValueError, SafetensorError) as e:      # a bad shape, or a bad file slice
                    raise WeightError(f"{path.name}: tensor '{name}': {e}") from e
                loaded.add(name)
    expected = {n for n in params if not (tied and n == "lm_head.weight")}
    missing = sorted(expected - loaded)
    if missing:
        raise WeightError(f"{model_dir}: checkpoint lacks {len(missing)} tensors, e.g. '{missing[0]}'")


def init_dummy(model: Qwen3ForCausalLM, seed: int = 0, std: float = 0.02) -> None:
    """Random weights of the right shapes, generated on the model's device."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        fill_dummy(name, p.data, gen, std)


def fill_dummy(name: str, t: torch.Tensor, gen: torch.Generator, std: float = 0.02) -> None:
    """The dummy value of one parameter: norms 1, the rest N(0, std) drawn from `gen`."""
    if "norm" in name:
        t.fill_(1.0)
    else:
        t.normal_(0.0, std, generator=gen)


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32, device="cpu",
               load_format: str = "auto", factory: LayerFactory | None = None,
               cfg: ModelConfig | None = None) -> Qwen3ForCausalLM:
    model_dir = Path(model_dir)
    cfg = cfg or load_config(model_dir)
    model = build_model(cfg, dtype, device, factory)
    if load_format == "dummy":
        init_dummy(model)
    elif load_format == "auto":
        load_safetensors(model, model_dir)
    else:
        raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
    n = sum(p.numel() for p in model.parameters())
    log.info("Loaded %s (%s, %.2fB params, %s) on %s", model_dir.name, load_format, n / 1e9, dtype, device)
    return model
