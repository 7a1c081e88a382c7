"""The chapter demos' shared command line: one set of model flags, one set of defaults.

    ap = demo_parser("stage2_runner.demo", __doc__)   # --help says "python -m stage2_runner.demo"
    add_model_args(ap, backend=True)                  # --model --device --dtype --load_format
    add_flag(ap, "--page_size", type=int, default=4)  # [--attention_backend]; both spellings
    args = parse(ap, argv)                            # validated before any weight is read
    with friendly_errors(ap):                         # loading errors: one line, exit 2
        ...

Every demo gets the same defaults: `--model demo`, `--device` cuda when one is visible
(else cpu), `--dtype auto` (float32 on CPU, bfloat16 on GPU: `resolve_dtype`), `--load_format
auto`, `--attention_backend auto` (triton on GPU, torch on CPU). A combination that cannot
work fails in `parse`, before the model loads, with one line saying what to do and no
traceback. The classic GPU command line (`--attention_backend fa3`) on a CPU-only machine
warns and runs the torch backend instead of dying.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BACKENDS = ["auto", "torch", "triton", "fa", "fa3"]      # fa3 is SGLang's name for fa
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")   # "Qwen/Qwen3-0.6B"


class DemoError(ValueError):
    """A flag value that cannot work; the message says what to do instead."""


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the module docstring's layout, and print every flag's default once."""


def demo_parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"python -m {module}", description=doc, formatter_class=_Formatter)


def add_flag(ap: argparse.ArgumentParser, name: str, **kw) -> None:
    """Accept `--flag_name` and `--flag-name`, as the server does."""
    names = [name] + ([name.replace("_", "-")] if "_" in name else [])
    ap.add_argument(*names, **kw)


def add_model_args(ap: argparse.ArgumentParser, backend: bool = False) -> None:
    add_flag(ap, "--model", default="demo", help="'demo', a local HF Qwen3 directory, configs/<name>, or a Hub id")
    add_flag(ap, "--device", default="auto", help="cuda, cpu, or auto (cuda when one is visible)")
    add_flag(ap, "--dtype", default="auto", choices=["auto", *DTYPES], help="auto: float32 on CPU, bfloat16 on GPU")
    add_flag(ap, "--load_format", default="auto", choices=["auto", "dummy"],
             help="dummy: random weights of the right shapes (for configs/<name>)")
    if backend:
        add_flag(ap, "--attention_backend", default="auto", choices=BACKENDS,
                 help="auto: triton on GPU, torch on CPU")


# ---- the rules, one place ---------------------------------------------------------------
def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DemoError(f"--device {name}: no CUDA device is visible here; use --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise DemoError(f"--device {name}: expected cuda, cpu or auto")
    return name


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """bf16 matmuls on CPU are slow and imprecise, so `auto` means float32 there."""
    if name == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    return DTYPES[name]


def resolve_backend(name: str, device: str) -> str:
    if name == "auto":
        return "torch" if device == "cpu" else "triton"
    if device == "cpu" and name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        log.warning("--attention_backend triton on CPU: Triton's interpreter runs the kernels (slow)")
        return "triton"
    if device == "cpu" and name != "torch":
        log.warning("--attention_backend %s needs a GPU; using the torch backend on CPU "
                    "(TRITON_INTERPRET=1 runs triton in its interpreter)", name)
        return "torch"
    return "fa" if name == "fa3" else name


def check_model(model: str, load_format: str) -> None:
    """Catch the common path mistakes before anything is loaded or downloaded."""
    if model == "demo":
        return
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DemoError(f"--model {model}: no config.json in this directory; pass a Hugging Face "
                            "Qwen3 directory, configs/<name> with --load_format dummy, or demo")
        if load_format == "auto" and not any(path.glob("*.safetensors")):
            raise DemoError(f"--model {model}: no *.safetensors weights here; add --load_format dummy "
                            "for random weights of this config")
    elif path.exists():
        raise DemoError(f"--model {model}: a file, not a model directory")
    elif model.startswith(("/", ".", "~")) or not HUB_ID.fullmatch(model):
        raise DemoError(f"--model {model}: no such directory (and not a Hub id like Qwen/Qwen3-0.6B)")


def parse(ap: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse, then resolve every `auto` and check the model flags; exit 2 on a bad combination."""
    args = ap.parse_args(argv)
    try:
        args.device = resolve_device(args.device)
        args.torch_dtype = resolve_dtype(args.dtype, args.device)
        if hasattr(args, "attention_backend"):
            args.attention_backend = resolve_backend(args.attention_backend, args.device)
        check_model(args.model, args.load_format)
    except DemoError as e:
        ap.exit(2, f"{ap.prog}: error: {e}\n")
    if args.model == "demo" and args.device == "cpu":
        # The demo model's matmuls are tiny: a second thread only adds spin-waiting, which on
        # a busy 2-core machine made the chapter-3 demo 4-15x slower (3.9 s vs 14-64 s).
        torch.set_num_threads(1)
    return args


@contextlib.contextmanager
def friendly_errors(ap: argparse.ArgumentParser):
    """Loading errors that are the user's to fix (a bad config, a missing tensor, no network
    for a Hub id) end the demo with their one-line message instead of a traceback."""
    from stage1_model.config import ConfigError
    from stage1_model.weights import WeightError
    try:
        yield
    except (ConfigError, WeightError, FileNotFoundError) as e:
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
