"""ModelRunner: the stage-1 model + a paged KV pool + an attention backend + the sampler.

Contract: `ModelRunner(model="demo", ...)` loads weights, then sizes the KV pool from
what memory is left (GPU: `gpu_memory_utilization` of the card for weights + KV; CPU: a
byte budget) unless `max_total_tokens` fixes it. `forward(batch)` runs one extend or
decode step and returns the logits of each request's last new token, [B, vocab] float32;
if `batch.hidden_rows` is set, it also leaves those rows' hidden states in
`batch.kept_hidden` (prompt logprobs: the caller turns them into logprobs block by block).
The runner allocates nothing per request: callers own slots and req_to_token rows.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from stage1_model.config import load_config
from stage1_model.layers import LayerFactory
from stage1_model.model_source import generation_eos_ids, resolve_model_path
from stage1_model.weights import load_model
from stage2_runner.attention import make_backend
from stage2_runner.forward_batch import ForwardBatch
from stage2_runner.kv_cache import KVPool
from stage2_runner.sampler import SampleOutput, SamplingInfo, sample

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RunnerArgs:
    model: str = "demo"
    device: str | None = None               # default: cuda if available
    dtype: str = "auto"                     # bf16 on GPU, float32 on CPU
    attention_backend: str | None = None    # default: triton on GPU, torch on CPU
    page_size: int = 1
    gpu_memory_utilization: float = 0.85
    cpu_kv_cache_gb: float = 1.0
    max_total_tokens: int | None = None     # fixes the pool size (tests, retraction demos)
    max_running_requests: int = 256
    context_length: int | None = None
    load_format: str = "auto"
    seed: int = 0

    def resolved_device(self) -> str:
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float32 if self.resolved_device() == "cpu" else torch.bfloat16
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {self.dtype!r}")
        return DTYPES[self.dtype]


class ModelRunner:
    def __init__(self, args: RunnerArgs | None = None, factory: LayerFactory | None = None, **kw):
        self.args = args = args or RunnerArgs(**kw)
        self.device = torch.device(args.resolved_device())
        self.dtype = args.resolved_dtype()
        torch.manual_seed(args.seed)
        self.model_path = resolve_model_path(args.model)
        self.config = cfg = load_config(self.model_path)
        self.eos_token_ids = generation_eos_ids(self.model_path, cfg)
        self.model = self.load_model(factory)
        self.context_length = min(args.context_length or cfg.max_position_embeddings, cfg.max_position_embeddings)
        layer0 = self.model.model.layers[0].self_attn
        num_slots = self.profile_num_slots(layer0.num_kv_heads)
        self.pool = KVPool(cfg.num_hidden_layers, num_slots, layer0.num_kv_heads, cfg.head_dim, self.dtype,
                           self.device, args.page_size, args.max_running_requests + 1, self.context_length + 1)
        name = args.attention_backend or ("triton" if self.device.type == "cuda" else "torch")
        self.backend = make_backend(name, self.pool, layer0.num_heads, layer0.num_kv_heads, cfg.head_dim)
        log.info("KV cache: %d token slots (page_size %d), context length %d",
                 self.pool.size, args.page_size, self.context_length)

    def load_model(self, factory: LayerFactory | None):
        """The weights-loading seam: stage 5 loads a fused twin of the same model here."""
        return load_model(self.model_path, self.dtype, self.device, self.args.load_format, factory, self.config)

    def profile_num_slots(self, kv_heads: int) -> int:
        per_slot = KVPool.bytes_per_slot(self.config.num_hidden_layers, kv_heads, self.config.head_dim, self.dtype)
        if self.args.max_total_tokens:
            return self.args.max_total_tokens
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free                                   # weights + runtime so far
            budget = total * self.args.gpu_memory_utilization - used
        else:
            budget = self.args.cpu_kv_cache_gb * 2**30
        slots = int(budget // per_slot)
        if slots < 16:
            raise RuntimeError(f"not enough memory for the KV cache ({budget / 2**30:.2f} GiB budget); "
                               "raise gpu_memory_utilization or use a smaller model")
        return slots

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        hidden = self.model(batch.input_ids, batch.positions, self.backend, batch)   # [T, hidden]
        if batch.hidden_rows is not None:          # prompt logprobs asked for (rare): keep N rows
            batch.kept_hidden = hidden[batch.hidden_rows]                            # [N, hidden]
        return self.model.compute_logits(hidden[batch.last_token_index])            # [B, vocab]

    def sample(self, logits: torch.Tensor, info: SamplingInfo) -> SampleOutput:
        return sample(logits, info)
