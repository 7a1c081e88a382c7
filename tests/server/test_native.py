"""SGLang's native API against a real server: /generate (stream and not, batch, ids, n,
logprobs), and the info/control routes. Greedy output must equal the offline Engine's."""
from __future__ import annotations

import json

import pytest

from live_server import assert_no_leak, wait_idle

pytestmark = pytest.mark.server
PROMPTS = ["The capital of France is", "def fibonacci(n):", "你好，请介绍一下你自己"]
GREEDY = {"temperature": 0, "max_new_tokens": 24}


@pytest.fixture(scope="module")
def offline():
    """The offline Engine on the same demo model: the reference for greedy text."""
    from stage4_radix.engine import Engine
    engine = Engine(model="demo", device="cpu", max_total_tokens=2048)
    return {p: engine.generate(p, dict(GREEDY)) for p in PROMPTS}


def read_sse(response) -> list:
    """Parse an SSE body strictly: every event is `data: <payload>\\n\\n`; [DONE] last."""
    body = response.text
    assert body.endswith("data: [DONE]\n\n"), body[-200:]
    events = body.split("\n\n")[:-1]
    assert all(e.startswith("data: ") for e in events), events
    payloads = [e[len("data: "):] for e in events]
    assert payloads.count("[DONE]") == 1
    return [json.loads(p) for p in payloads[:-1]]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_generate_matches_offline_engine(client, offline, prompt):
    r = client.post("/generate", json={"text": prompt, "sampling_params": GREEDY})
    assert r.status_code == 200, r.text
    out, ref = r.json(), offline[prompt]
    assert out["text"] == ref["text"] and out["output_ids"] == ref["output_ids"]
    meta = out["meta_info"]
    assert meta["prompt_tokens"] == ref["meta_info"]["prompt_tokens"]
    assert meta["completion_tokens"] == len(out["output_ids"])
    assert meta["finish_reason"] == ref["meta_info"]["finish_reason"]
    assert set(meta) >= {"id", "cached_tokens", "e2e_latency"} and meta["e2e_latency"] > 0


@pytest.mark.parametrize("prompt", PROMPTS)
def test_stream_is_sglang_format_and_matches(client, offline, prompt):
    r = client.post("/generate", json={"text": prompt, "sampling_params": GREEDY, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = read_sse(r)
    texts = [e["text"] for e in events]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))        # cumulative, never shrinking
    assert all("\ufffd" not in t for t in texts)
    counts = [e["meta_info"]["completion_tokens"] for e in events]
    assert counts == sorted(counts) and counts[-1] == GREEDY["max_new_tokens"] or events[-1]["meta_info"][
        "finish_reason"]["type"] == "stop"
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-1])
    assert events[-1]["text"] == offline[prompt]["text"]
    assert events[-1]["output_ids"] == offline[prompt]["output_ids"]


def test_batch_text_and_input_ids(client, offline, tokenizer):
    r = client.post("/generate", json={"text": PROMPTS[:2], "sampling_params": GREEDY})
    assert [o["text"] for o in r.json()] == [offline[p]["text"] for p in PROMPTS[:2]]
    ids = [tokenizer.encode(p) for p in PROMPTS[:2]]
    r = client.post("/generate", json={"input_ids": ids, "sampling_params": GREEDY})
    assert [o["output_ids"] for o in r.json()] == [offline[p]["output_ids"] for p in PROMPTS[:2]]
    r = client.post("/generate", json={"input_ids": ids[0], "sampling_params": GREEDY})
    assert r.json()["text"] == offline[PROMPTS[0]]["text"]


def test_batch_stream_has_index(client):
    r = client.post("/generate", json={"text": PROMPTS[:2], "stream": True,
                                       "sampling_params": {"max_new_tokens": 5, "temperature": 0}})
    events = read_sse(r)
    finals = {e["index"]: e for e in events if e["meta_info"]["finish_reason"]}
    assert sorted(finals) == [0, 1] and all(len(e["output_ids"]) == 5 for e in finals.values())


def test_n_and_seeded_sampling(client):
    sp = {"max_new_tokens": 8, "temperature": 1.0, "n": 3, "seed": 7, "ignore_eos": True}
    outs = client.post("/generate", json={"text": "Once upon a time", "sampling_params": sp}).json()
    assert len(outs) == 3 and all(o["meta_info"]["completion_tokens"] == 8 for o in outs)
    assert len({tuple(o["output_ids"]) for o in outs}) > 1                  # n samples, not n copies
    again = client.post("/generate", json={"text": "Once upon a time", "sampling_params": sp}).json()
    assert [o["output_ids"] for o in outs] == [o["output_ids"] for o in again]      # seeded: reproducible


def test_return_logprob_shape(client):
    out = client.post("/generate", json={"text": "Hello", "return_logprob": True, "sampling_params": GREEDY}).json()
    lps = out["meta_info"]["output_token_logprobs"]
    assert len(lps) == len(out["output_ids"])
    for (lp, tid, text), expected in zip(lps, out["output_ids"]):
        assert tid == expected and lp <= 0 and text is None
    body = {"text": "Hello", "return_logprob": True, "top_logprobs_num": 3, "return_text_in_logprobs": True,
            "sampling_params": dict(GREEDY, max_new_tokens=4)}
    meta = client.post("/generate", json=body).json()["meta_info"]
    tops = meta["output_top_logprobs"]
    assert len(tops) == 4 and all(len(top) == 3 for top in tops)
    for (lp, tid, text), top in zip(meta["output_token_logprobs"], tops):
        assert isinstance(text, str) and top[0][1] == tid and top[0][0] == pytest.approx(lp, abs=1e-4)   # greedy


def test_stop_string_trimmed_like_offline(client, offline):
    ref = offline[PROMPTS[1]]["text"]
    stop = ref[len(ref) // 2: len(ref) // 2 + 3]
    if not stop.strip():
        pytest.skip("no usable stop string in this output")
    body = {"text": PROMPTS[1], "sampling_params": dict(GREEDY, stop=stop)}
    out = client.post("/generate", json=body).json()
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["text"] == ref[:ref.find(stop)]
    events = read_sse(client.post("/generate", json=dict(body, stream=True)))
    assert all(stop not in e["text"] for e in events)          # never sent, so never taken back
    assert events[-1]["text"] == out["text"]


def test_matched_stop_token_is_not_text(client, offline):
    """SGLang drops a matched stop token (stop_token_ids / EOS) from the text, not from output_ids."""
    ref = offline[PROMPTS[0]]
    stop_id = ref["output_ids"][3]
    first = ref["output_ids"].index(stop_id)
    body = {"text": PROMPTS[0], "sampling_params": dict(GREEDY, stop_token_ids=[stop_id])}
    for stream in (False, True):
        r = client.post("/generate", json=dict(body, stream=stream))
        out = read_sse(r)[-1] if stream else r.json()
        assert out["output_ids"] == ref["output_ids"][:first + 1]
        assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
        assert out["text"] == demo_decode(ref["output_ids"][:first])     # without the stop token


def demo_decode(ids: list[int]) -> str:
    from stage1_model.model_source import demo_model_dir
    from stage1_model.tokenizer import load_tokenizer
    return load_tokenizer(demo_model_dir()).decode(ids, skip_special_tokens=True)


def test_rid_is_echoed(client):
    out = client.post("/generate", json={"text": "hi", "rid": "my-request-1",
                                         "sampling_params": {"max_new_tokens": 2}}).json()
    assert out["meta_info"]["id"] == "my-request-1"


def test_info_routes(client, server):
    assert client.get("/health").status_code == 200
    assert client.get("/health_generate").status_code == 200
    info = client.get("/get_model_info").json()
    assert info["is_generation"] is True and info["model_path"].endswith("demo-v1")
    sinfo = client.get("/get_server_info").json()
    assert sinfo["model"] == "demo" and sinfo["internal_states"][0]["kv_pool_size"] == 2048
    assert "avg_spec_accept_length" in sinfo["internal_states"][0]


def test_flush_cache_when_idle_and_no_leak(client):
    assert_no_leak(wait_idle(client))
    assert client.post("/flush_cache").status_code == 200
    assert client.get("/flush_cache").status_code == 200
    state = wait_idle(client)
    assert state["kv_free_slots"] == state["kv_pool_size"]         # flushed: everything free


def test_cached_tokens_and_zero_new_tokens(client):
    body = {"text": "A prompt long enough to be worth caching, " * 4, "sampling_params": {"max_new_tokens": 2}}
    first = client.post("/generate", json=body).json()["meta_info"]
    second = client.post("/generate", json=body).json()["meta_info"]
    assert second["prompt_tokens"] == first["prompt_tokens"]
    assert second["cached_tokens"] >= first["prompt_tokens"] - 1 > 0       # the radix cache served it
    out = client.post("/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 0}}).json()
    assert out["text"] == "" and out["output_ids"] == [] and out["meta_info"]["completion_tokens"] == 0
