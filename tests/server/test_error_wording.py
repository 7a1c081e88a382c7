"""SGLang's exact error messages where clients match on them (and its status codes: 400)."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.server
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def ctx(client):
    return client.get("/get_server_info").json()["context_length"]


def error(r, status=400) -> str:
    assert r.status_code == status, r.text
    return r.json()["error"]["message"]


def test_context_length_messages(client, ctx):
    r = client.post("/generate", json={"input_ids": [11] * ctx})
    assert error(r) == f"The input ({ctx} tokens) is longer than the model's context length ({ctx} tokens)."
    r = client.post("/generate", json={"input_ids": [11] * 5, "sampling_params": {"max_new_tokens": ctx}})
    assert error(r) == (
        f"Requested token count exceeds the model's maximum context length of {ctx} tokens. You requested a total "
        f"of {ctx + 5} tokens: 5 tokens from the input messages and {ctx} tokens for the completion. Please reduce "
        "the number of tokens in the input messages or the completion to fit within the limit.")
    r = client.post("/v1/completions", json={"prompt": [11] * 5, "max_tokens": ctx})
    assert error(r).startswith("Requested token count exceeds the model's maximum context length")


def test_max_completion_tokens_is_too_large(client, ctx):
    for field in ("max_tokens", "max_completion_tokens"):
        r = client.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], field: ctx + 1})
        assert error(r) == (f"max_completion_tokens is too large: {ctx + 1}."
                            f"This model supports at most {ctx} completion tokens.")


def test_unknown_model(client):
    for path, body in [(CHAT, {"messages": [{"role": "user", "content": "hi"}]}), ("/v1/completions", {"prompt": "x"})]:
        assert error(client.post(path, json={**body, "model": "gpt-4"})) == "The model `gpt-4` does not exist."
    assert error(client.get("/v1/models/gpt-4"), 404) == "The model `gpt-4` does not exist."


def test_duplicate_request_ids(client):
    r = client.post("/generate", json={"text": ["a", "b", "c"], "rid": ["x", "y", "x"]})
    assert error(r) == "Duplicate request IDs detected within the request: ['x']"
