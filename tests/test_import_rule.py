"""Stages import backward only: an AST check over every module.

The rule and its reason: docs/design.md#stages-import-backward-only."""
import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.stage1
ROOT = Path(__file__).resolve().parents[1]
ORDER = ["stage1_model", "stage2_runner", "stage3_scheduler", "stage4_radix", "stage5_tp_cudagraph", "server"]


def imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("pkg", ORDER[:-1])
def test_stage_imports_only_earlier_stages(pkg):
    rank = ORDER.index(pkg)
    files = list((ROOT / pkg).rglob("*.py"))
    if pkg != "stage5_tp_cudagraph":
        assert files, f"{pkg} has no modules"
    for f in files:
        forward = imported_packages(f) & set(ORDER[rank + 1:])
        assert not forward, f"{f.relative_to(ROOT)} imports later stage(s) {sorted(forward)}"


def test_checker_catches_a_forward_import(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("from server.x import y\nimport stage3_scheduler.engine\n")
    assert imported_packages(bad) >= {"server", "stage3_scheduler"}
