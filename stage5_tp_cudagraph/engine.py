"""The stage-5 Engine: stage 4's Engine with CUDA-graph decode, overlap scheduling and
tensor parallelism.

    Engine(model="demo", disable_cuda_graph=False, cuda_graph_max_bs=256,
           disable_overlap=False, tp=1, **stage-4 options).generate(...)
    engine.close()              # with tp > 1: stops the other ranks, leaves the process group

Three seams of the stage-3 Engine are filled: `make_runner` builds a `GraphModelRunner`
(decode batches replayed from CUDA graphs on a GPU; a sharded model under TP) and
`make_scheduler` an `OverlapScheduler` (the CPU schedules batch N+1 while the GPU runs
batch N); `disable_overlap=True` keeps stage 3's synchronous Scheduler. Results are the
same token for token either way (tests/stage5 checks it); only the speed changes.

With `tp=N`, this process is rank 0: it spawns ranks 1..N-1 (tp_worker.py), which build
the same Engine and follow rank 0's scheduler step by step. The server passes `tp_rank`
instead: it starts one process per rank itself. On GPUs rank r uses `cuda:<r mod ranks
per node>`; on CPU the ranks share the cores and talk over gloo.
"""
from __future__ import annotations

import atexit
import contextlib
from dataclasses import asdict, fields, replace

import torch

from stage2_runner.model_runner import RunnerArgs
from stage3_scheduler.scheduler import Scheduler, default_chunked_prefill_size
from stage4_radix.engine import Engine as Stage4Engine
from stage5_tp_cudagraph.overlap import OverlapScheduler
from stage5_tp_cudagraph.parallel import destroy_tp, free_port, init_tp
from stage5_tp_cudagraph.runner import GraphModelRunner, Stage5Args
from stage5_tp_cudagraph.tp_worker import CommandBroadcaster, spawn_followers, stop_followers


class Engine(Stage4Engine):
    def __init__(self, model: str = "demo", **options):
        names = {f.name for f in fields(Stage5Args)}
        self.stage5 = Stage5Args(**{k: options.pop(k) for k in list(options) if k in names})
        self.tp, self.followers = None, []
        try:
            if self.stage5.tp > 1:
                options = self._join_tp(model, options)
            super().__init__(model, **options)
        except BaseException:
            self.close()
            raise
        if self.tp is not None and self.tp.rank == 0:
            atexit.register(self.close)

    def _join_tp(self, model: str, options: dict) -> dict:
        """Start the other ranks (offline) and join the process group; returns the options
        with this rank's device."""
        s5 = self.stage5
        if s5.tp % s5.nnodes:
            raise ValueError(f"tp={s5.tp} must be a multiple of nnodes={s5.nnodes}")
        per_node = s5.tp // s5.nnodes
        rank = s5.tp_rank
        if rank is None:                         # offline: we are rank 0 and start the others
            if s5.nnodes != 1:
                raise ValueError("an offline Engine runs on one node; serve with --nnodes for several")
            s5.dist_init_addr = s5.dist_init_addr or f"127.0.0.1:{free_port()}"
            self.followers = spawn_followers(model, options, asdict(s5), range(1, s5.tp))
            rank = 0
        elif s5.dist_init_addr is None:
            raise ValueError("tp_rank given without dist_init_addr (where rank 0 listens)")
        device = torch.device(RunnerArgs(device=options.get("device")).resolved_device())
        if device.type == "cuda":
            device = torch.device("cuda", rank % per_node)
            options = dict(options, device=str(device))
        else:                                    # CPU ranks of one node share its cores
            torch.set_num_threads(max(1, torch.get_num_threads() // per_node))
        self.tp = init_tp(rank, s5.tp, s5.dist_init_addr, device, s5.dist_timeout,
                          # peer-mapped memory does not span machines: one node only
                          custom_all_reduce=not s5.disable_custom_all_reduce and s5.nnodes == 1)
        return options

    def make_runner(self, rargs):
        return GraphModelRunner(rargs, self.stage5, tp=self.tp)

    def make_scheduler(self, sargs):
        if sargs.chunked_prefill_size is None and self.tp is not None:
            # Every rank must cut the same chunks: the smallest default among their devices.
            chunk = self.tp.min_int(default_chunked_prefill_size(self.runner.device))
            sargs = replace(sargs, chunked_prefill_size=chunk)
        cls = Scheduler if self.stage5.disable_overlap else OverlapScheduler
        sched = cls(self.runner, sargs, self.cache, self.tokenizer)
        if self.tp is not None and self.tp.rank == 0:
            return CommandBroadcaster(sched, self.tp)     # ranks > 0 follow its commands
        return sched

    def close(self) -> None:
        """Stop the followers, drop the CUDA graphs, then leave the process group. Idempotent."""
        if self.tp is not None:
            sched = getattr(self, "scheduler", None)
            if isinstance(sched, CommandBroadcaster):
                with contextlib.suppress(RuntimeError):    # a follower may be gone already
                    sched.stop()
            runner = getattr(self, "runner", None)
            if runner is not None:
                runner.close()
            destroy_tp()
            self.tp = None
            atexit.unregister(self.close)
        stop_followers(self.followers)
        self.followers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
