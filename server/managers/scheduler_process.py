"""The scheduler process: the stage-3 Scheduler (with stage 4's radix cache) behind ZMQ.

    GenerateReq / AbortReq / FlushCacheReq / StatsReq  --in-->  loop  --BatchTokenOut--> detokenizer
                                                                     --FlushCacheOut/StatsOut--> tokenizer

Loop: take every message already queued (never waiting while there is work), run one
`scheduler.step()`, send what it produced; when idle, block on the socket (1 s at a time,
to notice a dead parent). The newest engine available builds the model, cache and
scheduler, so stage 5 plugs in without touching this file. The process tells the
launcher it is ready only once the model is loaded and the KV pool sized; any exception
ends it with a non-zero exit code and a traceback in the log.

Tensor parallelism (--tp N): this process is rank 0, the only one with sockets; its
scheduler broadcasts each step's new requests and aborts to ranks 1..N-1, which run
`run_tp_follower_process` (stage5_tp_cudagraph/tp_worker.py: same engine, no sockets).
While idle, rank 0 sends a keep-alive each second, so a dead rank is noticed at once;
on the way out it tells the followers to stop.
"""
from __future__ import annotations

import importlib
import logging
import os

import msgspec
import torch
import zmq

from server.managers import io_struct as io
from server.managers.ipc import parent_alive, pull_socket, push_socket
from stage3_scheduler.request import Req
from stage3_scheduler.sampling_params import InvalidParams, SamplingParams

log = logging.getLogger(__name__)
ENGINES = ["stage5_tp_cudagraph.engine", "stage4_radix.engine", "stage3_scheduler.engine"]


def build_engine(options: dict):
    """The most advanced stage Engine that imports; it owns runner, cache and scheduler."""
    for name in ENGINES:
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            if e.name and name.startswith(e.name):      # the stage is absent: try an older one
                continue
            raise
        log.info("engine: %s.Engine", name)
        if not name.startswith("stage5"):
            options = _without_stage5(options)
        return module.Engine(**options)
    raise RuntimeError("no stage engine found")


def _without_stage5(options: dict) -> dict:
    """Before stage 5 there is no CUDA graph or overlap to disable, and no tensor parallelism."""
    if options.get("tp", 1) > 1:
        raise ValueError(f"--tp {options['tp']} needs stage 5 (stage5_tp_cudagraph), which is not installed")
    stage5 = ("tp", "disable_cuda_graph", "disable_overlap", "cuda_graph_max_bs", "nnodes", "node_rank",
              "dist_init_addr", "dist_timeout", "disable_custom_all_reduce")
    return {k: v for k, v in options.items() if k not in stage5}


class SchedulerServer:
    def __init__(self, engine, endpoints, strict: bool = False):
        self.engine, self.sched, self.strict = engine, engine.scheduler, strict
        self.vocab_size = engine.runner.config.vocab_size
        self.context_length = engine.runner.context_length
        self.ctx = zmq.Context()
        self.inbox = pull_socket(self.ctx, endpoints.scheduler)
        self.to_detok = push_socket(self.ctx, endpoints.detokenizer)
        self.to_tokenizer = push_socket(self.ctx, endpoints.tokenizer)
        self.params: dict[str, io.DetokParams] = {}   # rid -> decode params, until its first output
        self.rejected: list[io.TokenOut] = []

    def serve(self, parent_pid: int) -> None:
        busy = False
        while True:
            if not self._receive(block=not (busy or self.rejected)) and not parent_alive(parent_pid):
                return
            outs = self._outputs(self.sched.step()) if self.sched.has_work() else []
            outs, self.rejected = self.rejected + outs, []
            if outs:
                self.to_detok.send(io.encode(io.BatchTokenOut(outs)))
            if busy and not self.sched.has_work():
                self._check_invariant()
            busy = self.sched.has_work()
            if not busy and (keepalive := getattr(self.sched, "keepalive", None)):
                keepalive()                             # TP: rank 0 pings the followers now and then

    def _check_invariant(self) -> None:
        """On becoming idle, every KV slot must be free or cached. A leak is a bug: with
        --log_level debug it stops the server (and walks the whole radix tree too, when the
        engine can); otherwise it is logged and serving goes on."""
        deep = getattr(self.engine, "check_integrity", None) if self.strict else None
        try:
            (deep or self.sched.check_invariant)()
        except AssertionError as e:
            if self.strict:
                raise
            log.error("%s", e)

    def _receive(self, block: bool) -> bool:
        """Handle every queued message; when `block`, wait up to 1 s for the first one."""
        if block and not self.inbox.poll(1000):
            return False
        while True:
            try:
                raw = self.inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                return True
            try:
                msg = io.scheduler_decoder.decode(raw)
            except msgspec.DecodeError as e:        # not one of ours: drop it, keep serving
                log.error("dropped an undecodable message (%d bytes): %s", len(raw), e)
                continue
            self._handle(msg)

    def _handle(self, msg) -> None:
        if isinstance(msg, io.GenerateReq):
            self._add(msg)
        elif isinstance(msg, io.AbortReq):
            self.sched.abort(msg.rid)
        elif isinstance(msg, io.FlushCacheReq):
            ok = self.sched.flush_cache()
            log.info("flush_cache: %s", "done" if ok else "refused, requests are running")
            self.to_tokenizer.send(io.encode(io.FlushCacheOut(msg.query_id, ok)))
        elif isinstance(msg, io.StatsReq):
            self.to_tokenizer.send(io.encode(io.StatsOut(msg.query_id, self.sched.stats())))

    def _add(self, msg: io.GenerateReq) -> None:
        # The tokenizer manager validated already; checking again here means no input, however
        # it got onto the socket, can reach the embedding with an out-of-range id.
        try:
            params = SamplingParams.from_dict(msg.sampling_params, self.vocab_size)
            if not msg.input_ids or not all(0 <= t < self.vocab_size for t in msg.input_ids):
                raise InvalidParams(f"input_ids: must be non-empty ids in [0, {self.vocab_size})")
            if not -1 <= msg.logprob_start_len < len(msg.input_ids):
                raise InvalidParams("logprob_start_len: must be -1 or less than the prompt length")
            if len(msg.input_ids) >= self.context_length:
                raise InvalidParams(f"input_ids: longer than the context length {self.context_length}")
        except InvalidParams as e:
            log.warning("rejected request %s: %s", msg.rid, e)
            self.rejected.append(io.TokenOut(msg.rid, [], True, {"type": "abort", "message": str(e)},
                                              len(msg.input_ids), 0, 0, params=io.DetokParams()))
            return
        self.sched.add_request(Req(msg.rid, list(msg.input_ids), params, return_logprob=msg.return_logprob,
                                   top_logprobs_num=msg.top_logprobs_num,
                                   token_ids_logprob=list(msg.token_ids_logprob),
                                   logprob_start_len=msg.logprob_start_len))
        self.params[msg.rid] = io.DetokParams(params.skip_special_tokens, params.no_stop_trim, list(params.stop))

    def _outputs(self, step_outputs) -> list[io.TokenOut]:
        outs = []
        for o in step_outputs:
            detok = self.params.pop(o.rid, None)        # first output of a rid carries its DetokParams
            outs.append(io.TokenOut(o.rid, list(o.new_token_ids), o.finished, o.finish_reason, o.prompt_tokens,
                                    o.completion_tokens, o.cached_tokens, [tuple(x) for x in o.logprobs],
                                    [[tuple(x) for x in top] for top in o.top_logprobs], detok,
                                    [[tuple(x) for x in ids] for ids in o.ids_logprobs],
                                    [tuple(x) for x in o.input_logprobs], *_input_lists(o)))
        return outs


def _input_lists(o) -> tuple[list, list]:
    """Prompt top-k and token_ids_logprob lists: None (the first position) stays None."""
    return tuple([None if row is None else [tuple(x) for x in row] for row in rows]
                 for rows in (o.input_top_logprobs, o.input_ids_logprobs))


def run_scheduler_process(server_args, endpoints, ready_conn, parent_pid: int) -> None:
    """Process entry point: build the engine, report ready (or the error), then serve."""
    from server.launch_server import child_setup
    child_setup("scheduler", server_args.log_level)
    try:
        engine = build_engine(_rank_options(server_args, 0))
        server = SchedulerServer(engine, endpoints, strict=server_args.log_level == "debug")
        runner = engine.runner
        if server_args.tp == 1:                 # TP ranks on CPU split the cores already
            leave_a_core(runner.device)
        info = dict(model_path=str(runner.model_path), context_length=runner.context_length,
                    vocab_size=runner.config.vocab_size, max_total_tokens=runner.pool.size,
                    eos_token_ids=list(runner.eos_token_ids), device=str(runner.device), tp=server_args.tp,
                    chunked_prefill_size=engine.scheduler.args.chunked_prefill_size)   # None resolved by device
    except Exception as e:  # noqa: BLE001 - any start-up failure is reported, then we exit
        log.exception("scheduler failed to start")
        ready_conn.send_bytes(io.encode(io.Ready("scheduler", error=f"{type(e).__name__}: {e}")))
        os._exit(1)
    ready_conn.send_bytes(io.encode(io.Ready("scheduler", info=info)))
    try:
        server.serve(parent_pid)
    except Exception:  # noqa: BLE001 - crash loudly; the launcher's watchdog takes the server down
        log.exception("scheduler crashed")
        os._exit(1)
    finally:                    # a normal exit or SIGTERM: TP followers are told to stop
        if close := getattr(engine, "close", None):
            close()


def leave_a_core(device: torch.device) -> None:
    """On CPU, leave one core to the main process and the detokenizer: with the model's
    threads on every core, they wait for a time slice to pass each token on while the next
    step computes (demo model, 2 cores: 4-6 ms of a 10-16 ms time to first token, and its
    steps are no faster on two threads than on one)."""
    explicit = "OMP_NUM_THREADS" in os.environ           # the operator chose: keep it
    if device.type == "cpu" and torch.get_num_threads() > 1 and not explicit:
        torch.set_num_threads(torch.get_num_threads() - 1)


def _rank_options(server_args, tp_rank: int) -> dict:
    options = server_args.engine_options()
    return dict(options, tp_rank=tp_rank) if server_args.tp > 1 else options


def run_tp_follower_process(server_args, tp_rank: int, ready_conn, parent_pid: int) -> None:
    """Process entry point of TP rank > 0: the same engine, driven by rank 0's broadcasts."""
    from server.launch_server import child_setup
    from stage5_tp_cudagraph.tp_worker import follow, watch_parent
    child_setup(f"tp{tp_rank}", server_args.log_level)
    watch_parent(parent_pid)                  # our launcher gone (even SIGKILLed): exit too
    try:
        engine = build_engine(_rank_options(server_args, tp_rank))
    except Exception as e:  # noqa: BLE001 - reported to the launcher, then we exit
        log.exception("TP rank %d failed to start", tp_rank)
        ready_conn.send_bytes(io.encode(io.Ready(f"tp{tp_rank}", error=f"{type(e).__name__}: {e}")))
        os._exit(1)
    ready_conn.send_bytes(io.encode(io.Ready(f"tp{tp_rank}", info={"tp_rank": tp_rank})))
    try:
        follow(engine.scheduler, engine.tp, engine.runner.config.vocab_size)
    except Exception:  # noqa: BLE001 - rank 0 (or another rank) is gone: take this node down too
        log.exception("TP rank %d lost contact with the other ranks", tp_rank)
        os._exit(1)
    engine.close()
