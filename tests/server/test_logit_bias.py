"""logit_bias through both APIs: +100 on one token forces it, and only for that request."""
import pytest

pytestmark = pytest.mark.server
HELLO = 9707                      # "Hello" in the Qwen vocabulary


def test_native_logit_bias_forces_a_token(client):
    sp = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}
    forced = client.post("/generate", json={"text": "Once upon a time",
                                             "sampling_params": dict(sp, logit_bias={str(HELLO): 100})}).json()
    plain = client.post("/generate", json={"text": "Once upon a time", "sampling_params": sp}).json()
    assert forced["output_ids"] == [HELLO] * 4 and forced["text"] == "Hello" * 4
    assert plain["output_ids"] != [HELLO] * 4


def test_openai_logit_bias(client):
    r = client.post("/v1/completions", json={"model": "demo", "prompt": "Once upon a time", "max_tokens": 3,
                                             "temperature": 0, "logit_bias": {str(HELLO): 100}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "Hello" * 3
    chat = client.post("/v1/chat/completions", json={"model": "demo", "max_tokens": 2, "temperature": 0,
                                                     "messages": [{"role": "user", "content": "hi"}],
                                                     "logit_bias": {str(HELLO): 100}})
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"] == "Hello" * 2
