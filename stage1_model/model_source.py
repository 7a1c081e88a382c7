"""Where weights come from: the built-in demo model, a local HF directory, or the Hub.

Contract: `resolve_model_path(model)` returns a local directory holding at least
`config.json` (and, unless loaded with `--load_format dummy`, safetensors + tokenizer).

The demo model is a tiny Qwen3 with the real Qwen vocabulary and special tokens and
deterministic random weights. It is written once into a cache dir as an ordinary HF
model directory, so every later code path (config, safetensors, tokenizer, chat
template) is exactly the one real checkpoints take. Its text is gibberish by design.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from stage1_model.config import ModelConfig

log = logging.getLogger(__name__)

DEMO_VERSION = "v1"
DEMO_CONFIG = ModelConfig(
    vocab_size=151936, hidden_size=64, intermediate_size=192, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=1e6,
    rms_norm_eps=1e-6, max_position_embeddings=8192, tie_word_embeddings=True,
    bos_token_id=151643, eos_token_id=151645, torch_dtype="float32")


def cache_root() -> Path:
    return Path(os.environ.get("MINI_SGLANG_CACHE", Path.home() / ".cache" / "mini-sglang"))


def demo_model_dir() -> Path:
    """Materialise the demo model (once; atomic, so concurrent processes are safe)."""
    final = cache_root() / f"demo-{DEMO_VERSION}"
    if (final / "model.safetensors").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".demo-"))
    log.info("Writing the demo model to %s", final)
    write_demo_model(tmp)
    try:
        tmp.rename(final)
    except OSError:                       # another process won the race: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_demo_model(out: Path) -> None:
    import json
    from stage1_model.tokenizer import build_demo_tokenizer
    from stage1_model.weights import build_model, init_dummy

    model = build_model(DEMO_CONFIG, torch.float32, "cpu")
    init_dummy(model, seed=1234, std=0.05)
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}    # tied: HF omits it too
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(DEMO_CONFIG.to_hf_dict(), indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "do_sample": False}, indent=2))
    build_demo_tokenizer(out)


def resolve_model_path(model: str) -> Path:
    if model == "demo":
        return demo_model_dir()
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"--model {model}: not a directory")
    return download_from_hub(model)


def download_from_hub(repo_id: str) -> Path:
    """Real code path for a Hub id; without network it fails with a clear message."""
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot get the model"
        raise FileNotFoundError(
            f"--model {repo_id}: no such local directory, and downloading it from the "
            f"Hugging Face Hub failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "Pass a local HF directory, `demo`, or a configs/ dir with --load_format dummy.") from e


def generation_eos_ids(model_dir: Path, cfg: ModelConfig) -> list[int]:
    """EOS ids: generation_config.json's if present (Qwen3 lists two), else config.json's."""
    import json
    gen = model_dir / "generation_config.json"
    ids = list(cfg.eos_token_ids)
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is not None:
            ids += [eos] if isinstance(eos, int) else list(eos)
    return sorted(set(ids))


def tokenizer_dir(model_dir: Path) -> Path:
    """The model's own tokenizer, or the demo's (the same Qwen vocabulary) for a bare
    config directory such as configs/qwen3-8b used with --load_format dummy."""
    if (model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer_config.json").is_file():
        return model_dir
    log.warning("%s has no tokenizer files; using the demo model's Qwen tokenizer", model_dir)
    return demo_model_dir()
