"""Chapter 5's demo: overlap gives the same tokens, and the padded graph batch is exact."""
import pytest

pytestmark = pytest.mark.stage5


def test_demo_shows_overlap_and_padding(capsys):
    from stage5_tp_cudagraph.demo import main
    res = main(["--device", "cpu", "--steps", "6"])
    out = capsys.readouterr().out
    assert res["same"] and "overlap == synchronous, token for token: True" in out
    assert [r.finish_reason["type"] for r in res["reqs"]] == ["length", "length", "stop"]
    assert res["max_logit_diff"] < 1e-4 and res["scratch_written"]
    assert out.count("finished r2") == 1            # reported once, its extra token never
    res["engine"].check_integrity()
