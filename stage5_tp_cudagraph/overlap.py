"""Overlap scheduling: the CPU prepares batch N+1 while the GPU still runs batch N.

    OverlapScheduler(runner, args, cache, tokenizer)    same API as stage 3's Scheduler

Stage 3's step is launch -> wait -> read tokens -> stop checks -> schedule the next one,
so the GPU idles while Python works. Here one `step()` does:

    1. schedule batch N+1 and launch it (forward + sampling, all enqueued on the GPU)
    2. wait for batch N's sampled tokens (already copied to pinned host memory), then run
       the host side of batch N: append tokens, stop checks, finish and free requests

Step 1 cannot know batch N's tokens, so they never leave the GPU on the way in: sampling
writes them into `next_token[row]` (one slot per req_to_token row) and a decode batch
gathers its input ids from there. Host-side knowledge lags one step:
  - a request that stops at step N is still in batch N+1; that extra token is dropped
    (`_commit` skips finished requests), its KV slot freed with the rest;
  - a request sure to hit max_new_tokens or the context length once its in-flight token
    lands is not decoded again (`_can_decode`), so the lag costs nothing there;
  - `generated = kv_len - len(input_ids)` counts in-flight tokens, so seeds and
    min_new_tokens see the same step number as in stage 3, and penalties add each
    request's in-flight token from `next_token` on the device.
First tokens do not lag: a batch that samples some request's first token (a prefill) is
committed in the step that launched it. Left in flight, that token would wait for the
next batch to be scheduled and launched (on CPU, a whole decode step) and that wait
would be in every request's time to first token; the price is that the next launch
finds the GPU idle, once per prefill, not once per decode step.
Why freeing at once is safe: everything runs on one CUDA stream, so a slot or row freed
now and handed to a later batch is written only by kernels queued after the in-flight
batch, which is done with it by then. Host buffers stay valid because PyTorch's pinned
allocator does not reuse a staging buffer before its copy has run.
Grammar rows (structured output) cannot be launched blind: the mask of step N+1 comes
from a matcher that must first accept token N, which is still on the device. Of the two
correct schemes, (a) commit batch N before launching N+1 whenever N holds a running grammar
row, and (b) leave grammar rows out of every other launch while their token is in flight,
this file does (a): it is a few lines, keeps grammar requests at one token per step, and
costs only the steps where a grammar request decodes (they run synchronously, as in stage
3); (b) would halve grammar requests' speed and split the batch bookkeeping in two.
On CPU, kernels finish before the call returns, so nothing really overlaps, but the
lagged bookkeeping is the same and is tested there against stage 3 token for token.
"""
from __future__ import annotations

import torch

from stage2_runner.forward_batch import ForwardBatch, make_batch, to_device
from stage2_runner.sampler import SampleOutput, SamplingInfo
from stage3_scheduler.request import Req, StepOutput
from stage3_scheduler.scheduler import Scheduler


class OverlapScheduler(Scheduler):
    def __init__(self, runner, args=None, cache=None, tokenizer=None):
        super().__init__(runner, args, cache, tokenizer)
        rows = self.pool.req_to_token.shape[0]
        self.next_token = torch.zeros(rows, dtype=torch.int64, device=runner.device)  # [rows]
        self.in_flight: tuple[list[Req], SampleOutput, object] | None = None
        self._launched = None

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        self._launched = None
        reports = []
        if self.in_flight is not None and self._grammar_in_flight():
            reports += self._commit_in_flight()           # synchronous step: masks need token N
        reports += self._run_batch()                      # schedule + launch N+1 (returns [])
        if self.in_flight is not None:
            reports += self._commit_in_flight()           # host side of batch N
        self.in_flight, self._launched = self._launched, None
        if self.in_flight is not None and self._first_tokens_in_flight():
            reports += self._commit_in_flight()           # a prefill's first tokens go out now
        reports, self.finished_unreported = self.finished_unreported + reports, []
        return [r.take_output() for r in dict.fromkeys(reports)]

    def has_work(self) -> bool:
        return super().has_work() or self.in_flight is not None

    def has_unreported(self) -> bool:
        return super().has_unreported() or self.in_flight is not None

    def _first_tokens_in_flight(self) -> bool:
        """Does the batch in flight sample a request's first token? (A request whose prefill
        was retracted and redone has output already: its next token is not a first.)"""
        return any(not r.output_ids and not r.finished for r in self.in_flight[0])

    def _grammar_in_flight(self) -> bool:
        """Does the batch in flight hold a grammar request that may be decoded next? (Never
        when no request ever had a grammar: then not even this loop runs.)"""
        return self.grammars is not None and any(r.grammar is not None and not r.finished for r in self.in_flight[0])

    # ---- launching ----------------------------------------------------------------
    def _can_decode(self, r: Req) -> bool:
        """Not if the token in flight surely ends it (length or context limit)."""
        generated = r.kv_len - len(r.input_ids) + 1        # with the in-flight one
        return (not r.prefilling and generated < r.params.max_new_tokens
                and r.kv_len + 1 < self.runner.context_length)

    def _decode_batch(self, reqs: list[Req], locs: torch.Tensor) -> ForwardBatch:
        fb = make_batch([r.row for r in reqs], [r.kv_len for r in reqs], [[0]] * len(reqs), locs,
                        self.runner.device)
        fb.input_ids = self.next_token[fb.req_pool_indices]   # last sampled token, maybe in flight
        return fb

    def _sample(self, reqs: list[Req], logits: torch.Tensor) -> list[Req]:
        out = self._launch_sample(reqs, logits)
        rows = to_device(torch.tensor([r.row for r in reqs]), logits.device)
        self.next_token[rows] = out.tokens
        self._launched = (reqs, *self._to_host(out))
        return []

    def _sampling_info(self, reqs: list[Req], logits: torch.Tensor, generated: list[int]) -> SamplingInfo:
        info = super()._sampling_info(reqs, logits, generated)
        if info.output_counts is not None:               # penalties: count in-flight tokens too
            lagging = [i for i, (r, n) in enumerate(zip(reqs, generated)) if n > len(r.output_ids)]
            if lagging:
                idx = to_device(torch.tensor([lagging, [reqs[i].row for i in lagging]]), logits.device)
                toks = self.next_token[idx[1]]
                info.output_counts.index_put_((idx[0], toks), torch.ones_like(toks, dtype=torch.float32),
                                              accumulate=True)
                info.seen_mask.index_put_((idx[0], toks), torch.ones_like(toks, dtype=torch.bool))
        return info

    @staticmethod
    def _to_host(out: SampleOutput):
        """Start the device -> pinned host copies; the event says when they are done."""
        if not out.tokens.is_cuda:
            return out, None
        host = SampleOutput(*(None if t is None else t.to("cpu", non_blocking=True)
                              for t in (out.tokens, out.logprobs, out.top_logprobs, out.top_ids,
                                        out.ids_logprobs)))
        event = torch.cuda.Event()
        event.record()
        return host, event

    # ---- results ------------------------------------------------------------------
    def _commit_in_flight(self) -> list[Req]:
        reqs, host, event = self.in_flight
        self.in_flight = None
        if event is not None:
            event.synchronize()                            # batch N's copies have landed
        return self._commit(reqs, host)
