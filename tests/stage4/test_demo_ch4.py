"""Chapter 4's demo: the cached_tokens it prints, and the forwarded-token identity."""
import pytest

pytestmark = pytest.mark.stage4


@pytest.mark.parametrize("page_size,cached", [(1, [33, 26, 26, 0]), (16, [32, 16, 16, 0])])
def test_demo_reuses_the_system_prompt(page_size, cached, capsys):
    from stage4_radix.demo import main
    res = main(["--page_size", str(page_size)])
    out = capsys.readouterr().out
    first, second = res["rounds"]
    assert first[0]["meta_info"]["cached_tokens"] == 0
    assert [o["meta_info"]["cached_tokens"] for o in second] == cached
    m = [o["meta_info"] for o in first + second]
    assert res["forwarded"] == sum(x["prompt_tokens"] - x["cached_tokens"] + x["completion_tokens"] - 1 for x in m)
    assert "root (evictable" in out and "after evict(1)" in out
    res["engine"].check_integrity()
