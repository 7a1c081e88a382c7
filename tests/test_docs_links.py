"""The course must be followable from the repository alone.

1. Every relative link in every Markdown file points at a file that exists, and every
   `#section` anchor at a heading of that file (GitHub's anchor rules).
2. No text refers to documents or tools that live outside the repository: the design
   document is docs/design.md. A file not yet fixed is listed in PENDING, and the list is
   strict: once a file is clean, the test asks for its removal from the list.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", "node_modules", "__pycache__", ".pytest_cache", ".hypothesis", ".venv", "venv"}
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# Built from pieces so that this file does not match itself.
OUTSIDE = re.compile("|".join([r"\bDESIGN" + r"\.md", r"\.\./" + "shared", r"\bshared" + "/",
                               r"`" + "device` tool"]))
# Files that still cite the outside document (to be reworded to docs/design.md): none left.
PENDING: set[str] = set()


def candidate_files() -> list[Path]:
    """The repository's own files: in a git checkout, tracked or new but never ignored (so a
    virtualenv, build outputs or local scratch inside the tree are not read); elsewhere
    (an unpacked archive) every file outside SKIP_DIRS."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=ROOT, capture_output=True, check=True, timeout=60).stdout
        return [ROOT / name for name in listed.decode().split("\0") if name]
    except (OSError, subprocess.SubprocessError):
        return list(ROOT.rglob("*"))


def repo_files(*suffixes: str) -> list[Path]:
    return sorted(p for p in candidate_files() if p.suffix in suffixes and p.is_file()
                  and not SKIP_DIRS & set(p.relative_to(ROOT).parts)
                  and not any(part.endswith(".egg-info") for part in p.parts))


def strip_code_blocks(md: str) -> str:
    return re.sub(r"^(```|~~~).*?^\1", "", md, flags=re.S | re.M)


def strip_code(md: str) -> str:
    """Links inside fenced blocks or inline code are examples, not links."""
    return re.sub(r"`[^`\n]*`", "", strip_code_blocks(md))


def anchors(md: str) -> set[str]:
    """GitHub's heading ids: lowercase, punctuation dropped, spaces -> '-', '-N' for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for line in strip_code_blocks(md).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(path: Path) -> list[str]:
    return [t for t in LINK.findall(strip_code(path.read_text(encoding="utf-8")))
            if not re.match(r"[a-z][a-z0-9+.-]*:", t)]          # http:, https:, mailto:


MARKDOWN = repo_files(".md")


def test_the_design_document_exists_and_chapters_link_to_it():
    assert (ROOT / "docs" / "design.md").is_file()
    for ch in ["stage1_model", "stage2_runner", "stage3_scheduler", "stage4_radix"]:
        assert any("docs/design.md#" in t for t in links(ROOT / ch / "README.md")), ch


@pytest.mark.parametrize("md", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(md: Path):
    broken = []
    for target in links(md):
        file, _, anchor = target.partition("#")
        dest = (md.parent / file).resolve() if file else md
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
            broken.append(f"{target}: no heading with id '{anchor}' in {dest.relative_to(ROOT)}")
    assert not broken, broken


def test_nothing_refers_outside_the_repository():
    hits = {}
    for p in repo_files(".md", ".py", ".toml", ".sh", ".cfg", ".txt"):
        rel = str(p.relative_to(ROOT))
        found = [f"{i}: {line.strip()}" for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
                 if OUTSIDE.search(line)]
        if found:
            hits[rel] = found
    assert not {k: v for k, v in hits.items() if k not in PENDING}, "point these at docs/design.md"
    fixed = PENDING - set(hits)
    assert not fixed, f"these files are clean now; remove them from PENDING: {sorted(fixed)}"


def test_the_anchor_rule():
    md = "# A title\n## The seams\n## Tests (`python -m pytest -m stage1`)\n## The seams\n```\n# not a heading\n```"
    assert anchors(md) == {"a-title", "the-seams", "tests-python--m-pytest--m-stage1", "the-seams-1"}
