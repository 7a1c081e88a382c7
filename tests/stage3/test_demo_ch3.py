"""Chapter 3's demo: it prints admissions, chunks and retractions, and they are right."""
import re

import pytest

pytestmark = pytest.mark.stage3


def test_demo_prints_its_decisions(tmp_path, capsys):
    from stage3_scheduler.demo import WORKLOAD, main
    trace = tmp_path / "t.jsonl"
    res = main(["--trace", str(trace)])
    out = capsys.readouterr().out
    reqs = res["reqs"]
    assert all(r.finish_reason["type"] == "length" for r in reqs)
    assert [len(r.output_ids) for r in reqs] == [n for _, n in WORKLOAD]
    assert res["retractions"] >= 1                          # the pool is too small on purpose
    retracts = re.findall(r"RETRACT r\d+: (\d+) tokens generated \(the others (\d+)\.\.\d+\)", out)
    assert len(retracts) == res["retractions"]
    assert all(int(n) <= int(m) for n, m in retracts)       # the victim had the fewest tokens
    assert "chunk r5 (128/157 prompt tokens computed)" in out  # 157-token prompt, 128-token chunks
    assert len(re.findall(r"admit r\d", out)) == len(reqs) + res["retractions"]
    assert sum(1 for _ in open(trace)) == res["steps"]       # one trace line per step
    assert "tok/s" not in out
