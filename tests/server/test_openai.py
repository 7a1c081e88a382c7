"""The official `openai` client against /v1: completions and chat, stream and not, usage."""
from __future__ import annotations

import pytest

openai = pytest.importorskip("openai", reason="the dev extra installs the openai client")

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(oai):
    models = oai.models.list().data
    assert len(models) == 1
    return models[0].id


def native(client, **body):
    return client.post("/generate", json=body).json()


def test_completion_matches_native(oai, model, client):
    c = oai.completions.create(model=model, prompt="The capital of France is", max_tokens=12, temperature=0)
    ref = native(client, text="The capital of France is", sampling_params={"max_new_tokens": 12, "temperature": 0})
    assert c.object == "text_completion" and c.choices[0].text == ref["text"]
    assert c.choices[0].finish_reason in ("stop", "length")
    assert c.usage.prompt_tokens == ref["meta_info"]["prompt_tokens"]
    assert c.usage.completion_tokens == ref["meta_info"]["completion_tokens"]
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens


def test_completion_stream_with_usage(oai, model):
    kw = dict(model=model, prompt="Hello there", max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    full = oai.completions.create(**kw)
    chunks = list(oai.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == full.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_completion_batch_n_and_stop(oai, model):
    c = oai.completions.create(model=model, prompt=["a b c", "x y z"], n=2, max_tokens=5, temperature=0.8, seed=3,
                               extra_body={"ignore_eos": True})
    assert sorted(ch.index for ch in c.choices) == [0, 1, 2, 3]
    assert c.usage.completion_tokens == 4 * 5
    ref = oai.completions.create(model=model, prompt="a b c", max_tokens=8, temperature=0).choices[0].text
    if len(ref.strip()) > 2:
        stop = ref.strip()[:2]
        c = oai.completions.create(model=model, prompt="a b c", max_tokens=8, temperature=0, stop=[stop])
        assert c.choices[0].finish_reason == "stop" and stop not in c.choices[0].text


def test_completion_token_prompt_and_echo(oai, model, tokenizer):
    ids = tokenizer.encode("Count: one two")
    c = oai.completions.create(model=model, prompt=ids, max_tokens=4, temperature=0, echo=True)
    assert c.choices[0].text.startswith("Count: one two")
    assert c.usage.prompt_tokens == len(ids)


def test_chat_matches_template_and_native(oai, model, client, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi! 你好"}]
    c = oai.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                           add_special_tokens=False)
    ref = native(client, input_ids=ids, sampling_params={"max_new_tokens": 12, "temperature": 0})
    assert c.object == "chat.completion" and c.choices[0].message.role == "assistant"
    assert c.choices[0].message.content == ref["text"]
    assert c.usage.prompt_tokens == len(ids) and c.usage.completion_tokens == ref["meta_info"]["completion_tokens"]


def test_chat_stream(oai, model):
    kw = dict(model=model, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=16, temperature=0)
    full = oai.chat.completions.create(**kw)
    chunks = list(oai.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)


def test_chat_logprobs(oai, model):
    c = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                    temperature=0, logprobs=True)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens and all(t.logprob <= 0 for t in content)


def test_errors_are_openai_errors(oai, model):
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="not-this-model", prompt="hi", max_tokens=2)
    assert "The model `not-this-model` does not exist" in str(e.value)      # SGLang's wording
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model=model, prompt="hi", max_tokens=2, temperature=-3)
