"""token_ids_logprob: the logprobs of chosen ids at every output position, in SGLang's shape."""
import pytest

pytestmark = pytest.mark.server
HELLO = 9707
PROMPT = "The capital of France is"


def generate(client, **body):
    r = client.post("/generate", json={"text": PROMPT, "return_logprob": True,
                                       "sampling_params": {"temperature": 0, "max_new_tokens": 3}, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_ids_logprobs_match_the_sampled_tokens_logprobs(client):
    plain = generate(client)
    first, second = plain["output_ids"][:2]
    out = generate(client, token_ids_logprob=[first, HELLO, second])
    assert out["output_ids"] == plain["output_ids"]
    per_pos = out["meta_info"]["output_token_ids_logprobs"]
    assert len(per_pos) == 3 and all([t for _, t, _ in pos] == [first, HELLO, second] for pos in per_pos)
    # the sampled token's own logprob, reported both ways, is the same number
    assert per_pos[0][0][0] == pytest.approx(out["meta_info"]["output_token_logprobs"][0][0], abs=1e-5)
    assert per_pos[1][2][0] == pytest.approx(out["meta_info"]["output_token_logprobs"][1][0], abs=1e-5)
    assert all(lp <= 0 for pos in per_pos for lp, _, _ in pos)


def test_bad_token_ids_logprob_is_400(client):
    for body in [{"token_ids_logprob": [1], "return_logprob": False}, {"token_ids_logprob": [10**9]},
                 {"token_ids_logprob": ["a"]}, {"token_ids_logprob": [[1], [2]]}]:
        r = client.post("/generate", json={"text": PROMPT, "return_logprob": True, **body})
        assert r.status_code == 400 and "token_ids_logprob" in r.json()["error"]["message"], (body, r.text)
    r = client.post("/v1/completions", json={"prompt": "hi", "token_ids_logprob": [1]})
    assert r.status_code == 400 and "native" in r.json()["error"]["message"]
