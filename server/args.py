"""Server flags: one `ServerArgs` dataclass, parsed from argv by `parse_args`.

Every flag is accepted as `--flag_name` and `--flag-name` (SGLang users type both), and a
few SGLang spellings are aliases (`--model-path`, `--tp-size`, `--mem-fraction-static`,
`--random-seed`). Engine defaults are read from the engine's own dataclasses, so
`--help` shows the real values and nothing is written down twice. `check_args` refuses a
value or combination that cannot work (exit code 2, one line) before any process starts.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
from dataclasses import asdict, dataclass

import torch

from server.parsers import REASONING_PARSERS, TOOL_CALL_PARSERS
from stage1_model.demo_cli import DemoError, check_model, resolve_device
from stage2_runner.model_runner import RunnerArgs
from stage3_scheduler.scheduler import SchedulerArgs

API_KEY_ENV = "MINI_SGLANG_API_KEY"
POLICY_ALIASES = {"fcfs": "fifo", "lpm": "cache_aware"}     # SGLang's names for our policies


@dataclass
class ServerArgs:
    model: str = "demo"
    served_model_name: str | None = None
    reasoning_parser: str | None = None     # e.g. qwen3: <think> -> reasoning_content
    tool_call_parser: str | None = None     # e.g. qwen25: <tool_call> -> tool_calls
    enable_cache_report: bool = False       # usage.prompt_tokens_details.cached_tokens in /v1 answers
    host: str = "127.0.0.1"                 # loopback: never all interfaces by default
    port: int = 30000
    api_key: str | None = None
    log_level: str = "info"
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = RunnerArgs.dtype
    load_format: str = RunnerArgs.load_format
    tp: int = 1
    nnodes: int = 1                         # machines the tp ranks span (same command on each)
    node_rank: int = 0                      # only node 0 serves HTTP
    dist_init_addr: str | None = None       # HOST:PORT of node 0 (default: a free local port)
    dist_timeout: float = 600.0             # seconds for every rank to join
    disable_custom_all_reduce: bool = False  # NCCL for every all-reduce
    attention_backend: str | None = None
    page_size: int = RunnerArgs.page_size
    gpu_memory_utilization: float = RunnerArgs.gpu_memory_utilization
    cpu_kv_cache_gb: float = RunnerArgs.cpu_kv_cache_gb
    max_total_tokens: int | None = None
    max_running_requests: int = RunnerArgs.max_running_requests
    context_length: int | None = None
    chunked_prefill_size: int | None = SchedulerArgs.chunked_prefill_size
    max_prefill_tokens: int = SchedulerArgs.max_prefill_tokens
    schedule_policy: str = SchedulerArgs.schedule_policy
    disable_radix_cache: bool = False
    disable_cuda_graph: bool = False
    cuda_graph_max_bs: int = 256
    disable_overlap: bool = False
    seed: int = RunnerArgs.seed
    trace_path: str | None = None
    # hardening: limits, liveness, what may reach the app (server/README.md, "Hardening")
    max_request_bytes: int = 32 << 20
    max_prompt_chars: int | None = None       # None: 10 characters per token of context
    max_prompts_per_request: int = 1024       # also the cap on prompts x n
    allowed_hosts: list[str] | None = None
    header_timeout: float = 10.0
    chat_template: str | None = None
    skip_tokenizer_init: bool = False         # no tokenizer anywhere: input_ids in, output_ids out
    watchdog_timeout: float = 300.0
    exit_on_scheduler_stall: bool = False
    enable_metrics: bool = False

    def engine_options(self) -> dict:
        """Keyword arguments for the stage Engine (RunnerArgs + SchedulerArgs fields)."""
        opts = dict(model=self.model, device=self.device, dtype=self.dtype, load_format=self.load_format,
                    attention_backend={"fa3": "fa"}.get(self.attention_backend, self.attention_backend),
                    page_size=self.page_size, gpu_memory_utilization=self.gpu_memory_utilization,
                    cpu_kv_cache_gb=self.cpu_kv_cache_gb, max_total_tokens=self.max_total_tokens,
                    max_running_requests=self.max_running_requests, context_length=self.context_length,
                    seed=self.seed, chunked_prefill_size=self.chunked_prefill_size,
                    max_prefill_tokens=self.max_prefill_tokens, schedule_policy=self.schedule_policy,
                    trace_path=self.trace_path, disable_radix_cache=self.disable_radix_cache,
                    skip_tokenizer_init=self.skip_tokenizer_init)
        # Stage-5 knobs travel only when they ask for something beyond the defaults.
        extra = dict(tp=self.tp, disable_cuda_graph=self.disable_cuda_graph, disable_overlap=self.disable_overlap,
                     cuda_graph_max_bs=self.cuda_graph_max_bs)
        defaults = ServerArgs()
        opts.update({k: v for k, v in extra.items() if v != getattr(defaults, k)})
        if self.tp > 1:             # the process group (the launcher fills dist_init_addr on one node)
            opts.update(nnodes=self.nnodes, node_rank=self.node_rank, dist_init_addr=self.dist_init_addr,
                        dist_timeout=self.dist_timeout, disable_custom_all_reduce=self.disable_custom_all_reduce)
        return opts

    def to_dict(self) -> dict:
        d = asdict(self)
        d["api_key"] = None if self.api_key is None else "***"     # never echo the secret
        return d


def _flag(parser, name: str, *aliases: str, **kw) -> None:
    names = []
    for n in (name, *aliases):
        names += [f"--{n}"] + ([f"--{n.replace('_', '-')}"] if "_" in n else [])
    parser.add_argument(*names, dest=name, **kw)


def build_parser() -> argparse.ArgumentParser:
    d = ServerArgs()
    p = argparse.ArgumentParser(
        prog="mini-sglang serve", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Serve a Qwen3 model with SGLang's native and OpenAI-compatible HTTP APIs.")
    g = p.add_argument_group("model")
    _flag(g, "model", "model_path", default=d.model, help="'demo', a local Hugging Face Qwen3 directory, or a Hub id")
    _flag(g, "served_model_name", default=None, help="model name in /v1 answers (default: --model)")
    _flag(g, "reasoning_parser", default=None, choices=sorted(REASONING_PARSERS),
          help="chat: split <think> blocks into reasoning_content (qwen3)")
    _flag(g, "tool_call_parser", default=None, choices=sorted(TOOL_CALL_PARSERS),
          help="chat: accept tools and turn <tool_call> blocks into tool_calls (qwen25, for Qwen2.5 and Qwen3)")
    _flag(g, "enable_cache_report", action="store_true",
          help="report prefix-cache hits in /v1 usage (prompt_tokens_details.cached_tokens)")
    _flag(g, "load_format", default=d.load_format, choices=["auto", "dummy"], help="dummy: random weights")
    _flag(g, "dtype", default=d.dtype, choices=["auto", "float32", "bfloat16", "float16"],
          help="auto: bfloat16 on GPU, float32 on CPU")
    _flag(g, "context_length", type=int, default=None, help="cap on prompt + output tokens (default: the model's)")
    g = p.add_argument_group("HTTP")
    _flag(g, "host", default=d.host, help="interface to bind (0.0.0.0 exposes the server to the network)")
    _flag(g, "port", type=int, default=d.port)
    _flag(g, "api_key", default=None,
          help=f"require 'Authorization: Bearer KEY' on every route but /health (or set {API_KEY_ENV})")
    _flag(g, "log_level", default=d.log_level, type=str.lower, choices=["debug", "info", "warning", "error"])
    g = p.add_argument_group("runtime")
    _flag(g, "device", default=d.device, choices=["cuda", "cpu"])
    _flag(g, "tp", "tp_size", type=int, default=d.tp,
          help="tensor-parallel ranks: one scheduler process per GPU (or per CPU share with --device cpu)")
    _flag(g, "nnodes", type=int, default=d.nnodes, help="machines the --tp ranks are spread over")
    _flag(g, "node_rank", type=int, default=d.node_rank, help="this machine's index; node 0 serves HTTP")
    _flag(g, "dist_init_addr", "nccl_init_addr", default=None,
          help="HOST:PORT where node 0 meets the other ranks (needed with --nnodes > 1)")
    _flag(g, "dist_timeout", type=float, default=d.dist_timeout,
          help="seconds to wait for every tensor-parallel rank to join before giving up")
    _flag(g, "disable_custom_all_reduce", action="store_true",
          help="TP on GPUs: NCCL for every all-reduce, also the small decode ones (default: one-shot)")
    _flag(g, "attention_backend", default=None, choices=["torch", "triton", "fa", "fa3"],
          help="default: triton on GPU, torch on CPU (fa3 = fa)")
    _flag(g, "page_size", type=int, default=d.page_size, help="KV slots per page")
    _flag(g, "gpu_memory_utilization", "mem_fraction_static", type=float, default=d.gpu_memory_utilization,
          help="fraction of GPU memory for weights + KV cache")
    _flag(g, "cpu_kv_cache_gb", type=float, default=d.cpu_kv_cache_gb, help="KV cache size on CPU")
    _flag(g, "max_total_tokens", type=int, default=None, help="fix the KV pool size in tokens (default: from memory)")
    _flag(g, "max_running_requests", type=int, default=d.max_running_requests)
    _flag(g, "disable_cuda_graph", action="store_true", help="run decode eagerly (no CUDA graphs)")
    _flag(g, "cuda_graph_max_bs", type=int, default=d.cuda_graph_max_bs,
          help="largest decode batch replayed from a CUDA graph (bigger ones run eagerly)")
    _flag(g, "disable_overlap", action="store_true",
          help="synchronous scheduler loop (default: schedule the next batch while the GPU runs this one)")
    _flag(g, "seed", "random_seed", type=int, default=d.seed)
    g = p.add_argument_group("scheduler")
    _flag(g, "schedule_policy", default=d.schedule_policy, choices=["fifo", "cache_aware", *POLICY_ALIASES])
    _flag(g, "chunked_prefill_size", type=int, default=d.chunked_prefill_size,
          help="longest prefill chunk in tokens, <= 0: no chunking (default: 8192 on a GPU of >= 60 GiB, "
          "4096 of >= 35 GiB, else 2048)")
    _flag(g, "max_prefill_tokens", type=int, default=d.max_prefill_tokens, help="new tokens per extend batch")
    _flag(g, "disable_radix_cache", action="store_true", help="no prefix cache")
    _flag(g, "trace_path", default=None, help="write one JSON line per scheduler step here")
    _flag(g, "skip_tokenizer_init", action="store_true",
          help="load no tokenizer: requests send input_ids, responses carry output_ids and no text")
    g = p.add_argument_group("hardening")
    _flag(g, "max_request_bytes", type=int, default=d.max_request_bytes, help="larger bodies get 413")
    _flag(g, "max_prompt_chars", type=int, default=None,
          help="longer prompts get 413 before tokenizing (default: 10 x the context length)")
    _flag(g, "max_prompts_per_request", type=int, default=d.max_prompts_per_request,
          help="cap on prompts, and on prompts x n, in one request")
    _flag(g, "allowed_hosts", nargs="+", default=None,
          help="Host header names to accept ('*': any; default: localhost names when bound to loopback)")
    _flag(g, "header_timeout", type=float, default=d.header_timeout,
          help="close connections whose request headers take longer (seconds)")
    _flag(g, "chat_template", default=None, help="a Jinja chat template file to use instead of the model's")
    _flag(g, "watchdog_timeout", type=float, default=d.watchdog_timeout,
          help="a scheduler or detokenizer silent this long (seconds) while it has work is declared stalled: 503s")
    _flag(g, "exit_on_scheduler_stall", action="store_true", help="exit (code 1) when the scheduler or the detokenizer stalls")
    _flag(g, "enable_metrics", action="store_true",
          help="Prometheus metrics at /metrics (needs prometheus-client: pip install 'mini-sglang[metrics]')")
    return p


class BadArgs(ValueError):
    """A flag value or combination that cannot work; the message says what to do instead."""


def check_args(args: ServerArgs) -> None:
    """Refuse what cannot work before any process is spawned or weight read: otherwise the
    mistake surfaces minutes later (after a big checkpoint loads) as a child's traceback."""
    if not (1 <= args.port <= 65535):
        raise BadArgs(f"--port must be in [1, 65535], got {args.port}")
    check_tp(args)
    if args.cuda_graph_max_bs < 1:
        raise BadArgs(f"--cuda_graph_max_bs {args.cuda_graph_max_bs}: must be at least 1 "
                      "(--disable_cuda_graph turns the graphs off)")
    if args.enable_metrics and importlib.util.find_spec("prometheus_client") is None:
        raise BadArgs("--enable_metrics needs prometheus-client: pip install 'mini-sglang[metrics]'")
    resolve_device(args.device)                 # --device cuda with no CUDA visible
    check_backend(args.attention_backend, args.device)
    check_model(args.model, args.load_format)   # a missing config.json, a file, no weights


def check_tp(args: ServerArgs) -> None:
    """--tp / --nnodes / --node_rank / --dist_init_addr that cannot form one process group."""
    if args.tp < 1 or args.nnodes < 1 or args.tp % args.nnodes:
        raise BadArgs(f"--tp {args.tp} --nnodes {args.nnodes}: --tp must be a positive multiple of --nnodes")
    if not (0 <= args.node_rank < args.nnodes):
        raise BadArgs(f"--node_rank {args.node_rank}: must be in [0, {args.nnodes})")
    if args.nnodes > 1 and not args.dist_init_addr:
        raise BadArgs("--nnodes > 1 needs --dist_init_addr HOST:PORT (node 0's address, the same on every node)")
    if args.dist_init_addr:
        host, _, port = args.dist_init_addr.rpartition(":")
        if not host or not port.isdigit() or not (1 <= int(port) <= 65535):
            raise BadArgs(f"--dist_init_addr {args.dist_init_addr!r}: expected HOST:PORT")
    per_node = args.tp // args.nnodes
    if args.device == "cuda" and torch.cuda.is_available() and per_node > torch.cuda.device_count():
        raise BadArgs(f"--tp {args.tp} over {args.nnodes} node(s) needs {per_node} GPUs per node; "
                      f"{torch.cuda.device_count()} visible")


def check_backend(backend: str | None, device: str) -> None:
    """The Triton and FlashAttention kernels run on a GPU only. (The demos fall back to torch
    with a warning; a server should run what its operator asked for, or say why not.)"""
    if device == "cpu" and backend not in (None, "torch"):
        raise BadArgs(f"--attention_backend {backend} needs a GPU; on --device cpu only the torch "
                      "backend works (pass --attention_backend torch, or leave it out)")


def parse_args(argv: list[str] | None = None) -> ServerArgs:
    """argv -> ServerArgs; a bad value exits with code 2 and one line, like argparse's own errors."""
    parser = build_parser()
    args = ServerArgs(**vars(parser.parse_args(argv)))
    if args.api_key is None:        # a flag shows in /proc/PID/cmdline; the environment does not
        args.api_key = os.environ.get(API_KEY_ENV) or None
    args.schedule_policy = POLICY_ALIASES.get(args.schedule_policy, args.schedule_policy)
    try:
        check_args(args)
    except (BadArgs, DemoError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    return args
