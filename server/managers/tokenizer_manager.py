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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import zmq.asyncio

from server.managers import io_struct as io
from server.chat_template import ChatTemplate
from server.managers.heartbeat import Liveness
from server.managers.ipc import pull_socket, push_socket
from server.managers.req_state import GenInput, ReqState, apply_output, native_result
from server.limits import CHARS_PER_TOKEN, Limits
from server.validation import BadRequest, GenerateBatch, check_length
from stage3_scheduler.grammar import GrammarBackend, GrammarError, grammar_spec
from stage3_scheduler.sampling_params import SamplingParams

log = logging.getLogger(__name__)
BIG_INPUT_CHARS = 4096          # longer texts are tokenized in a worker thread
TOKENIZER_THREADS = 4           # a bounded pool: big prompts queue here, not on the event loop
CONTROL_TIMEOUT_S = 30.0
NO_TOKENIZER = "the server runs with --skip_tokenizer_init and has no tokenizer"
# Each TP rank checks stops itself; a time-bounded regex search could end a request on one
# rank and not on another, and the ranks' batches would then differ.
TP_STOP_REGEX = "stop_regex is not supported with --tp > 1 yet (its search is time-bounded on each rank)"
HEALTH_TIMEOUT_S = 20.0         # SGLang's: /health fails when the scheduler is silent this long


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
        self.to_detokenizer = push_socket(self.ctx, endpoints.detokenizer)     # liveness pings only
        self.inbox = pull_socket(self.ctx, endpoints.tokenizer)
        self.states: dict[str, ReqState] = {}
        self.by_client: dict[str, set[str]] = {}      # client rid -> internal rids in flight
        self.queries: dict[str, asyncio.Future] = {}
        self.loop_task: asyncio.Task | None = None
        self.limits = Limits(max_prompt_chars=self.context_length * CHARS_PER_TOKEN)
        self.pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="tokenize")
        self.heartbeat = Liveness(300.0, self._probe, self._probe_detokenizer, self._on_stall)
        self.on_stall = lambda who: None        # the launcher's hook (--exit_on_scheduler_stall)
        self.metrics = None                     # server.metrics.Metrics with --enable_metrics
        self.chat_template = self._compile_template()
        self.grammars: GrammarBackend | None = None     # built on the first request with a grammar

    def configure(self, server_args) -> None:
        """The operator's limits and watchdog timeout (flags); defaults until this is called."""
        self.limits = Limits.from_args(server_args, self.context_length)
        self.heartbeat.timeout = server_args.watchdog_timeout
        self.chat_template = self._compile_template()

    def _compile_template(self) -> ChatTemplate | None:
        # The rendered prompt may exceed the content limit by the template's own text.
        tok = self.tokenizer
        if tok is None:                   # --skip_tokenizer_init: chat routes answer 400
            return None
        return ChatTemplate(tok.chat_template, getattr(tok, "bos_token", None), getattr(tok, "eos_token", None),
                            self.limits.max_prompt_chars + 65536)

    # ---- lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.loop_task = loop.create_task(self._receive_loop())
        # Requests wait on both children; control queries on the scheduler only.
        self.heartbeat_task = loop.create_task(self.heartbeat.run(lambda: bool(self.states or self.queries),
                                                                  lambda: bool(self.states)))

    async def _receive_loop(self) -> None:
        while True:
            raw = await self.inbox.recv()
            try:
                msg = io.tokenizer_decoder.decode(raw)
                self.heartbeat.saw(msg)              # its sender (scheduler, detokenizer or both) works
                self._dispatch(msg)
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
        if self.tokenizer is None:
            raise BadRequest(NO_TOKENIZER + "; send input_ids instead of text")
        if len(text) > BIG_INPUT_CHARS:          # do not stall every other client on one big prompt
            return await self.in_pool(self.tokenizer.encode, text)
        return self.tokenizer.encode(text)

    async def in_pool(self, fn, *args):
        """Run CPU-heavy work (tokenizing, chat templates) on the bounded worker pool."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def prepare(self, batch: GenerateBatch) -> list[GenInput]:
        """One GenInput per sequence: prompt i's n samples are at [i*n, (i+1)*n)."""
        self.limits.check_batch(batch.prompts, batch.params)        # sizes first: before any tokenizing
        self.check_serving()
        for params in batch.params:
            await self.check_grammar(params)
        inputs, arrival = [], time.perf_counter()
        for i, (prompt, params, rid) in enumerate(zip(batch.prompts, batch.params, batch.rids)):
            ids = await self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
            if (params.stop or params.stop_regex) and self.tokenizer is None:
                raise BadRequest(NO_TOKENIZER + "; stop strings and stop_regex need one (stop_token_ids work)")
            if params.stop_regex and self.info.get("tp", 1) > 1:
                raise BadRequest(TP_STOP_REGEX)
            start = batch.logprob_start_len[i] if batch.logprob_start_len else -1
            check_length(len(ids), params, self.context_length, self.pool_size, start)
            for k in range(params.n):
                # Internal rids are always fresh, so a client's rid never collides with (or
                # reveals) another client's; two requests may even carry the same client rid.
                label = rid if params.n == 1 else (f"{rid}-{k}" if rid else None)
                inputs.append(GenInput(uuid.uuid4().hex, ids, sample_params(params, k), batch.return_logprob,
                                       batch.top_logprobs_num, batch.return_text_in_logprobs, arrival,
                                       client_rid=rid, label=label,
                                       token_ids_logprob=batch.token_ids_logprob[i] if batch.token_ids_logprob else [],
                                       logprob_start_len=start))
        return inputs

    async def check_grammar(self, params: SamplingParams) -> None:
        """Compile a request's grammar here, on the worker pool, so that a bad one is a 400
        before the scheduler sees it (the compiled result is cached, here and there)."""
        if (spec := grammar_spec(params)) is None:
            return
        if self.tokenizer is None:
            raise BadRequest(NO_TOKENIZER + "; regex / json_schema / ebnf grammars need one")
        if self.grammars is None:
            stop_ids = self.info.get("eos_token_ids") or [self.tokenizer.eos_token_id]
            self.grammars = await self.in_pool(GrammarBackend, self.tokenizer, self.vocab_size, stop_ids)
        try:
            await self.in_pool(self.grammars.compile, spec)
        except GrammarError as e:
            raise BadRequest(str(e)) from None

    def check_serving(self) -> None:
        if who := self.heartbeat.stalled:
            raise RequestFailed(f"the {who} is not responding (stalled); try again later", 503)

    async def generate(self, inp: GenInput):
        if inp.rid in self.states:                  # internal rids are fresh; a caller reusing one is a bug
            raise BadRequest(f"Duplicate request ID detected: {inp.rid}")     # SGLang's words
        self.check_serving()
        state = self.states[inp.rid] = ReqState(inp)
        if inp.client_rid is not None:
            self.by_client.setdefault(inp.client_rid, set()).add(inp.rid)
        sp = inp.params.to_dict() | {"n": 1}          # samples are separate requests here
        try:
            self._send(io.GenerateReq(inp.rid, inp.input_ids, sp, inp.return_logprob, inp.top_logprobs_num,
                                      inp.token_ids_logprob, inp.logprob_start_len))
            while not state.finished:
                out = await state.queue.get()
                # Coalesce what is already queued: a slow client gets fewer, bigger chunks.
                while not out.finished and not state.queue.empty():
                    apply_output(state, out)
                    out = state.queue.get_nowait()
                apply_output(state, out)
                if self.metrics is not None:
                    self.metrics.on_output(state, out)
                reason = out.finish_reason or {}
                if out.finished and reason.get("type") == "abort" and not state.aborted_by_client:
                    raise RequestFailed(reason.get("message", "request aborted"), reason.get("status_code", 400))
                yield native_result(state, out, self.tokenizer)
        finally:
            self.states.pop(inp.rid, None)                # first: nothing may leave it behind
            self._forget_client_rid(inp)
            if not state.finished:
                with contextlib.suppress(Exception):
                    self._send(io.AbortReq(inp.rid))
                log.info("request %s aborted (client gone)", inp.label or inp.rid)
                if self.metrics is not None:
                    self.metrics.on_client_gone()

    def _forget_client_rid(self, inp: GenInput) -> None:
        group = self.by_client.get(inp.client_rid) if inp.client_rid is not None else None
        if group is not None:
            group.discard(inp.rid)
            if not group:
                del self.by_client[inp.client_rid]

    def abort_client_rid(self, client_rid: str) -> bool:
        """Abort the requests sent with this rid (its n samples), matched by structure: aborting
        "job" never touches a request the client sent as "job-1"."""
        return any([self.abort(rid) for rid in list(self.by_client.get(client_rid, ()))])

    def abort(self, rid: str) -> bool:
        state = self.states.get(rid)
        if state is None:
            return False
        state.aborted_by_client = True
        self._send(io.AbortReq(rid))
        return True

    def fail_all(self, message: str, abort: bool = False) -> None:
        """End every request in flight with a 503 (shutdown, stall): streams close instead of hanging.
        With `abort`, the scheduler is told too, so a scheduler that recovers frees their slots."""
        for rid, state in self.states.items():
            if abort:
                self._send(io.AbortReq(rid))
            reason = {"type": "abort", "message": message, "status_code": 503}
            state.queue.put_nowait(io.StrOut(rid, "", [], True, reason, len(state.inp.input_ids), 0, 0))

    def _send(self, msg) -> None:
        self.to_scheduler.send(io.encode(msg))     # never blocks: unbounded queue

    # ---- control queries ---------------------------------------------------------------
    async def _query(self, msg, timeout: float = CONTROL_TIMEOUT_S, who: str = "scheduler"):
        self.check_serving()
        fut = self.queries[msg.query_id] = asyncio.get_running_loop().create_future()
        if who == "detokenizer":
            self.to_detokenizer.send(io.encode(msg))
        else:
            self._send(msg)
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise RequestFailed(f"the {who} did not answer within {timeout:.0f} s", 503) from None
        finally:
            self.queries.pop(msg.query_id, None)

    async def check_health(self) -> None:
        """Raises RequestFailed (503) unless the scheduler answers a probe (it still steps) and
        the detokenizer echoes a ping (it still decodes)."""
        timeout = min(HEALTH_TIMEOUT_S, self.heartbeat.timeout)
        await self._query(io.StatsReq(uuid.uuid4().hex), timeout)
        await self._query(io.Ping(uuid.uuid4().hex), timeout, who="detokenizer")

    def _probe(self) -> None:
        self._send(io.StatsReq(f"probe-{uuid.uuid4().hex}"))     # the reply is dropped; its arrival counts

    def _probe_detokenizer(self) -> None:
        self.to_detokenizer.send(io.encode(io.Ping(f"probe-{uuid.uuid4().hex}")))

    def _on_stall(self, who: str) -> None:
        # Aborting frees the requests' slots in the scheduler even when only the detokenizer stalled.
        self.fail_all(f"the {who} stopped working (stalled); the request was ended", abort=True)
        for fut in self.queries.values():
            if not fut.done():
                fut.set_exception(RequestFailed(f"the {who} is not responding (stalled)", 503))
        self.on_stall(who)

    async def flush_cache(self) -> bool:
        return (await self._query(io.FlushCacheReq(uuid.uuid4().hex))).success

    async def get_stats(self) -> dict:
        return (await self._query(io.StatsReq(uuid.uuid4().hex))).stats
