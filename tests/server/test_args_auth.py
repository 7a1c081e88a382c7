"""In-process unit tests: flag parsing (both spellings, aliases) and the API-key middleware."""
from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from server.args import ServerArgs, parse_args
from server.entrypoints.auth import ApiKeyMiddleware

pytestmark = pytest.mark.server


def test_both_flag_spellings_and_aliases():
    a = parse_args(["--model-path", "configs/qwen3-8b", "--load-format", "dummy", "--page_size", "16",
                    "--disable-radix-cache", "--schedule-policy", "lpm", "--tp-size", "1", "--device", "cpu"])
    assert (a.model, a.load_format, a.page_size, a.disable_radix_cache) == ("configs/qwen3-8b", "dummy", 16, True)
    assert a.schedule_policy == "cache_aware"
    assert parse_args(["--log_level", "INFO"]).log_level == "info"     # the top README's spelling
    assert "tp" not in a.engine_options()           # stage-5 knobs only when asked for
    # fa3 needs a GPU, which parse_args checks for; the alias itself is the engine options' job.
    assert ServerArgs(attention_backend="fa3").engine_options()["attention_backend"] == "fa"


def test_defaults_are_safe():
    a = parse_args([])
    assert a.host == "127.0.0.1" and a.port == 30000 and a.model == "demo" and a.api_key is None
    assert parse_args(["--api_key", "k"]).to_dict()["api_key"] == "***"      # never echoed


def test_bad_flags_exit():
    with pytest.raises(SystemExit):
        parse_args(["--attention_backend", "cudnn"])
    with pytest.raises(SystemExit):
        parse_args(["--port", "70000"])


def test_hub_ids_and_demo_pass_the_start_up_checks():
    # A name that is no local path may be a Hub id: only the download can tell, so it passes.
    assert parse_args(["--model", "Qwen/Qwen3-0.6B", "--device", "cpu"]).model == "Qwen/Qwen3-0.6B"
    assert parse_args(["--model", "demo", "--device", "cpu", "--attention_backend", "torch"]).model == "demo"


@pytest.fixture
def guarded():
    async def ok(request):
        return PlainTextResponse("ok")
    app = Starlette(routes=[Route(p, ok) for p in ("/health", "/healthz", "/health_generate", "/generate")])
    return TestClient(ApiKeyMiddleware(app, api_key="s3cret", open_paths={"/health"}))


@pytest.mark.parametrize("path", ["/healthz", "/health_generate", "/generate", "/health/../generate"])
@pytest.mark.parametrize("auth", [None, "Bearer nope", "s3cret", "Basic s3cret", "Bearer s3cre", "Bearer s3cretX"])
def test_every_route_but_health_needs_the_key(guarded, path, auth):
    headers = {"Authorization": auth} if auth else {}
    r = guarded.get(path, headers=headers)
    assert r.status_code == 401 and r.json()["error"]["code"] == 401


def test_health_is_open_and_the_key_opens_the_rest(guarded):
    assert guarded.get("/health").status_code == 200
    assert guarded.get("/generate", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert guarded.get("/generate", headers={"authorization": "bearer s3cret"}).status_code == 200


def test_metrics_without_prometheus_client_is_refused_at_start(monkeypatch, capsys):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "prometheus_client"
                        else real(name, *a))
    with pytest.raises(SystemExit) as e:
        parse_args(["--enable_metrics", "--device", "cpu"])
    assert e.value.code == 2 and "mini-sglang[metrics]" in capsys.readouterr().err
