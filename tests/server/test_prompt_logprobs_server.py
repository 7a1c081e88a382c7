"""Prompt (input) logprobs on the real server: SGLang's native shapes, OpenAI's echo through
the official client, and the values against a plain forward pass of the same weights."""
from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.server
PROMPT = "The capital of France is Paris, and the capital of Italy is"
GREEDY = {"temperature": 0, "max_new_tokens": 3}


@pytest.fixture(scope="module")
def reference(tokenizer):
    """log-softmax [T, vocab] of stage 1's model (the served weights) over ids, float32, unbatched."""
    from stage1_model.generate import forward_logits
    from stage1_model.model_source import resolve_model_path
    from stage1_model.weights import load_model
    model = load_model(resolve_model_path("demo"))
    return lambda ids: torch.log_softmax(forward_logits(model, ids).float(), dim=-1)


def generate(client, **body):
    r = client.post("/generate", json={"return_logprob": True, "sampling_params": GREEDY, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_native_shapes_and_values(client, tokenizer, reference):
    ids = tokenizer.encode(PROMPT)
    out = generate(client, text=PROMPT, logprob_start_len=2, top_logprobs_num=3, token_ids_logprob=[ids[3], 9707],
                   return_text_in_logprobs=True)
    meta, ref = out["meta_info"], reference(ids + out["output_ids"])
    inp = meta["input_token_logprobs"]
    assert len(inp) == len(ids) - 2 and inp[0] == [None, ids[2], tokenizer.decode([ids[2]])]
    assert [t for _, t, _ in inp] == ids[2:] and [s for _, _, s in inp] == [tokenizer.decode([t]) for t in ids[2:]]
    want = [ref[p, ids[p + 1]].item() for p in range(2, len(ids) - 1)]
    assert [lp for lp, _, _ in inp[1:]] == pytest.approx(want, abs=1e-4)
    tops, id_lps = meta["input_top_logprobs"], meta["input_token_ids_logprobs"]
    assert tops[0] is None and id_lps[0] is None and len(tops) == len(id_lps) == len(inp)
    for p, top, chosen in zip(range(2, len(ids) - 1), tops[1:], id_lps[1:]):
        assert [t for _, t, _ in top] == ref[p].topk(3).indices.tolist()       # the true top 3
        assert [t for _, t, _ in chosen] == [ids[3], 9707]
        assert [lp for lp, _, _ in chosen] == pytest.approx([ref[p, ids[3]].item(), ref[p, 9707].item()], abs=1e-4)
    # output logprobs are unchanged by asking for prompt logprobs
    plain = generate(client, text=PROMPT)
    assert plain["output_ids"] == out["output_ids"] and "input_token_logprobs" not in plain["meta_info"]
    assert [lp for lp, _, _ in meta["output_token_logprobs"]] == pytest.approx(
        [lp for lp, _, _ in plain["meta_info"]["output_token_logprobs"]], abs=1e-4)


def test_per_prompt_start_batch_and_stream(client, tokenizer):
    texts = [PROMPT, "Hello there my friend"]
    outs = generate(client, text=texts, logprob_start_len=[0, -1])
    assert len(outs[0]["meta_info"]["input_token_logprobs"]) == len(tokenizer.encode(PROMPT))
    assert "input_token_logprobs" not in outs[1]["meta_info"]
    events = [json.loads(line[6:]) for line in client.post("/generate", json={
        "text": PROMPT, "return_logprob": True, "logprob_start_len": 0, "stream": True,
        "sampling_params": GREEDY}).text.splitlines() if line.startswith("data: {")]
    # cumulative events: the prompt's logprobs arrive with the first and stay the same
    assert all(e["meta_info"]["input_token_logprobs"] == events[0]["meta_info"]["input_token_logprobs"] for e in events)
    assert len(events[0]["meta_info"]["input_token_logprobs"]) == len(tokenizer.encode(PROMPT))


def test_radix_cache_hit_gives_the_same_prompt_logprobs(client):
    body = {"text": PROMPT + " again", "logprob_start_len": 0}
    first, second = generate(client, **body), generate(client, **body)
    assert second["meta_info"]["cached_tokens"] == 0          # nothing cached may stand in for logits
    a, b = ([lp for lp, _, _ in o["meta_info"]["input_token_logprobs"][1:]] for o in (first, second))
    assert a == pytest.approx(b, abs=1e-5)
    assert generate(client, text=PROMPT + " again")["meta_info"]["cached_tokens"] > 0


def test_scoring_with_zero_new_tokens(client, tokenizer):
    out = generate(client, text=PROMPT, logprob_start_len=0, sampling_params={"max_new_tokens": 0})
    assert out["output_ids"] == [] and len(out["meta_info"]["input_token_logprobs"]) == len(tokenizer.encode(PROMPT))


openai = pytest.importorskip("openai", reason="the dev extra installs the openai client")


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_echo_with_logprobs_in_openai_shape(oai, client, tokenizer):
    model = oai.models.list().data[0].id
    ids = tokenizer.encode(PROMPT)
    c = oai.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=2)
    choice, native = c.choices[0], generate(client, text=PROMPT, logprob_start_len=0)
    lp = choice.logprobs
    assert choice.text == PROMPT + native["text"]
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == len(ids) + 3
    assert lp.tokens[:len(ids)] == [tokenizer.decode([t]) for t in ids] and lp.token_logprobs[0] is None
    assert lp.top_logprobs[0] is None and all(len(t) <= 2 for t in lp.top_logprobs[1:])
    want = [x for x, _, _ in native["meta_info"]["input_token_logprobs"][1:] + native["meta_info"]["output_token_logprobs"]]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert lp.text_offset[0] == 0 and lp.text_offset[len(ids)] == len(PROMPT)
    # streamed: the prompt's logprobs lead the first chunk, then one token per delta
    chunks = list(oai.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0, echo=True,
                                         logprobs=2, stream=True))
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens]
    assert streamed == lp.tokens
    # echo without logprobs: the prompt text only; echo + max_tokens 0 scores the prompt (lm-eval style)
    c = oai.completions.create(model=model, prompt=PROMPT, max_tokens=2, temperature=0, echo=True)
    assert c.choices[0].text.startswith(PROMPT) and c.choices[0].logprobs is None
    c = oai.completions.create(model=model, prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert c.choices[0].text == PROMPT and len(c.choices[0].logprobs.token_logprobs) == len(ids)
