"""The offline Engine: SGLang's `Engine(...).generate(...)`, in-process, no server.

    Engine(model="demo", **options).generate(prompt | [prompts] | input_ids=..., sampling_params)
      -> {"text", "output_ids", "meta_info": {id, finish_reason, prompt_tokens,
          completion_tokens, cached_tokens, e2e_latency}}   (a list for a list of prompts)

Options are RunnerArgs and SchedulerArgs fields. Stage 3 runs without a prefix cache;
stage 4's Engine overrides `make_cache` to plug in the radix tree.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import fields

from stage1_model.model_source import tokenizer_dir
from stage1_model.tokenizer import load_tokenizer
from stage2_runner.model_runner import ModelRunner, RunnerArgs
from stage3_scheduler.prefix_cache import NoPrefixCache
from stage3_scheduler.request import Req
from stage3_scheduler.sampling_params import SamplingParams
from stage3_scheduler.scheduler import Scheduler, SchedulerArgs
from stage3_scheduler.stops import ids_for_text, trim_stop_string

_ids = itertools.count()


def split_options(options: dict) -> tuple[RunnerArgs, SchedulerArgs, dict]:
    rnames = {f.name for f in fields(RunnerArgs)}
    snames = {f.name for f in fields(SchedulerArgs)}
    rest = {k: v for k, v in options.items() if k not in rnames | snames}
    return (RunnerArgs(**{k: v for k, v in options.items() if k in rnames}),
            SchedulerArgs(**{k: v for k, v in options.items() if k in snames}), rest)


class Engine:
    def __init__(self, model: str = "demo", **options):
        rargs, sargs, rest = split_options({"model": model, **options})
        self.disable_radix_cache = rest.pop("disable_radix_cache", False)
        skip_tokenizer_init = rest.pop("skip_tokenizer_init", False)    # ids in, ids out; no stop strings
        if rest:
            raise TypeError(f"unknown Engine options: {sorted(rest)}")
        self.runner = self.make_runner(rargs)
        self.tokenizer = None if skip_tokenizer_init else load_tokenizer(tokenizer_dir(self.runner.model_path))
        self.cache = self.make_cache()
        self.scheduler = self.make_scheduler(sargs)

    # Seams for later stages: which runner, prefix cache and scheduler the Engine builds.
    def make_runner(self, rargs: RunnerArgs) -> ModelRunner:
        return ModelRunner(rargs)

    def make_scheduler(self, sargs: SchedulerArgs) -> Scheduler:
        return Scheduler(self.runner, sargs, self.cache, self.tokenizer)

    def make_cache(self):
        return NoPrefixCache(self.runner.pool.allocator, self.runner.pool.allocator.page_size)

    # ---- requests -------------------------------------------------------------------
    def _make_reqs(self, prompt, input_ids, sampling_params, return_logprob, logprob_start_len=-1,
                   top_logprobs_num=0):
        single = isinstance(prompt, str) or (input_ids is not None and input_ids and isinstance(input_ids[0], int))
        if input_ids is None:
            if self.tokenizer is None:
                raise ValueError("skip_tokenizer_init: no tokenizer is loaded; pass input_ids")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            input_ids = [self.tokenizer.encode(p) for p in prompts]
        elif single:
            input_ids = [input_ids]
        plist = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(input_ids)
        reqs = []
        if any(len(ids) == 0 for ids in input_ids):
            raise ValueError("empty prompt: every request needs at least one input token")
        for ids, p in zip(input_ids, plist):
            params = p if isinstance(p, SamplingParams) else SamplingParams.from_dict(p, self.runner.config.vocab_size)
            if not -1 <= logprob_start_len < len(ids):
                raise ValueError(f"logprob_start_len {logprob_start_len}: must be -1 or less than the prompt length")
            reqs.append(Req(f"engine-{next(_ids)}", list(ids), params, return_logprob=return_logprob,
                            logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num))
        return reqs, single

    def result(self, r: Req, t0: float) -> dict:
        ids = ids_for_text(r.output_ids, r.params, r.finish_reason)
        text = self.tokenizer.decode(ids, skip_special_tokens=r.params.skip_special_tokens) if self.tokenizer else ""
        out = {"text": trim_stop_string(text, r, r.finish_reason), "output_ids": list(r.output_ids),
               "meta_info": {"id": r.rid, "finish_reason": r.finish_reason, "prompt_tokens": len(r.input_ids),
                             "completion_tokens": len(r.output_ids), "cached_tokens": r.cached_tokens,
                             "e2e_latency": time.perf_counter() - t0}}
        if r.return_logprob:
            out["meta_info"]["output_token_logprobs"] = [[lp, t, None] for lp, t in r.output_logprobs]
        if r.return_logprob and r.logprob_start_len >= 0:     # SGLang's triples; the first has no logprob
            meta, (tokens, tops, _) = out["meta_info"], r.input_report
            meta["input_token_logprobs"] = [[lp, t, None] for lp, t in tokens]
            if r.top_logprobs_num:
                meta["input_top_logprobs"] = [None if k is None else [[lp, t, None] for lp, t in k] for k in tops]
        return out

    def generate(self, prompt=None, sampling_params=None, input_ids=None, return_logprob=False, stream=False,
                 logprob_start_len=-1, top_logprobs_num=0):
        """logprob_start_len >= 0 (with return_logprob): meta_info.input_token_logprobs too."""
        reqs, single = self._make_reqs(prompt, input_ids, sampling_params, return_logprob, logprob_start_len,
                                       top_logprobs_num)
        if stream:
            return self._stream(reqs)
        t0 = time.perf_counter()
        for r in reqs:
            self.scheduler.add_request(r)
        self.run_until_done(reqs)
        results = [self.result(r, t0) for r in reqs]
        return results[0] if single else results

    def run_until_done(self, reqs: list[Req]) -> None:
        while not all(r.finished for r in reqs):
            self.scheduler.step()
        while self.scheduler.has_unreported():          # drain the reports of finished requests
            self.scheduler.step()

    def _stream(self, reqs: list[Req]):
        t0 = time.perf_counter()
        for r in reqs:
            self.scheduler.add_request(r)
        while not all(r.finished for r in reqs):
            outs = self.scheduler.step()
            for out in outs:
                r = next((q for q in reqs if q.rid == out.rid), None)
                if r is not None and (out.new_token_ids or out.finished):
                    yield self.result(r, t0)

    def flush_cache(self) -> bool:
        return self.scheduler.flush_cache()
