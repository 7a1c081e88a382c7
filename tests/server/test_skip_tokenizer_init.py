"""--skip_tokenizer_init (SGLang's flag): no tokenizer in any process. Token ids in, token ids
out (`text` stays ""), stop_token_ids work, anything that needs a tokenizer is a clear 400."""
from __future__ import annotations

import httpx
import pytest

from live_server import start_server

pytestmark = pytest.mark.server
IDS = [785, 6722, 315, 9625, 374]


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    handle = start_server(tmp_path_factory.mktemp("bare"), "--skip_tokenizer_init")
    with httpx.Client(base_url=handle.url, timeout=60) as c:
        yield c, handle
    assert handle.stop() == 0


def test_ids_in_ids_out_with_logprobs(bare, client):
    c, _ = bare
    body = {"input_ids": IDS, "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 2,
            "return_text_in_logprobs": True, "sampling_params": {"temperature": 0, "max_new_tokens": 4}}
    out = c.post("/generate", json=body).json()
    assert out["text"] == "" and len(out["output_ids"]) == out["meta_info"]["completion_tokens"] == 4
    meta = out["meta_info"]
    assert len(meta["input_token_logprobs"]) == len(IDS) and len(meta["output_token_logprobs"]) == 4
    assert all(text is None for _, _, text in meta["input_token_logprobs"] + meta["output_token_logprobs"])
    # the same weights with a tokenizer give the same ids
    assert client.post("/generate", json=body).json()["output_ids"] == out["output_ids"]


def test_stop_token_ids_work_and_streams_carry_ids(bare):
    c, _ = bare
    first = c.post("/generate", json={"input_ids": IDS, "sampling_params": {"temperature": 0, "max_new_tokens": 4}})
    stop = first.json()["output_ids"][1]
    out = c.post("/generate", json={"input_ids": IDS, "sampling_params": {
        "temperature": 0, "max_new_tokens": 4, "stop_token_ids": [stop]}}).json()
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop} and out["output_ids"][-1] == stop
    stream = c.post("/generate", json={"input_ids": IDS, "stream": True, "sampling_params": {"max_new_tokens": 2}})
    assert '"output_ids": [' in stream.text and stream.text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize("path,body,says", [
    ("/generate", {"text": "hello"}, "send input_ids"),
    ("/generate", {"input_ids": IDS, "sampling_params": {"stop": ["x"]}}, "stop strings"),
    ("/generate", {"input_ids": IDS, "sampling_params": {"stop_regex": "x+"}}, "stop_regex"),
    ("/generate", {"input_ids": IDS, "sampling_params": {"regex": "(yes|no)"}}, "grammars need one"),
    ("/v1/completions", {"prompt": IDS}, "this route needs one"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, "this route needs one"),
    ("/tokenize", {"prompt": "x"}, "this route needs one"),
])
def test_what_needs_a_tokenizer_is_refused(bare, path, body, says):
    r = bare[0].post(path, json=body)
    msg = r.json()["error"]["message"]
    assert r.status_code == 400 and "--skip_tokenizer_init" in msg and says in msg, r.text


def test_health_generate_works(bare):
    assert bare[0].get("/health_generate").status_code == 200
