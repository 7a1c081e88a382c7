"""A request's state through its lifecycle, and what one scheduler step reports for it.

    WAITING --admitted--> RUNNING --stop/length/abort--> FINISHED
       ^                     |
       +----retracted--------+   (KV freed, output kept; resumes by recomputing)

A request always knows its full token sequence (prompt + output so far); after a
retraction its "prompt" for the next prefill is that whole sequence.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum


from stage3_scheduler.sampling_params import SamplingParams


class Status(str, Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class StepOutput:
    """Tokens one request produced in one step (what the server streams)."""
    rid: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: dict | None          # SGLang shape: {"type": "length"|"stop"|"abort", ...}
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    logprobs: list[tuple[float, int]] = field(default_factory=list)
    top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)
    ids_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)   # token_ids_logprob
    # Prompt logprobs (logprob_start_len >= 0), on the first output only; see prompt_logprobs.py
    input_logprobs: list[tuple[float | None, int]] = field(default_factory=list)
    input_top_logprobs: list = field(default_factory=list)     # [None, [(lp, id) x k], ...]
    input_ids_logprobs: list = field(default_factory=list)     # [None, [(lp, id) x K], ...]


@dataclass(eq=False)
class Req:
    rid: str
    input_ids: list[int]
    params: SamplingParams
    return_logprob: bool = False
    top_logprobs_num: int = 0
    token_ids_logprob: list[int] = field(default_factory=list)   # ids whose logprobs to report per token
    logprob_start_len: int = -1        # >= 0 (with return_logprob): prompt logprobs from this position
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: dict | None = None
    created: float = field(default_factory=time.monotonic)
    # KV state (valid while RUNNING)
    row: int = -1                      # req_to_token row
    kv_len: int = 0                    # tokens whose K/V are in the pool
    prefill_len: int = 0               # tokens to prefill since admission (prompt + output so far)
    slots: list[int] = field(default_factory=list)   # a list: a decode step appends one in O(1)
    cached_len: int = 0                # leading slots owned by the prefix cache (locked)
    cache_node: object = None
    cached_tokens: int = 0             # prompt tokens served from the prefix cache (first admission)
    num_retractions: int = 0
    output_logprobs: list = field(default_factory=list)   # (logprob, token id) per output token
    sampling_dict: dict | None = field(default=None, repr=False)   # params as the sampler reads them
    stop_ids: set[int] | None = field(default=None, repr=False)    # stop token ids (EOS included)
    grammar: object = field(default=None, repr=False)   # grammar.RequestGrammar (structured output) or None
    # reported but not yet sent
    pending: list[int] = field(default_factory=list)
    pending_logprobs: list = field(default_factory=list)
    pending_top: list = field(default_factory=list)
    pending_ids: list = field(default_factory=list)
    pending_input: tuple | None = None             # prompt logprobs: (tokens, top, ids) lists, unsent
    input_report: tuple | None = None              # the same, kept (the offline Engine reads it)
    prompt_lp_pos: int = 0                         # prompt positions before this have their logprobs
    prompt_lp_parts: list = field(default_factory=list, repr=False)   # per extend chunk, until reported

    @property
    def all_ids(self) -> list[int]:
        return self.input_ids + self.output_ids

    @property
    def seq_len(self) -> int:
        return len(self.input_ids) + len(self.output_ids)

    @property
    def prefilling(self) -> bool:
        return self.kv_len < self.prefill_len

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def finish(self, reason: dict) -> None:
        self.status, self.finish_reason = Status.FINISHED, reason

    def take_output(self) -> StepOutput:
        out = StepOutput(self.rid, self.pending, self.finished, self.finish_reason, len(self.input_ids),
                         len(self.output_ids), self.cached_tokens, self.pending_logprobs, self.pending_top,
                         self.pending_ids, *(self.pending_input or ()))
        self.pending, self.pending_logprobs, self.pending_top, self.pending_ids = [], [], [], []
        self.pending_input = None
        return out
