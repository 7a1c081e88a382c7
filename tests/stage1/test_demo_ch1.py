"""Chapter 1's demo, run with its defaults: it prints what the chapter claims."""
import pytest
import torch

pytestmark = pytest.mark.stage1


def test_demo_shows_top5_and_matches_hf(capsys):
    from stage1_model.demo import main
    res = main([])
    out = capsys.readouterr().out
    assert res["max_abs_diff"] is not None and res["max_abs_diff"] < 1e-4     # float32 on CPU
    probs = res["top_probs"]
    assert len(probs) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1
    assert res["output_ids"][0] == res["top_ids"][0]              # greedy takes the top-1
    assert "max |ours - HF|" in out and "top-5 next tokens" in out
    assert "tok/s" not in out                                      # deterministic output only


def test_demo_twice_prints_the_same(capsys):
    from stage1_model.demo import main
    if torch.cuda.is_available():
        pytest.skip("CPU determinism check")
    main(["--skip_hf", "--max_new_tokens", "4"])
    first = capsys.readouterr().out
    main(["--skip_hf", "--max_new_tokens", "4"])
    assert capsys.readouterr().out == first
