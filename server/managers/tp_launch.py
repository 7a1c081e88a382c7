"""Starting tensor-parallel ranks: one scheduler process per rank, on one node or several.

    --tp 2                          node 0 runs ranks 0 and 1 (rank 0 is "the scheduler")
    --tp 4 --nnodes 2 --node_rank 1 --dist_init_addr HOST:PORT
                                    this node runs ranks 2 and 3 and nothing else: no HTTP,
                                    no tokenizer, no detokenizer; it lives as long as they do

              node 0                                        node 1
    launcher: HTTP + TokenizerManager                launcher (no HTTP)
      ├─ scheduler (rank 0) ──ZMQ──> detokenizer       ├─ scheduler-tp2 (rank 2)
      │     │ broadcast: new requests, aborts          └─ scheduler-tp3 (rank 3)
      └─ scheduler-tp1 (rank 1) <───────┴──── gloo / NCCL, tcp://HOST:PORT ───┘

Rank 0 listens at --dist_init_addr (on one node: a free local port picked here). Every
launcher watches its own children: a rank that dies ends its node with exit code 1, and
the other nodes notice through the process group (the next broadcast fails) and follow.
"""
from __future__ import annotations

import dataclasses
import logging
import socket
import time

from server.args import ServerArgs

log = logging.getLogger("server")


def with_dist_addr(args: ServerArgs) -> ServerArgs:
    """One node and no --dist_init_addr: rank 0 listens on a free loopback port."""
    if args.tp == 1 or args.dist_init_addr:
        return args
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return dataclasses.replace(args, dist_init_addr=f"127.0.0.1:{port}")


def local_follower_ranks(args: ServerArgs) -> list[int]:
    """The ranks > 0 this node runs (node 0 also runs rank 0, the scheduler proper)."""
    per_node = args.tp // args.nnodes
    first = args.node_rank * per_node
    return [r for r in range(first, first + per_node) if r != 0]


def spawn_followers(args: ServerArgs, children) -> list[str]:
    from server.managers.scheduler_process import run_tp_follower_process
    names = []
    for rank in local_follower_ranks(args):
        children.spawn(f"scheduler-tp{rank}", run_tp_follower_process, args, rank)
        names.append(f"scheduler-tp{rank}")
    return names


def run_follower_node(args: ServerArgs, children, state: dict) -> None:
    """--node_rank > 0: start this node's ranks, then wait until they end."""
    names = spawn_followers(args, children)
    for name in names:
        children.wait_ready(name)
    log.info("node %d of %d: TP ranks %s joined; node 0 (%s) serves HTTP", args.node_rank, args.nnodes,
             local_follower_ranks(args), args.dist_init_addr)
    while not (dead := children.dead()):
        time.sleep(0.5)
    what = ", ".join(f"{n} (exit code {c})" for n, c in dead.items())
    if any(dead.values()):
        log.error("%s ended; stopping this node (exit code 1)", what)
        state["exit_code"] = 1
    else:
        log.info("%s stopped (rank 0 said so); stopping this node", what)


def wait_all_ready(children, names: list[str]) -> dict[str, dict]:
    """Every named child's ready report. A child that dies meanwhile fails the start at once:
    the ranks still waiting for it to join would otherwise sit out --dist_timeout."""
    infos: dict[str, dict] = {}
    while len(infos) < len(names):
        for name in names:
            if name not in infos and children.pipes[name].poll(0.1):
                infos[name] = children.wait_ready(name)      # a report is there: returns (or raises) at once
        if dead := children.dead():
            name, code = next(iter(dead.items()))
            raise SystemExit(f"{name} process died while starting (exit code {code})")
    return infos
