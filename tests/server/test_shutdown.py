"""A SIGTERM stops the server cleanly: exit code 0, no traceback in the log, no ipc directory
left behind. Also when the SIGTERM goes to the whole process group (systemd does this) and
reaches the children before the launcher stops them, and when a second one follows."""
from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from live_server import start_server

pytestmark = pytest.mark.server


def stream_one(url: str) -> None:
    """Keep the scheduler busy: a long stream, cut by the shutdown (a 503 event or a closed socket)."""
    body = {"text": "x", "stream": True, "sampling_params": {"max_new_tokens": 1500, "ignore_eos": True}}
    try:
        with httpx.stream("POST", url + "/generate", json=body, timeout=60) as r:
            for _ in r.iter_lines():
                pass
    except httpx.HTTPError:
        pass


@pytest.mark.parametrize("how", ["launcher", "group, twice"])
def test_sigterm_exits_0_without_a_traceback(tmp_path, monkeypatch, how):
    monkeypatch.setenv("TMPDIR", str(tmp_path))     # where the server makes its ipc directory
    srv = start_server(tmp_path, new_session=True)
    busy = threading.Thread(target=stream_one, args=(srv.url,), daemon=True)
    busy.start()
    time.sleep(0.5)                         # the stream is running now
    if how == "launcher":
        srv.proc.send_signal(signal.SIGTERM)
    else:                                   # a supervisor's SIGTERM, then its impatient second one
        os.killpg(srv.proc.pid, signal.SIGTERM)
        time.sleep(0.05)
        os.killpg(srv.proc.pid, signal.SIGTERM)
    try:
        rc = srv.proc.wait(30)
    finally:
        srv.stop()                          # (only if it is still running: a failed test)
    log = srv.log()
    assert rc == 0 and "Traceback" not in log and "died" not in log, log[-3000:]
    assert not list(tmp_path.glob("mini-sglang-*")), "the ipc directory was left behind"
