"""The stage-5 ModelRunner: stage 2's runner with decode batches replayed from CUDA graphs.

    GraphModelRunner(RunnerArgs(...), Stage5Args(...)).forward(batch) -> [B, vocab] fp32

Two seams of stage 2 are filled. Weights: on a GPU `load_model` builds the fused twin of
the stage-1 model (fused_model.py: merged q/k/v and gate/up GEMMs, Triton norm/RoPE/SiLU
kernels, ~12 launches per layer instead of ~65). Decode forward: `forward` sends a decode
batch of at most `cuda_graph_max_bs` requests to `DecodeGraphs.run`; extends and larger
decode batches run eagerly, exactly as in stage 2. Graphs need a backend whose decode
reads nothing on the host: the Triton one. With another backend, on CPU, or with
`disable_cuda_graph`, every batch runs eagerly.

Tensor parallelism (`tp`: this rank's process groups, from `parallel.init_tp`): the model
is built with `TPLayerFactory` (this rank's shard of every layer, tp_layers.py), the KV
pool gets the smallest slot count of all ranks (every rank must admit the same requests),
and the sampled ids are broadcast from rank 0, so the ranks can never drift apart. Every
rank captures the same graph sizes in the same order (they depend only on max_bs), so
their NCCL all-reduces pair up; `close()` drops the graphs before the process group goes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from stage1_model.weights import build_model
from stage2_runner.forward_batch import ForwardBatch
from stage2_runner.model_runner import ModelRunner, RunnerArgs
from stage2_runner.sampler import SampleOutput, SamplingInfo
from stage5_tp_cudagraph.cuda_graph import DecodeGraphs
from stage5_tp_cudagraph.fused_model import fill_weights, load_fused_model
from stage5_tp_cudagraph.parallel import TPState
from stage5_tp_cudagraph.tp_layers import TPLayerFactory

log = logging.getLogger(__name__)


@dataclass
class Stage5Args:
    disable_cuda_graph: bool = False
    cuda_graph_max_bs: int = 256           # largest decode batch replayed from a graph
    disable_overlap: bool = False          # True: stage 3's synchronous scheduler loop
    disable_fused_kernels: bool = False    # True: stage 1's modules (fused ones need CUDA)
    tp: int = 1                            # tensor-parallel ranks (engine.py starts them)
    nnodes: int = 1                        # machines the tp ranks are spread over
    node_rank: int = 0
    dist_init_addr: str | None = None      # "HOST:PORT" where rank 0 listens (default: a free local port)
    dist_timeout: float = 600.0            # seconds to wait for every rank to join
    disable_custom_all_reduce: bool = False  # True: NCCL for every all-reduce (no one-shot path)
    tp_rank: int | None = None             # None: this process is rank 0 and starts the others


class GraphModelRunner(ModelRunner):
    def __init__(self, args: RunnerArgs, stage5: Stage5Args | None = None, factory=None, tp: TPState | None = None):
        self.stage5 = stage5 = stage5 or Stage5Args()
        self.tp = tp                    # this rank's process groups (parallel.py); None: one process
        super().__init__(args, factory)
        self.graphs: DecodeGraphs | None = None
        why_not = self._why_no_graphs(stage5)
        if why_not:
            log.info("CUDA graphs: off (%s)", why_not)
            return
        max_bs = min(stage5.cuda_graph_max_bs, args.max_running_requests)
        self.graphs = DecodeGraphs(self, max_bs)

    def load_model(self, factory):
        """On a GPU, the fused twin of the stage-1 model (merged GEMMs, Triton kernels);
        under TP, either one built from this rank's shards."""
        if self.tp is not None and factory is None:
            factory = TPLayerFactory(self.config, self.tp)
        if self.device.type == "cuda" and not self.stage5.disable_fused_kernels:
            return load_fused_model(self.model_path, self.dtype, self.device, self.args.load_format, factory,
                                    self.config)
        if self.tp is None:
            return super().load_model(factory)
        model = build_model(self.config, self.dtype, self.device, factory)
        fill_weights(model, self.model_path, self.args.load_format, self.config, self.dtype, self.device)
        return model

    def profile_num_slots(self, kv_heads: int) -> int:
        """Every rank runs the same batches, so all get the pool of the tightest one."""
        slots = super().profile_num_slots(kv_heads)
        return slots if self.tp is None else self.tp.min_int(slots)

    def sample(self, logits, info: SamplingInfo) -> SampleOutput:
        out = super().sample(logits, info)
        if self.tp is not None:        # one tiny collective: the ranks' ids can never differ
            self.tp.broadcast(out.tokens)
        return out

    def close(self) -> None:
        """Drop the CUDA graphs (before the process group, which their all-reduces use)."""
        if self.graphs is not None:
            self.graphs.close()

    def _why_no_graphs(self, stage5: Stage5Args) -> str | None:
        if stage5.disable_cuda_graph:
            return "disable_cuda_graph"
        if self.device.type != "cuda":
            return "no CUDA device"
        if self.backend.name != "triton":
            return f"attention backend {self.backend.name!r} reads host values in decode; use triton"
        if stage5.cuda_graph_max_bs < 1:
            return "cuda_graph_max_bs < 1"
        return None

    def forward(self, batch: ForwardBatch):
        # A one-token-per-request extend that wants prompt logprobs needs its hidden states:
        # the graph returns logits only, so that rare batch runs eagerly.
        if (self.graphs is not None and batch.is_decode and batch.batch_size <= self.graphs.max_bs
                and batch.hidden_rows is None):
            return self.graphs.run(batch)
        return super().forward(batch)
