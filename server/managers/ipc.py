"""ZMQ plumbing shared by the three processes.

Endpoints are `ipc://` sockets inside a private temporary directory (mode 0700, removed at
exit), so only this user can talk to them and nothing listens on the network. Each process
binds one PULL socket for what it receives and connects PUSH sockets to the others:

    <dir>/scheduler    <- TokenizerManager
    <dir>/detokenizer  <- scheduler
    <dir>/tokenizer    <- detokenizer, scheduler (control replies)

High-water marks are 0 (unbounded): a full queue would otherwise silently drop or block.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

import zmq


@dataclass
class Endpoints:
    dir: str
    scheduler: str
    detokenizer: str
    tokenizer: str

    @classmethod
    def create(cls) -> "Endpoints":
        d = tempfile.mkdtemp(prefix="mini-sglang-")      # created with mode 0700
        os.chmod(d, 0o700)
        return cls(d, f"ipc://{d}/scheduler", f"ipc://{d}/detokenizer", f"ipc://{d}/tokenizer")

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def pull_socket(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.bind(endpoint)
    return sock


def push_socket(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)       # at shutdown, do not wait to deliver to a dead peer
    sock.connect(endpoint)
    return sock


def parent_alive(parent_pid: int) -> bool:
    """A child re-parented away from the launcher means the launcher died: exit too."""
    return os.getppid() == parent_pid
