"""`python -m server.launch_server --model demo --device cpu`: start every process, then serve.

    launcher (this process) --spawn--> scheduler process     (loads the model: slow)
                            --spawn--> detokenizer process   (loads the tokenizer)
    waits for both "ready" reports, then runs FastAPI on uvicorn in this process.
    With --tp N it also starts one scheduler process per extra rank (tp_launch.py).

So no request is accepted before the model is loaded. A watchdog thread polls the children:
if one dies, the server logs which one and its exit code, stops, and exits with code 1; it
never hangs. SIGINT/SIGTERM stop the HTTP server and then every child, with exit code 0 and
no traceback, also when the SIGTERM goes to the whole process group (systemd, `kill -- -PGID`)
and reaches the children first; the private ZMQ directory is removed on the way out.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from server.managers import io_struct as io
from server.args import ServerArgs, parse_args
from server.managers.ipc import Endpoints
from server.managers.tp_launch import run_follower_node, spawn_followers, wait_all_ready, with_dist_addr

log = logging.getLogger("server")
START_TIMEOUT_S = 1800          # big checkpoints load slowly; a dead child is noticed at once


class Shutdown(BaseException):
    """SIGINT/SIGTERM outside uvicorn (while starting, or re-raised after it stopped). Not an
    Exception, as KeyboardInterrupt is not: library code that catches Exception while we
    start (huggingface_hub's lazy imports do) must not swallow it."""


def setup_logging(level: str, name: str) -> None:
    logging.basicConfig(level=level.upper(), force=True, datefmt="%H:%M:%S",
                        format=f"%(asctime)s [{name}] %(levelname)s %(name)s: %(message)s")


def child_setup(name: str, level: str) -> None:
    """In each child: Ctrl-C reaches the whole process group, but only the launcher acts on it;
    a SIGTERM ends the child through a normal interpreter exit (clean-up runs)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_once)
    setup_logging(level, name)
    # The launcher already warned about the model directory (e.g. no tokenizer files); the
    # children load the same directory and would say it twice more.
    logging.getLogger("stage1_model.model_source").setLevel(logging.ERROR)
    try:                                 # name the process for ps/top (Linux; 15 chars at most)
        with open("/proc/self/comm", "w") as f:
            f.write(f"mini::{name}"[:15])
    except OSError:
        pass


def _exit_once(signum, frame):
    """A child's SIGTERM: exit with code 0, and ignore any SIGTERM after it. A SIGTERM to the
    whole process group (systemd, `kill -- -PGID`) followed by the launcher's own would land in
    the clean-up, inside a zmq socket's __del__, and print a SystemExit traceback there."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(0)


def check_port(host: str, port: int) -> None:
    """Fail in a second, not after loading the model, when the port is taken."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise SystemExit(f"cannot listen on {host}:{port}: {e.strerror}") from None


class Children:
    """The scheduler and detokenizer processes, each with a one-way pipe for its ready report."""

    def __init__(self):
        self.ctx = mp.get_context("spawn")        # fresh interpreters: no forked CUDA or thread state
        self.procs: dict[str, mp.Process] = {}
        self.pipes = {}
        self.stopping = False

    def spawn(self, name: str, target, *args) -> None:
        recv, send = self.ctx.Pipe(duplex=False)
        # Not daemonic: a stage-5 scheduler starts processes of its own (one per TP rank).
        proc = self.ctx.Process(target=target, name=f"mini-sglang-{name}", args=(*args, send, os.getpid()))
        proc.start()
        send.close()                              # the child holds the only write end now
        self.procs[name], self.pipes[name] = proc, recv

    def wait_ready(self, name: str) -> dict:
        """Block until the child reports; its error (or death) becomes a SystemExit."""
        deadline, pipe, proc = time.monotonic() + START_TIMEOUT_S, self.pipes[name], self.procs[name]
        while time.monotonic() < deadline:
            if pipe.poll(0.2):
                try:
                    msg = io.ready_decoder.decode(pipe.recv_bytes())
                except EOFError:                  # it died before writing anything
                    proc.join(5)
                    raise SystemExit(f"{name} process died while starting (exit code {proc.exitcode})") from None
                if msg.error:
                    raise SystemExit(f"{name} process failed to start: {msg.error}")
                return msg.info
            if not proc.is_alive():
                raise SystemExit(f"{name} process died while starting (exit code {proc.exitcode})")
        raise SystemExit(f"{name} process did not become ready in {START_TIMEOUT_S} s")

    def dead(self) -> dict[str, int]:
        """name -> exit code of each child that has exited."""
        return {n: p.exitcode for n, p in self.procs.items() if not p.is_alive()}

    def stop(self) -> None:
        self.stopping = True
        for p in self.procs.values():
            if p.is_alive():
                p.terminate()
        for p in self.procs.values():
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(1)


def watchdog(children: Children, server, state: dict) -> None:
    """Poll the children; a dead one stops the server, with a hard fallback. Exit code 0 means
    a child was told to stop (a SIGTERM to the whole process group reaches it as soon as the
    launcher): a clean stop. Anything else is a crash, and the server exits with code 1."""
    while not children.stopping:
        dead = children.dead()
        if dead and not children.stopping:      # (a child we are stopping is not a crash)
            report_dead(dead, state)
            server.should_exit = True
            time.sleep(15)                      # uvicorn should be gone by now; if not, force it
            log.error("graceful shutdown timed out; exiting")
            os._exit(1)
        time.sleep(0.5)


def report_dead(dead: dict[str, int], state: dict) -> None:
    """Log which children exited; a non-zero exit code makes the server's exit code 1."""
    what = ", ".join(f"the {name} process {'died' if code else 'stopped'} (exit code {code})"
                     for name, code in dead.items())
    if any(dead.values()):
        log.error("%s; shutting the server down (exit code 1)", what)
        state["exit_code"] = 1
    else:
        log.info("%s; shutting the server down", what)


def stop_on_stall(server, state: dict, who: str = "scheduler") -> None:
    """--exit_on_scheduler_stall: stop with exit code 1, so a supervisor restarts the server.
    `who` stalled: the scheduler, or the detokenizer (the flag covers both)."""
    log.error("the %s stalled; shutting the server down (exit code 1)", who)
    state["exit_code"] = 1
    server.should_exit = True


def _raise_shutdown(signum, frame):
    _ignore_stop_signals()
    raise Shutdown(signal.Signals(signum).name)


def _ignore_stop_signals() -> None:
    """Once stopping, later SIGINT/SIGTERMs are ignored: the clean-up is bounded (5 s per child,
    then SIGKILL), and a signal inside it (a supervisor's second SIGTERM, Ctrl-C twice) would
    cut it short with a traceback and leave children and the ipc directory behind."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def read_chat_template(path: str) -> str:
    """--chat_template FILE: read and compile it now, so a bad file fails at start, not per request."""
    from jinja2 import TemplateError

    from server.chat_template import ChatTemplate
    try:
        source = Path(path).read_text()
        ChatTemplate(source)
    except (OSError, UnicodeError, TemplateError) as e:
        raise SystemExit(f"--chat_template {path}: {e}") from None
    return source


def start_backend(args: ServerArgs, endpoints: Endpoints, children: Children):
    """Spawn scheduler + detokenizer, load the tokenizer meanwhile, wait until both are ready."""
    from server.managers.detokenizer import run_detokenizer_process
    from server.managers.scheduler_process import run_scheduler_process
    from server.managers.tokenizer_manager import TokenizerManager
    from stage1_model.model_source import resolve_model_path, tokenizer_dir
    from stage1_model.tokenizer import load_tokenizer

    model_path = str(resolve_model_path(args.model))     # the demo model is written here, once
    children.spawn("scheduler", run_scheduler_process, args, endpoints)
    followers = spawn_followers(args, children)          # --tp > 1: ranks 1.. of this node (tp_launch.py)
    children.spawn("detokenizer", run_detokenizer_process, args, model_path, endpoints)
    log.info("loading %s on %s (scheduler process)", args.model, args.device)
    tokenizer = None if args.skip_tokenizer_init else load_tokenizer(tokenizer_dir(Path(model_path)))
    if args.chat_template and tokenizer is not None:          # the operator's template replaces the model's (never a request's)
        tokenizer.chat_template = read_chat_template(args.chat_template)
    info = wait_all_ready(children, ["scheduler", *followers])["scheduler"]
    children.wait_ready("detokenizer")
    log.info("model loaded: %d KV token slots, context length %d", info["max_total_tokens"], info["context_length"])
    return TokenizerManager(tokenizer, endpoints, info)


def serve_http(args: ServerArgs, tm, children: Children, state: dict) -> None:
    import uvicorn

    from server.entrypoints.http_guard import HeaderTimeoutH11Protocol
    from server.entrypoints.http_server import HTTPServer, build_app
    # Our h11 protocol (not "auto", which picks httptools when installed): it adds the header deadline.
    protocol = type("HTTPProtocol", (HeaderTimeoutH11Protocol,), {"header_timeout": args.header_timeout})
    config = uvicorn.Config(build_app(tm, args), host=args.host, port=args.port, log_level=args.log_level,
                            log_config=None, access_log=args.log_level == "debug", timeout_graceful_shutdown=3,
                            http=protocol, timeout_keep_alive=5)
    server = HTTPServer(config, tm)
    if args.exit_on_scheduler_stall:
        tm.on_stall = lambda who: stop_on_stall(server, state, who)
    threading.Thread(target=watchdog, args=(children, server, state), daemon=True, name="watchdog").start()
    server.run()


def launch_server(args: ServerArgs) -> int:
    """Run the server until a signal or a crash; return the exit code (0: stopped cleanly)."""
    setup_logging(args.log_level, "server")
    args = with_dist_addr(args)
    if args.node_rank == 0:                     # only node 0 serves HTTP
        check_port(args.host, args.port)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_shutdown)
    endpoints, children, state = Endpoints.create(), Children(), {"exit_code": 0}
    try:
        if args.node_rank > 0:                  # --nnodes: this node only runs its TP ranks
            run_follower_node(args, children, state)
        else:
            serve_http(args, start_backend(args, endpoints, children), children, state)
    except Shutdown as e:
        log.info("received %s; shutting down", e)
    except SystemExit as e:                     # a start-up failure (message) or uvicorn's exit code
        state["exit_code"] = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int):
            log.error("%s", e.code)
    except (FileNotFoundError, ValueError) as e:  # e.g. no such model: a message, not a traceback
        log.error("%s", e)
        state["exit_code"] = 1
    finally:
        _ignore_stop_signals()
        children.stop()
        endpoints.remove()
    return state["exit_code"]


def main(argv: list[str] | None = None) -> None:
    sys.exit(launch_server(parse_args(argv)))


if __name__ == "__main__":
    main()
