"""TokenizerManager: the main process's side of the pipeline (runs on uvicorn's event loop).

    prepare(GenerateBatch)   -> [GenInput]            tokenize (off the loop when big), check lengths
    generate(GenInput)       -> async iterator of cumulative results {text, output_ids, meta_info}
    abort(rid) / flush_cache() / get_stats()

Each request in flight has a `ReqState` keyed by its rid. One background task reads the
tokenizer socket (BatchStrOut from the detokenizer, control replies from the scheduler)
and routes each output to its request's asyncio queue. A generator that is closed before
its request finished (client gone, handler cancelled) sends an AbortReq from its `finally`,
so the scheduler frees the request's KV slots on its next step.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field, replace

import zmq.asyncio

from server import io_struct as io
from server.ipc import pull_socket, push_socket
from server.validation import BadRequest, GenerateBatch, check_length
from stage3_scheduler.sampling_params import SamplingParams

log = logging.getLogger(__name__)
BIG_INPUT_CHARS = 4096          # longer texts are tokenized in a worker thread
CONTROL_TIMEOUT_S = 30.0


@dataclass
class GenInput:
    rid: str
    input_ids: list[int]
    params: SamplingParams
    return_logprob: bool = False
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    arrival: float = field(default_factory=time.perf_counter)     # e2e_latency counts tokenization too


@dataclass
class ReqState:
    inp: GenInput
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)
    finished: bool = False
    aborted_by_client: bool = False


class RequestFailed(Exception):
    """A request ended by an abort its client did not ask for: the scheduler could not run it
    (400), or the server is shutting down (503)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def sample_params(params: SamplingParams, k: int) -> SamplingParams:
    """The k-th of n samples: one request each; a seeded request gives sample k seed + k,
    so the n samples differ but the whole set is reproducible."""
    if params.n == 1 or params.seed is None:
        return params
    return replace(params, seed=(params.seed + k) % 2**63)


class TokenizerManager:
    def __init__(self, tokenizer, endpoints, info: dict):
        self.tokenizer, self.info = tokenizer, info
        self.vocab_size, self.context_length = info["vocab_size"], info["context_length"]
        self.pool_size = info["max_total_tokens"]
        self.ctx = zmq.asyncio.Context()          # asyncio sockets: recv() awaits, never blocks
        self.to_scheduler = push_socket(self.ctx, endpoints.scheduler)
        self.inbox = pull_socket(self.ctx, endpoints.tokenizer)
        self.states: dict[str, ReqState] = {}
        self.queries: dict[str, asyncio.Future] = {}
        self.loop_task: asyncio.Task | None = None

    # ---- lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        self.loop_task = asyncio.get_running_loop().create_task(self._receive_loop())

    async def _receive_loop(self) -> None:
        while True:
            raw = await self.inbox.recv()
            try:
                self._dispatch(io.tokenizer_decoder.decode(raw))
            except Exception:  # noqa: BLE001 - one bad message must not stall every request
                log.exception("dropped an undecodable message (%d bytes)", len(raw))

    def _dispatch(self, msg) -> None:
        if isinstance(msg, io.BatchStrOut):
            for out in msg.outs:
                state = self.states.get(out.rid)
                if state is not None:                # else: aborted and forgotten already
                    state.queue.put_nowait(out)
        else:
            fut = self.queries.pop(msg.query_id, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    # ---- requests --------------------------------------------------------------------
    async def tokenize(self, text: str) -> list[int]:
        if len(text) > BIG_INPUT_CHARS:          # do not stall every other client on one big prompt
            return await asyncio.to_thread(self.tokenizer.encode, text)
        return self.tokenizer.encode(text)

    async def prepare(self, batch: GenerateBatch) -> list[GenInput]:
        """One GenInput per sequence: prompt i's n samples are at [i*n, (i+1)*n)."""
        inputs, arrival = [], time.perf_counter()
        for prompt, params, rid in zip(batch.prompts, batch.params, batch.rids):
            ids = await self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
            check_length(len(ids), params, self.context_length, self.pool_size)
            for k in range(params.n):
                r = rid if params.n == 1 else (f"{rid}-{k}" if rid else None)
                if r is not None and r in self.states:
                    raise BadRequest(f"rid: {r!r} is already in use")
                inputs.append(GenInput(r or uuid.uuid4().hex, ids, sample_params(params, k), batch.return_logprob,
                                       batch.top_logprobs_num, batch.return_text_in_logprobs, arrival))
        return inputs

    async def generate(self, inp: GenInput):
        if inp.rid in self.states:                  # checked in prepare too; this closes the race
            raise BadRequest(f"rid: {inp.rid!r} is already in use")
        state = self.states[inp.rid] = ReqState(inp)
        sp = inp.params.to_dict() | {"n": 1}          # samples are separate requests here
        try:
            self._send(io.GenerateReq(inp.rid, inp.input_ids, sp, inp.return_logprob, inp.top_logprobs_num))
            while not state.finished:
                out = await state.queue.get()
                # Coalesce what is already queued: a slow client gets fewer, bigger chunks.
                while not out.finished and not state.queue.empty():
                    self._apply(state, out)
                    out = state.queue.get_nowait()
                self._apply(state, out)
                reason = out.finish_reason or {}
                if out.finished and reason.get("type") == "abort" and not state.aborted_by_client:
                    raise RequestFailed(reason.get("message", "request aborted"), reason.get("status_code", 400))
                yield self._result(state, out)
        finally:
            self.states.pop(inp.rid, None)                # first: nothing may leave it behind
            if not state.finished:
                with contextlib.suppress(Exception):
                    self._send(io.AbortReq(inp.rid))
                log.info("request %s aborted (client gone)", inp.rid)

    def _apply(self, state: ReqState, out: io.StrOut) -> None:
        state.text += out.text
        state.output_ids += out.new_token_ids
        state.logprobs += out.logprobs
        state.top_logprobs += out.top_logprobs
        state.finished = out.finished

    def _result(self, state: ReqState, out: io.StrOut) -> dict:
        meta = {"id": state.inp.rid, "finish_reason": out.finish_reason, "prompt_tokens": out.prompt_tokens,
                "completion_tokens": out.completion_tokens, "cached_tokens": out.cached_tokens,
                "e2e_latency": time.perf_counter() - state.inp.arrival,
                "weight_version": "default"}     # SGLang's field; weights are never updated in place here
        if state.inp.return_logprob:        # SGLang's triples: [logprob, token id, text or null]
            dec = self.tokenizer.decode if state.inp.return_text_in_logprobs else None
            triple = lambda lp, t: [lp, t, dec([t]) if dec else None]  # noqa: E731
            meta["output_token_logprobs"] = [triple(lp, t) for lp, t in state.logprobs]
            if state.inp.top_logprobs_num:
                meta["output_top_logprobs"] = [[triple(lp, t) for lp, t in top] for top in state.top_logprobs]
        return {"text": state.text, "output_ids": list(state.output_ids), "meta_info": meta}

    def abort(self, rid: str) -> bool:
        state = self.states.get(rid)
        if state is None:
            return False
        state.aborted_by_client = True
        self._send(io.AbortReq(rid))
        return True

    def fail_all(self, message: str) -> None:
        """End every request in flight with a 503 (shutdown): streams close instead of hanging."""
        for rid, state in self.states.items():
            reason = {"type": "abort", "message": message, "status_code": 503}
            state.queue.put_nowait(io.StrOut(rid, "", [], True, reason, len(state.inp.input_ids), 0, 0))

    def _send(self, msg) -> None:
        self.to_scheduler.send(io.encode(msg))     # never blocks: unbounded queue

    # ---- control queries ---------------------------------------------------------------
    async def _query(self, msg):
        fut = self.queries[msg.query_id] = asyncio.get_running_loop().create_future()
        self._send(msg)
        try:
            return await asyncio.wait_for(fut, CONTROL_TIMEOUT_S)
        finally:
            self.queries.pop(msg.query_id, None)

    async def flush_cache(self) -> bool:
        return (await self._query(io.FlushCacheReq(uuid.uuid4().hex))).success

    async def get_stats(self) -> dict:
        return (await self._query(io.StatsReq(uuid.uuid4().hex))).stats
