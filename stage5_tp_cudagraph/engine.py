"""The stage-5 Engine: stage 4's Engine with CUDA-graph decode and overlap scheduling.

    Engine(model="demo", disable_cuda_graph=False, cuda_graph_max_bs=256,
           disable_overlap=False, **stage-4 options).generate(...)

Two seams of the stage-3 Engine are filled: `make_runner` builds a `GraphModelRunner`
(decode batches replayed from CUDA graphs on a GPU) and `make_scheduler` an
`OverlapScheduler` (the CPU schedules batch N+1 while the GPU runs batch N);
`disable_overlap=True` keeps stage 3's synchronous Scheduler. Results are the same token
for token either way (tests/stage5 checks it); only the speed changes.
"""
from __future__ import annotations

from dataclasses import fields

from stage3_scheduler.scheduler import Scheduler
from stage4_radix.engine import Engine as Stage4Engine
from stage5_tp_cudagraph.overlap import OverlapScheduler
from stage5_tp_cudagraph.runner import GraphModelRunner, Stage5Args


class Engine(Stage4Engine):
    def __init__(self, model: str = "demo", **options):
        names = {f.name for f in fields(Stage5Args)}
        self.stage5 = Stage5Args(**{k: options.pop(k) for k in list(options) if k in names})
        if self.stage5.tp != 1:
            raise ValueError(f"tp={self.stage5.tp}: tensor parallelism is not built yet; use tp=1")
        super().__init__(model, **options)

    def make_runner(self, rargs):
        return GraphModelRunner(rargs, self.stage5)

    def make_scheduler(self, sargs):
        cls = Scheduler if self.stage5.disable_overlap else OverlapScheduler
        return cls(self.runner, sargs, self.cache, self.tokenizer)
