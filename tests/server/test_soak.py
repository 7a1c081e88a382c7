"""The soak harness (bench/soak.py) end to end: a short run on a demo server with a small KV
pool must finish with no unexpected outcome, every slot back after a flush, and a flat RSS.
`SOAK_SECONDS=60` gives the CI-length run; the default keeps the suite quick."""
from __future__ import annotations

import json
import os

import pytest

from bench import soak
from live_server import free_port

pytestmark = pytest.mark.server


def test_short_soak_is_clean(capsys):
    seconds = os.environ.get("SOAK_SECONDS", "8")
    rc = soak.main(["--seconds", seconds, "--clients", "4", "--pool", "512", "--port", str(free_port())])
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{"):])
    assert rc == 0, out
    assert summary["unexpected"] == {} and summary["ok"] is True
