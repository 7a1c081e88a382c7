"""Structured output and prompt logprobs on a real GPU, through the stage-5 Engine (CUDA
graphs, overlap, fused model, Triton attention; marker gpu, skipped without CUDA).

The CPU tests check both features in depth; here the GPU-only parts are exercised: the
grammar bitmask applied on the device next to plain rows replayed from a graph (and the
overlap scheduler's synchronous step for grammar rows), and prompt logprobs computed from
the fused model's hidden states in row blocks, compared with stage 1's plain forward pass.
"""
import json
import re

import pytest
import torch

from helpers import random_prompts
from stage1_model.generate import forward_logits
from stage1_model.model_source import demo_model_dir
from stage1_model.weights import load_model
from stage5_tp_cudagraph.engine import Engine

pytestmark = [pytest.mark.stage5, pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}},
          "required": ["ok", "color"], "additionalProperties": False}


@pytest.fixture(scope="module")
def eng():
    e = Engine(model="demo", device="cuda", dtype="float32", max_total_tokens=20000, cuda_graph_max_bs=16)
    yield e
    e.close()


def test_grammar_rows_beside_graph_replayed_plain_rows(eng):
    plain = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
    prompts = ["Hello", "The weather today is", "Once upon a time", "1 2 3"]
    alone = eng.generate(prompts, plain)
    mixed = eng.generate(prompts * 2, [plain] * 4 + [dict(plain, regex="(yes|no)"), dict(plain, json_schema=SCHEMA),
                                                     dict(plain, regex="[0-9]{3}-[0-9]{4}"),
                                                     dict(plain, json_schema=json.dumps(SCHEMA))])
    assert [o["output_ids"] for o in mixed[:4]] == [o["output_ids"] for o in alone]   # neighbours change nothing
    assert re.fullmatch("(yes|no)", mixed[4]["text"]) and re.fullmatch("[0-9]{3}-[0-9]{4}", mixed[6]["text"])
    for o in (mixed[5], mixed[7]):
        obj = json.loads(o["text"])
        assert isinstance(obj["ok"], bool) and obj["color"] in ("red", "green", "blue")


def test_prompt_logprobs_equal_a_plain_forward(eng):
    ids = random_prompts(151000, [37, 5, 300], seed=3)
    outs = eng.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": 2},
                        return_logprob=True, logprob_start_len=0, top_logprobs_num=2)
    ref_model = load_model(str(demo_model_dir()), torch.float32, "cuda", "auto")
    for prompt, out in zip(ids, outs):
        ref = torch.log_softmax(forward_logits(ref_model, prompt).float(), dim=-1)
        entries = out["meta_info"]["input_token_logprobs"]
        assert len(entries) == len(prompt) and entries[0][0] is None
        got = torch.tensor([lp for lp, _, _ in entries[1:]])
        want = torch.tensor([ref[p, prompt[p + 1]].item() for p in range(len(prompt) - 1)])
        torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
        tops = out["meta_info"]["input_top_logprobs"]
        assert [[t for _, t, _ in top] for top in tops[1:]] == ref[:-1].topk(2).indices.tolist()
