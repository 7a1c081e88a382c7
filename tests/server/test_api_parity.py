"""SGLang/OpenAI parity on the real processes: tokenizer routes, model cards, SGLang's
field names, logprob shapes against the native ones, usage on every chunk, continuing an
assistant turn, and a refusal (400 naming the field) for every field this server lacks."""
from __future__ import annotations

import json

import pytest

from server.parsers import ReasoningParser
from server.unsupported import NATIVE, OPENAI, SAMPLING

pytestmark = pytest.mark.server
CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "Hello there"}]


@pytest.mark.parametrize("prefix", ["", "/v1"])
def test_tokenize_and_detokenize(client, tokenizer, prefix):
    r = client.post(prefix + "/tokenize", json={"prompt": "Hello world"}).json()
    assert r["tokens"] == tokenizer.encode("Hello world") and r["count"] == len(r["tokens"]) and r["max_model_len"] > 0
    r = client.post(prefix + "/tokenize", json={"prompt": ["a b", "你好"], "add_special_tokens": False}).json()
    assert r["tokens"] == [tokenizer.encode("a b"), tokenizer.encode("你好")]
    assert r["count"] == [len(t) for t in r["tokens"]]
    assert client.post(prefix + "/detokenize", json={"tokens": [9707, 1879]}).json() == {"text": "Hello world"}
    assert client.post(prefix + "/detokenize", json={"tokens": [[9707], [151667]]}).json() == {"text": ["Hello", "<think>"]}
    for path, body in [("/tokenize", {"prompt": 5}), ("/detokenize", {"tokens": [-1]}),
                       ("/detokenize", {"tokens": [10**9]}), ("/tokenize", {"prompt": "x", "model": "gpt-4"})]:
        r = client.post(prefix + path, json=body)
        assert r.status_code == 400 and r.json()["error"]["message"], (path, body, r.text)


def test_model_card_by_id(client):
    name = client.get("/v1/models").json()["data"][0]["id"]
    assert client.get(f"/v1/models/{name}").json()["id"] == name       # a path with slashes works too
    r = client.get("/v1/models/gpt-4")
    assert r.status_code == 404 and r.json()["error"]["message"] == "The model `gpt-4` does not exist."


def test_sampling_seed_is_seed(client):
    def run(**sp):
        body = {"text": "Once", "sampling_params": {"max_new_tokens": 6, "temperature": 1.0, "ignore_eos": True, **sp}}
        return client.post("/generate", json=body).json()["output_ids"]
    assert run(sampling_seed=7) == run(seed=7)
    r = client.post("/v1/completions", json={"prompt": "Once", "max_tokens": 6, "sampling_seed": 7, "ignore_eos": True})
    assert r.json()["choices"][0]["text"] == client.post("/v1/completions", json={
        "prompt": "Once", "max_tokens": 6, "seed": 7, "ignore_eos": True}).json()["choices"][0]["text"]
    r = client.post("/generate", json={"text": "x", "sampling_params": {"seed": 1, "sampling_seed": 2}})
    assert r.status_code == 400 and "sampling_seed" in r.json()["error"]["message"]


def test_chat_top_logprobs_equal_native(client, tokenizer):
    ids = tokenizer.encode(tokenizer.apply_chat_template(USER, add_generation_prompt=True, tokenize=False),
                           add_special_tokens=False)
    native = client.post("/generate", json={"input_ids": ids, "return_logprob": True, "top_logprobs_num": 3,
                                            "sampling_params": {"max_new_tokens": 5, "temperature": 0}}).json()
    body = {"messages": USER, "max_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    chat = client.post(CHAT, json=body).json()["choices"][0]["logprobs"]["content"]
    meta = native["meta_info"]         # the same values, up to float noise (a prefix-cache hit runs other kernels)
    assert [e["logprob"] for e in chat] == pytest.approx([lp for lp, _, _ in meta["output_token_logprobs"]], abs=1e-4)
    for e, top in zip(chat, meta["output_top_logprobs"], strict=True):
        assert [a["token"] for a in e["top_logprobs"]] == [tokenizer.decode([t]) for _, t, _ in top]
        assert [a["logprob"] for a in e["top_logprobs"]] == pytest.approx([lp for lp, _, _ in top], abs=1e-4)
    assert all(e["top_logprobs"][0]["logprob"] == e["logprob"] for e in chat)        # greedy: the top choice
    stream = client.post(CHAT, json={**body, "stream": True}).text
    assert stream.count('"top_logprobs": [{') == 5 and stream.rstrip().endswith("data: [DONE]")


def test_continuous_usage_stats(client):
    body = {"prompt": "Hi", "max_tokens": 4, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    events = [json.loads(line[6:]) for line in client.post("/v1/completions", json=body).text.splitlines()
              if line.startswith("data: {")]
    counts = [e["usage"]["completion_tokens"] for e in events]
    assert all("usage" in e for e in events) and counts == sorted(counts) and counts[-1] == 4
    r = client.post("/v1/completions", json={**body, "stream_options": {"continuous": True}})
    assert r.status_code == 400


def test_continue_final_message_reasons_from_an_open_think(client, tokenizer):
    """The prefix opens a <think> block: with --reasoning_parser the continuation is reasoning."""
    msgs = USER + [{"role": "assistant", "content": "<think>\nLet me"}]
    body = {"messages": msgs, "continue_final_message": True, "max_tokens": 6, "temperature": 0}
    c = client.post(CHAT, json=body).json()
    want = tokenizer.apply_chat_template(msgs, continue_final_message=True, tokenize=False)
    assert want.endswith("<think>\nLet me") and c["usage"]["prompt_tokens"] == len(tokenizer.encode(want))
    native = client.post("/generate", json={"input_ids": tokenizer.encode(want),
                                            "sampling_params": {"max_new_tokens": 6, "temperature": 0}}).json()
    reasoning, content = ReasoningParser(in_reasoning=True).parse(native["text"])
    msg = c["choices"][0]["message"]
    assert (msg["reasoning_content"], msg["content"]) == (reasoning or None, content)
    assert reasoning or content           # the demo model wrote something
    r = client.post(CHAT, json={"messages": USER, "continue_final_message": True})
    assert r.status_code == 400 and "assistant" in r.json()["error"]["message"]


def set_value(harmless):
    return "x" if not harmless else 3          # anything but null/false/empty/the harmless value


@pytest.mark.parametrize("name", sorted(NATIVE))
def test_every_unsupported_native_field_is_refused(client, name):
    r = client.post("/generate", json={"text": "hi", name: set_value(NATIVE[name][0])})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith(name), r.text


@pytest.mark.parametrize("name", sorted(SAMPLING))
def test_every_unsupported_sampling_param_is_refused(client, name):
    r = client.post("/generate", json={"text": "hi", "sampling_params": {name: "x"}})
    assert r.status_code == 400 and f"sampling_params.{name}" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("name", sorted(OPENAI))
@pytest.mark.parametrize("path", ["/v1/completions", CHAT])
def test_every_unsupported_openai_field_is_refused(client, name, path):
    body = {"prompt": "hi"} if path == "/v1/completions" else {"messages": USER}
    r = client.post(path, json={**body, "max_tokens": 1, name: set_value(OPENAI[name][0])})
    assert r.status_code == 400 and name in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("path,body,says", [
    ("/generate", {"text": "hi", "return_logprob": True, "logprob_start_len": 5}, "less than the prompt length"),
    ("/generate", {"text": "hi", "return_logprob": True, "logprob_start_len": -2}, "logprob_start_len"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs: must be in [0, 20]"),
    ("/v1/completions", {"prompt": "hi", "n": 1, "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": "hi", "tools": [{"type": "function", "function": {"name": "f"}}]}, "chat"),
    (CHAT, {"messages": USER, "top_logprobs": 2}, "needs logprobs"),
    (CHAT, {"messages": USER, "response_format": {"type": "xml"}}, "response_format: must be"),
    (CHAT, {"messages": USER, "response_format": {"type": "json_object"}, "regex": "a"}, "cannot be combined"),
    ("/generate", {"text": "hi", "sampling_params": {"structural_tag": "{}"}}, "structural_tag is not supported"),
])
def test_refusals_say_why(client, path, body, says):
    r = client.post(path, json=body)
    assert r.status_code == 400 and says in r.json()["error"]["message"], r.text


def test_harmless_defaults_are_accepted(client):
    body = {"text": "hi", "sampling_params": {"max_new_tokens": 1}, "logprob_start_len": -1, "lora_path": None,
            "routed_dp_rank": 0, "log_metrics": True, "return_hidden_states": False}
    assert client.post("/generate", json=body).status_code == 200
    body = {"messages": USER, "max_tokens": 1, "user": "u1", "modalities": ["text"], "tool_choice": "none",
            "logit_bias": {}, "stream_reasoning": True, "separate_reasoning": True}
    assert client.post(CHAT, json=body).status_code == 200


def test_server_info_alias_and_pool_size(client):
    info = client.get("/server_info").json()
    assert info["max_total_num_tokens"] == info["internal_states"][0]["max_total_num_tokens"] > 0
    assert client.get("/get_server_info").json()["max_total_num_tokens"] == info["max_total_num_tokens"]
    assert info["chunked_prefill_size"] == 2048          # the default as resolved for the CPU, not null


def test_cache_report_counts_each_prompt_once():
    from server.entrypoints.openai_reply import usage
    results = [{"meta_info": {"prompt_tokens": 10, "completion_tokens": 3, "cached_tokens": c}} for c in (8, 0, 4, 4)]
    assert usage(results, 2, cache_report=True) == {"prompt_tokens": 20, "completion_tokens": 12, "total_tokens": 32,
                                                    "prompt_tokens_details": {"cached_tokens": 12}}
    assert "prompt_tokens_details" not in usage(results, 2)


def test_meta_info_weight_version(client):
    meta = client.post("/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 1}}).json()["meta_info"]
    assert meta["weight_version"] == "default"
