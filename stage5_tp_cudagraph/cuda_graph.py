"""Decode CUDA graphs: a whole decode step (every layer + the logits) replayed as one graph.

    graphs = DecodeGraphs(runner, max_bs=256)   # captures one graph per size, largest first
    logits = graphs.run(batch)                  # decode batch of B <= max_bs -> [B, vocab] fp32

Why: eagerly, a decode step launches thousands of small kernels and Python pays for each;
a replayed graph launches them all from the GPU's side for the cost of one call.

A graph replays fixed kernels on fixed addresses with fixed grids, so:
  - every input lives in a static buffer of max_bs rows; a batch of B is copied in and
    padded to the next captured size bs;
  - padded rows read a reserved dummy `req_to_token` row of length 1 and write only the
    pool's scratch slot (index pool.size), so they can never touch a real request's KV;
  - attention metadata is computed on the GPU from the static buffers (the Triton decode
    kernel derives its split lengths from seq_lens inside the kernel), never on the host.
All graphs share one memory pool: only one replays at a time, so their intermediates may
overlap. On CPU there are no graphs, but `run` still pads into the static buffers and runs
eagerly from them, so the padding logic is tested on every machine.
"""
from __future__ import annotations

import logging
import time

import torch

from stage2_runner.forward_batch import ForwardBatch, make_batch
from stage2_runner.model_runner import ModelRunner

log = logging.getLogger(__name__)


def capture_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 to 64, then every 16: padding wastes at most ~20% rows."""
    sizes = [1, 2, 4, 8, *range(16, 65, 8), *range(80, max_bs + 1, 16)]
    return sorted({s for s in sizes if s <= max_bs} | {max_bs})


class DecodeGraphs:
    def __init__(self, runner, max_bs: int, use_graphs: bool | None = None):
        self.runner, self.pool = runner, runner.pool
        self.max_bs, self.sizes = max_bs, capture_sizes(max_bs)
        self.use_graphs = runner.device.type == "cuda" if use_graphs is None else use_graphs
        # Reserve the last req_to_token row for padded requests: position 0 -> scratch slot.
        self.dummy_row = self.pool.req_to_token.shape[0] - 1
        self.pool.free_rows.remove(self.dummy_row)
        self.scratch_slot = self.pool.size
        self.pool.req_to_token[self.dummy_row, 0] = self.scratch_slot
        self._alloc_buffers(runner.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}      # bs -> static logits [bs, vocab]
        if self.use_graphs:
            self.capture()

    def _alloc_buffers(self, device) -> None:
        n, i32 = self.max_bs, dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.out_cache_loc = torch.full((n,), self.scratch_slot, dtype=torch.int64, device=device)
        self.req_pool_indices = torch.full((n,), self.dummy_row, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, **i32)
        self.prefix_lens = torch.zeros(n, **i32)             # decode: seq_len - 1 (unused by kernels)
        self.extend_lens = torch.ones(n, **i32)
        self.extend_start_loc = torch.arange(n, **i32)

    def static_batch(self, bs: int, seq_lens_cpu: list[int]) -> ForwardBatch:
        """A decode ForwardBatch made of views of the static buffers (host lists for the
        torch backend, which loops over requests on CPU)."""
        return ForwardBatch("decode", self.input_ids[:bs], self.positions[:bs], self.out_cache_loc[:bs],
                            self.req_pool_indices[:bs], self.seq_lens[:bs], self.prefix_lens[:bs],
                            self.extend_lens[:bs], self.extend_start_loc[:bs],
                            seq_lens_cpu, [s - 1 for s in seq_lens_cpu], [1] * bs)

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        model = self.runner.model
        hidden = model(batch.input_ids, batch.positions, self.runner.backend, batch)   # [bs, hidden]
        return model.compute_logits(hidden)                                           # [bs, vocab]

    @torch.inference_mode()
    def warm_up_extend(self, tokens: int = 16) -> None:
        """One eager prefill in the dummy row, writing only the scratch slot: it compiles the
        extend-path Triton kernels now, not during a user's first request (whose TTFT would
        pay ~0.5 s for it). It reads real slots (the row's unset entries) but writes none."""
        loc = torch.full((tokens,), self.scratch_slot, dtype=torch.int64)
        batch = make_batch([self.dummy_row], [0], [[0] * tokens], loc, self.runner.device)
        ModelRunner.forward(self.runner, batch)

    @torch.inference_mode()
    def capture(self) -> None:
        t0, free0 = time.perf_counter(), torch.cuda.mem_get_info()[0]
        self.warm_up_extend()
        mempool = None
        for bs in reversed(self.sizes):                  # largest first: the pool fits the rest
            batch = self.static_batch(bs, [1] * bs)
            for _ in range(2):                           # warm-up: Triton JIT, cuBLAS workspaces
                self._forward(batch)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=mempool):
                self.outputs[bs] = self._forward(batch)
            mempool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        used = (free0 - torch.cuda.mem_get_info()[0]) / 2**30
        log.info("CUDA graphs: captured %d decode batch sizes (1..%d) in %.1f s, %.2f GiB",
                 len(self.sizes), self.max_bs, time.perf_counter() - t0, used)

    @torch.inference_mode()
    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Copy a decode batch into the static buffers, pad, replay; returns [B, vocab]."""
        B = batch.batch_size
        bs = next(s for s in self.sizes if s >= B)
        self.input_ids[:B].copy_(batch.input_ids)
        self.positions[:B].copy_(batch.positions)
        self.out_cache_loc[:B].copy_(batch.out_cache_loc)
        self.req_pool_indices[:B].copy_(batch.req_pool_indices)
        self.seq_lens[:B].copy_(batch.seq_lens)
        if bs > B:                                       # rows left over from a bigger batch
            self.input_ids[B:bs].zero_()
            self.positions[B:bs].zero_()
            self.out_cache_loc[B:bs].fill_(self.scratch_slot)
            self.req_pool_indices[B:bs].fill_(self.dummy_row)
            self.seq_lens[B:bs].fill_(1)
        if self.use_graphs:
            self.graphs[bs].replay()
            return self.outputs[bs][:B]
        return self._forward(self.static_batch(bs, batch.seq_lens_cpu + [1] * (bs - B)))[:B]

    def close(self) -> None:
        """Drop the graphs (before the process group, under tensor parallelism)."""
        self.graphs.clear()
        self.outputs.clear()
