"""The continuous-batching scheduler: one `step()` = admit, run one batch, sample, stop.

    add_request(req) / abort(rid) -> step() -> [StepOutput] per request that advanced

Each step runs either an EXTEND batch (newly admitted requests, or the next chunk of a
long prompt) or a DECODE batch (one token for every running request). Prefill goes
first, but right after a chunk the running requests get a decode step, so a long
prompt never stalls everyone else: chunks and decode steps alternate.

Admission reserves memory in advance: a request needs its uncomputed prompt tokens now
plus `max_new_tokens * new_token_ratio` later. The ratio starts at 0.7, decays every
decode step (requests often stop early), and jumps back after a retraction. When a
decode step still cannot get a slot for every running request, the request with the
fewest generated tokens (ties: the longest prompt) goes back to the waiting queue.

With a prefix cache, every extend hands its computed (page-aligned) tokens to the cache
at once, and a waiting request that shares a long prefix with a request of the batch
being built waits one step, so it reuses that prefix instead of recomputing it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from stage2_runner.forward_batch import make_batch, to_device
from stage2_runner.sampler import SampleOutput, SamplingInfo
from stage3_scheduler import prompt_logprobs, req_kv
from stage3_scheduler.policy import make_policy
from stage3_scheduler.admission import Admission
from stage3_scheduler.grammar import GrammarBackend, GrammarError, batch_bitmask, grammar_spec
from stage3_scheduler.prefix_cache import NoPrefixCache
from stage3_scheduler.request import Req, Status, StepOutput
from stage3_scheduler.stops import check_stop, min_tokens_mask
from stage3_scheduler.trace import Tracer

log = logging.getLogger(__name__)


@dataclass
class SchedulerArgs:
    schedule_policy: str = "fifo"
    chunked_prefill_size: int | None = None  # <= 0: no chunking; None: default_chunked_prefill_size
    max_prefill_tokens: int = 16384         # new tokens per extend batch
    init_new_token_ratio: float = 0.7
    min_new_token_ratio: float = 0.1
    new_token_ratio_decay: float = 0.002
    trace_path: str | None = None


def default_chunked_prefill_size(device) -> int:
    """Longest prefill chunk when none is given: larger on larger GPUs (as SGLang chooses).
    Each extend step has a cost that does not shrink with the chunk (a per-step trace of the
    offline benchmark on an H200 showed ~14 ms per 2048-token chunk and its interleaved decode
    step, for ~3 ms of GEMMs); 8192 halved that prefill phase (1.0 -> 0.54 s of ~6 s)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 2048
    gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    return 8192 if gib >= 60 else 4096 if gib >= 35 else 2048


class Scheduler(Admission):
    def __init__(self, runner, args: SchedulerArgs | None = None, cache=None, tokenizer=None):
        self.runner, self.args, self.tokenizer = runner, args or SchedulerArgs(), tokenizer
        if self.args.chunked_prefill_size is None:       # a copy: the caller's args stay as given
            self.args = replace(self.args, chunked_prefill_size=default_chunked_prefill_size(runner.device))
        self.pool = runner.pool
        self.cache = cache or NoPrefixCache(self.pool.allocator, self.pool.allocator.page_size)
        self.policy = make_policy(self.args.schedule_policy)
        self.max_running = runner.args.max_running_requests
        self.waiting: list[Req] = []
        self.running: list[Req] = []      # admitted; may still be mid-prefill (chunked)
        self.finished_unreported: list[Req] = []
        self.ratio = self.args.init_new_token_ratio
        self.total_retractions = self.cache_hit_tokens = self.forwarded_tokens = 0
        self.last_was_chunk = False
        self.tracer = Tracer(self.args.trace_path)
        self.grammars: GrammarBackend | None = None     # built on the first request with a grammar

    # ---- public API -------------------------------------------------------------
    def add_request(self, req: Req) -> None:
        if req.params.max_new_tokens == 0 and not prompt_logprobs.wants(req):
            req.finish({"type": "length", "length": 0})
            self.finished_unreported.append(req)
            return
        if (spec := grammar_spec(req.params)) is not None and req.grammar is None:
            try:
                req.grammar = self._grammar_backend().matcher(spec)
            except GrammarError as e:          # the server compiled it before: only offline callers get here
                req.finish({"type": "abort", "message": str(e)})
                self.finished_unreported.append(req)
                return
        self.waiting.append(req)

    def _grammar_backend(self) -> GrammarBackend:
        if self.grammars is None:
            self.grammars = GrammarBackend(self.tokenizer, self.runner.config.vocab_size, self.runner.eos_token_ids)
        return self.grammars

    def abort(self, rid: str) -> None:
        for req in self.waiting + self.running:
            if req.rid == rid and not req.finished:
                where = "in the waiting queue" if req in self.waiting else "while running"
                self._finish(req, {"type": "abort", "message": f"aborted {where}"}, keep_in_cache=False)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.finished_unreported)

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        reports = self._run_batch()
        reports, self.finished_unreported = self.finished_unreported + reports, []
        return [r.take_output() for r in dict.fromkeys(reports)]

    def has_unreported(self) -> bool:
        return bool(self.finished_unreported)

    def _run_batch(self) -> list[Req]:
        """Choose and run one batch; returns the requests that advanced."""
        prefilling = [r for r in self.running if r.prefilling]
        decoders = [r for r in self.running if self._can_decode(r)]
        if decoders and self.last_was_chunk:
            self.last_was_chunk = False
            return self._decode(decoders)                # interleave with a chunked prefill
        if batch := self._admit(prefilling):
            return self._extend(batch)
        return self._decode(decoders) if decoders else []

    def _can_decode(self, r: Req) -> bool:
        return not r.prefilling

    def flush_cache(self) -> bool:
        if self.waiting or self.running:
            return False
        self.cache.reset()
        return True

    def check_invariant(self) -> None:
        held = sum(self.pool.allocator.pages_of(len(r.slots)) - r.cached_len // self.pool.allocator.page_size
                   for r in self.running) * self.pool.allocator.page_size
        cached = self.cache.evictable_size() + self.cache.protected_size()
        free = self.pool.allocator.available_size()
        assert free + cached + held == self.pool.size, \
            f"KV leak: free {free} + cached {cached} + running {held} != pool {self.pool.size}"

    def stats(self) -> dict:
        held = self.pool.size - self.pool.allocator.available_size() - self.cache.evictable_size() \
            - self.cache.protected_size()
        return dict(num_running=len(self.running), num_waiting=len(self.waiting), kv_pool_size=self.pool.size,
                    kv_free_slots=self.pool.allocator.available_size(),
                    kv_cached_slots=self.cache.evictable_size() + self.cache.protected_size(),
                    kv_running_slots=held, total_retractions=self.total_retractions,
                    cache_hit_tokens=self.cache_hit_tokens, new_token_ratio=round(self.ratio, 4))

    # ---- running batches ------------------------------------------------------------
    def _extend(self, batch: list[tuple[Req, int]]) -> list[Req]:
        reqs = [r for r, _ in batch]
        toks = [r.all_ids[r.kv_len:r.kv_len + n] for r, n in batch]
        locs = torch.tensor([s for r, n in batch for s in r.slots[r.kv_len:r.kv_len + n]], dtype=torch.int64)
        fb = make_batch([r.row for r in reqs], [r.kv_len for r in reqs], toks, locs, self.runner.device)
        lp_plan = prompt_logprobs.plan(batch)          # None unless a request wants prompt logprobs
        if lp_plan is not None:
            fb.hidden_rows = to_device(torch.tensor(lp_plan.rows), self.runner.device)
        logits = self.runner.forward(fb)
        if lp_plan is not None:
            prompt_logprobs.compute(lp_plan, self.runner, fb.kept_hidden)
        for r, n in batch:
            r.kv_len += n
        done = [i for i, r in enumerate(reqs) if not r.prefilling]
        for r in reqs:                             # share what is computed so far, right away
            req_kv.cache_prefix(r, self.pool, self.cache)
        self.last_was_chunk = len(done) < len(reqs)
        self.forwarded_tokens += len(fb.input_ids)
        self.tracer.record(self, "extend", len(reqs), len(fb.input_ids))
        if len(done) < len(reqs):
            logits = logits[to_device(torch.tensor(done), logits.device)] if done else logits[:0]
        return self._sample([reqs[i] for i in done], logits) if done else []

    def _decode(self, reqs: list[Req]) -> list[Req]:
        reqs = self._make_room(reqs)
        if not reqs:
            return []
        locs = req_kv.grow_decode(reqs, self.pool, self.cache)
        fb = self._decode_batch(reqs, locs)
        # req_to_token[row, kv_len] = new slot, for the whole batch in one device op
        self.pool.req_to_token[fb.req_pool_indices, fb.positions] = fb.out_cache_loc.to(torch.int32)
        logits = self.runner.forward(fb)
        for r in reqs:
            r.kv_len += 1
        self.ratio = max(self.args.min_new_token_ratio, self.ratio - self.args.new_token_ratio_decay)
        self.forwarded_tokens += len(reqs)
        self.tracer.record(self, "decode", len(reqs), len(reqs))
        return self._sample(reqs, logits)

    def _decode_batch(self, reqs: list[Req], locs: torch.Tensor):
        """The decode ForwardBatch: each request's last token at position kv_len."""
        return make_batch([r.row for r in reqs], [r.kv_len for r in reqs], [[r.output_ids[-1]] for r in reqs],
                          locs, self.runner.device)

    def _make_room(self, reqs: list[Req]) -> list[Req]:
        """Retract until every decoding request can get its next slot."""
        P = self.pool.allocator.page_size
        while reqs:
            need = sum(P for r in reqs if len(r.slots) % P == 0)
            if need <= self.pool.allocator.available_size() + self.cache.evictable_size():
                return reqs
            if len(self.running) == 1:             # alone and still no room: the pool is too small
                self._finish(reqs[0], {"type": "length", "length": len(reqs[0].output_ids)}, True)
                log.warning("request %s stopped: KV pool too small for its context", reqs[0].rid)
                return []
            # Fewest generated tokens first (least work lost), then the longest prompt (frees most).
            victim = min(self.running, key=lambda r: (len(r.output_ids), -len(r.input_ids)))
            self._retract(victim)
            reqs = [r for r in reqs if r is not victim]
        return reqs

    def _retract(self, r: Req) -> None:
        req_kv.release(r, self.pool, self.cache, keep_in_cache=False)
        self.running.remove(r)
        r.status, r.prefill_len = Status.WAITING, 0
        r.num_retractions += 1
        self.total_retractions += 1
        self.waiting.insert(0, r)                  # first in line to come back
        self.ratio = self.args.init_new_token_ratio
        log.info("retracted %s (%d generated tokens)", r.rid, len(r.output_ids))

    # ---- sampling and stops ---------------------------------------------------------
    def _sample(self, reqs: list[Req], logits: torch.Tensor) -> list[Req]:
        return self._commit(reqs, self._launch_sample(reqs, logits))

    def _launch_sample(self, reqs: list[Req], logits: torch.Tensor) -> SampleOutput:
        """Sample on the device; nothing here waits for the GPU. A request has generated
        `kv_len - len(input_ids)` tokens before this one (in flight ones included, which is
        what stage 5's overlap needs: there `output_ids` lags one step)."""
        eos = self.runner.eos_token_ids
        generated = [r.kv_len - len(r.input_ids) for r in reqs]
        if mask := min_tokens_mask(reqs, eos, generated):
            idx = to_device(torch.tensor(mask).T.contiguous(), logits.device)          # [2, n]
            logits.index_put_(tuple(idx), torch.full((idx.shape[1],), float("-inf"), device=logits.device))
        return self.runner.sample(logits, self._sampling_info(reqs, logits, generated))

    def _sampling_info(self, reqs: list[Req], logits: torch.Tensor, generated: list[int]) -> SamplingInfo:
        for r in reqs:                # built once per request: asdict() per step costs ~10 us
            if r.sampling_dict is None:
                r.sampling_dict = dict(r.params.to_dict(), top_logprobs_num=r.top_logprobs_num)
        params = [r.sampling_dict for r in reqs]
        info = SamplingInfo.from_params(params, logits.shape[-1], logits.device,
                                        [(r.input_ids, r.output_ids) for r in reqs], steps=generated)
        info.need_logprobs = any(r.return_logprob for r in reqs)
        if self.grammars is not None:          # None: no request ever had a grammar, no work at all
            info.grammar_mask = batch_bitmask(reqs, generated, self.grammars.words, logits.device)
        if any(r.token_ids_logprob for r in reqs):        # [B, K], -1 pads (gathered, never reported)
            k = max(len(r.token_ids_logprob) for r in reqs)
            ids = [r.token_ids_logprob + [-1] * (k - len(r.token_ids_logprob)) for r in reqs]
            info.token_ids = to_device(torch.tensor(ids, dtype=torch.int64), logits.device)
        return info

    def _commit(self, reqs: list[Req], out: SampleOutput) -> list[Req]:
        """Host side of sampling: append each token, then check the stop conditions."""
        tokens = out.tokens.tolist()
        host = {k: getattr(out, k).tolist() if getattr(out, k) is not None else None
                for k in ("logprobs", "top_logprobs", "top_ids", "ids_logprobs")}
        eos, advanced = self.runner.eos_token_ids, []
        for i, (r, t) in enumerate(zip(reqs, tokens)):
            if r.finished:                 # finished while this batch ran (stage 5 overlap)
                continue
            advanced.append(r)
            if prompt_logprobs.wants(r) and not r.output_ids:     # the first output carries them
                prompt_logprobs.report(r)
            if r.params.max_new_tokens == 0:       # prompt logprobs only (scoring): generate nothing
                self._finish(r, {"type": "length", "length": 0}, keep_in_cache=True)
                continue
            r.output_ids.append(t)
            r.pending.append(t)
            if r.grammar is not None:
                r.grammar.accept(t)            # the matcher mirrors output_ids
            if r.return_logprob:
                self._record_logprobs(r, t, {k: v[i] if v is not None else None for k, v in host.items()})
            reason = check_stop(r, eos, self.tokenizer, self.runner.context_length)
            if reason:
                self._finish(r, reason, keep_in_cache=True)
        return advanced

    @staticmethod
    def _record_logprobs(r: Req, token: int, row: dict) -> None:
        """This request's row of the sampler's logprob outputs, in SGLang's (logprob, id) pairs."""
        r.pending_logprobs.append((row["logprobs"], token))
        r.output_logprobs.append((row["logprobs"], token))
        if row["top_ids"] is not None and r.top_logprobs_num:
            k = r.top_logprobs_num
            r.pending_top.append(list(zip(row["top_logprobs"][:k], row["top_ids"][:k])))
        if row["ids_logprobs"] is not None and r.token_ids_logprob:
            n = len(r.token_ids_logprob)
            r.pending_ids.append(list(zip(row["ids_logprobs"][:n], r.token_ids_logprob)))

    def _finish(self, r: Req, reason: dict, keep_in_cache: bool) -> None:
        r.finish(reason)
        if r in self.running:
            req_kv.release(r, self.pool, self.cache, keep_in_cache)
            self.running.remove(r)
        elif r in self.waiting:
            self.waiting.remove(r)
        self.finished_unreported.append(r)
