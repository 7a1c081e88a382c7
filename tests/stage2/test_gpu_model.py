"""GPU: the whole model in bf16 at Qwen3-0.6B size (dummy weights) agrees with HF.

Dummy weights are random, so the embedding (tied to lm_head) is scaled up after loading:
RMSNorm undoes the scale on the input side, and on the output side it widens the gaps
between logits, so greedy argmaxes are decided by the model, not by bf16 rounding."""
from pathlib import Path

import pytest
import torch

from helpers import random_prompts

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the H200 via device)")]
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "qwen3-0.6b"
STEPS = 8


@pytest.fixture(scope="module")
def hf_and_state():
    from transformers import AutoConfig, Qwen3ForCausalLM
    from stage1_model.config import load_config
    from stage1_model.weights import build_model, init_dummy
    ours = build_model(load_config(CONFIG_DIR), torch.bfloat16, "cuda")
    init_dummy(ours, seed=0)
    with torch.no_grad():
        ours.model.embed_tokens.weight.mul_(8.0)
    state = {k: v for k, v in ours.state_dict().items() if "rope" not in k}
    hf = Qwen3ForCausalLM(AutoConfig.from_pretrained(CONFIG_DIR, attn_implementation="sdpa"))
    hf = hf.to(device="cuda", dtype=torch.bfloat16).eval()
    hf.load_state_dict(state, strict=False)
    return hf, state


@pytest.mark.parametrize("backend", ["triton", "fa", "torch"])
def test_bf16_greedy_matches_hf(hf_and_state, backend):
    from stage2_runner.batch_generate import batch_generate
    from stage2_runner.model_runner import ModelRunner
    hf, state = hf_and_state
    runner = ModelRunner(model=str(CONFIG_DIR), load_format="dummy", device="cuda", dtype="bfloat16",
                         attention_backend=backend, max_total_tokens=8192, page_size=16)
    runner.model.load_state_dict(state, strict=False)
    prompts = random_prompts(151643, [5, 37, 120, 300], seed=3)
    ours = batch_generate(runner, prompts, STEPS)
    for p, got in zip(prompts, ours):
        ids = torch.tensor([p], device="cuda")
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, min_new_tokens=STEPS,
                          do_sample=False, pad_token_id=0, eos_token_id=None)[0, len(p):].tolist()
        assert got[:4] == ref[:4], (backend, len(p), got, ref)
    assert runner.pool.allocator.available_size() == runner.pool.size
