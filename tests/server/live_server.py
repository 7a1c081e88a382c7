"""Helpers for the server tests: run a real server in a subprocess, poll its state.

`start_server(tmp_dir, *flags)` runs `python -m server.launch_server` on the demo model (CPU,
a free loopback port, a small KV pool) and returns once /health answers. Imported as
`from live_server import ...` (pytest puts this directory on sys.path).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
POOL_TOKENS = 2048


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerHandle:
    proc: subprocess.Popen
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"server ignored SIGTERM for {timeout} s\n{self.log()[-3000:]}")
        return self.proc.returncode


def start_server(tmp_dir: Path, *extra: str, timeout: float = 180, new_session: bool = False) -> ServerHandle:
    """new_session: the server leads its own process group, so a test can signal the whole
    group (as systemd does) without signalling pytest."""
    port = free_port()
    log_path = tmp_dir / f"server-{port}.log"
    cmd = [sys.executable, "-m", "server.launch_server", "--model", "demo", "--device", "cpu", "--port", str(port),
           "--max_total_tokens", str(POOL_TOKENS), *extra]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                            start_new_session=new_session)
    handle = ServerHandle(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode} while starting\n{handle.log()[-3000:]}")
        try:
            if httpx.get(handle.url + "/health", timeout=1).status_code == 200:
                return handle
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    handle.stop()
    raise AssertionError(f"server not healthy after {timeout} s\n{handle.log()[-3000:]}")


def wait_idle(client, timeout: float = 10.0) -> dict:
    """Poll /get_server_info until nothing runs; return its internal state."""
    deadline = time.monotonic() + timeout
    while True:
        state = client.get("/get_server_info").json()["internal_states"][0]
        if state["num_running"] == 0 and state["num_waiting"] == 0 or time.monotonic() > deadline:
            return state


def assert_no_leak(state: dict) -> None:
    assert state["kv_free_slots"] + state["kv_cached_slots"] == state["kv_pool_size"], state
    assert state["kv_running_slots"] == 0, state
