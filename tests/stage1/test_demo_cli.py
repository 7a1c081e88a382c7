"""The demos' shared command line: same defaults everywhere, bad combinations fail early.

Every error path exits with code 2 and one line naming the flag and what to do, before
any weight is read (the loader is replaced by a tripwire), and without a traceback.
"""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from stage1_model import demo_cli

pytestmark = pytest.mark.stage1
DEMOS = ["stage1_model.demo", "stage2_runner.demo", "stage3_scheduler.demo", "stage4_radix.demo"]


def parse(argv, backend=True):
    ap = demo_cli.demo_parser("stageX.demo", "doc")
    demo_cli.add_model_args(ap, backend=backend)
    return demo_cli.parse(ap, argv)


def test_defaults_are_resolved_the_same_way():
    args = parse([])
    cpu = not torch.cuda.is_available()
    assert args.model == "demo" and args.load_format == "auto"
    assert args.device == ("cpu" if cpu else "cuda")
    assert args.torch_dtype == (torch.float32 if cpu else torch.bfloat16)
    assert args.attention_backend == ("torch" if cpu else "triton")
    assert demo_cli.resolve_dtype("auto", "cuda") is torch.bfloat16
    assert demo_cli.resolve_dtype("float16", "cpu") is torch.float16


def test_gpu_backends_on_cpu_fall_back_with_a_warning(caplog, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for name in ["fa3", "fa", "triton"]:
        with caplog.at_level("WARNING"):
            assert demo_cli.resolve_backend(name, "cpu") == "torch"
        assert f"--attention_backend {name} needs a GPU" in caplog.text
    assert demo_cli.resolve_backend("fa3", "cuda") == "fa"


def test_triton_on_cpu_runs_in_the_interpreter_when_asked(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert demo_cli.resolve_backend("triton", "cpu") == "triton"
    assert demo_cli.resolve_backend("fa", "cpu") == "torch"        # no interpreter for FlashAttention


def bad_model_cases(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "file.txt").write_text("x")
    return [
        (["--model", str(empty)], "no config.json"),
        (["--model", str(tmp_path / "file.txt")], "not a model directory"),
        (["--model", "/no/such/dir"], "no such directory"),
        (["--model", "not a hub id!"], "no such directory"),
        (["--model", "configs/qwen3-8b"], "--load_format dummy"),       # config only, no weights
    ] + ([(["--device", "cuda"], "use --device cpu")] if not torch.cuda.is_available() else [])


@pytest.mark.parametrize("module", DEMOS)
def test_each_demo_fails_before_loading(module, tmp_path, monkeypatch, capsys):
    import importlib
    demo = importlib.import_module(module)
    import stage1_model.weights as weights
    monkeypatch.setattr(weights, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    for argv, words in bad_model_cases(tmp_path):
        with pytest.raises(SystemExit) as e:
            demo.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2, argv
        assert err.count("\n") == 1 and words in err and err.startswith(f"python -m {module}: error:"), err


@pytest.mark.parametrize("module", ["stage2_runner.demo", "stage3_scheduler.demo"])
def test_help_names_the_module_and_every_default(module, capsys):
    import importlib
    with pytest.raises(SystemExit):
        importlib.import_module(module).main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m {module}")
    assert out.count("(default: demo)") == 1 and "(default: auto)" in out
    assert "--load_format" in out and "--load-format" in out


def test_error_in_a_fresh_process_is_one_line_and_fast():
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "stage2_runner.demo", "--model", "/no/such/dir"],
                       capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t0
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr, p.stderr
    assert elapsed < 20, elapsed          # ~1.5 s on an idle 2-core box: only imports run
