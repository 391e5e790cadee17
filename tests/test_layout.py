"""Repository-wide source rules: a long module says why it is long, and comments and
docstrings speak of the code, not of documents outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "core" / "src", *sorted((ROOT / "plugins").glob("*/src"))]
TESTS = [ROOT / "tests", ROOT / "core" / "tests", *sorted((ROOT / "plugins").glob("*/tests"))]
MAX_LINES = 600
OUTSIDE = re.compile(r"DESIGN(\.md| §)|NATS-FACTS|TESTING\.md|\bissue #?\d+")


def _modules(roots: list[Path]) -> list[Path]:
    return sorted(p for r in roots for p in r.rglob("*.py") if "egg-info" not in str(p))


@pytest.mark.timeout(30)
def test_a_long_module_says_why_at_its_top() -> None:
    unexplained = []
    for path in _modules(SOURCES):
        text = path.read_text()
        if text.count("\n") > MAX_LINES:
            head = text.split('\n"""\n', 1)[0]  # the module docstring
            if "\nSize: " not in head:
                unexplained.append(f"{path.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    assert not unexplained, (f"modules over {MAX_LINES} lines without a 'Size: ...' reason in "
                             f"their docstring: {unexplained}")


@pytest.mark.timeout(30)
def test_sources_do_not_cite_documents_outside_the_repository() -> None:
    hits = []
    for path in _modules(SOURCES + TESTS):
        if path == Path(__file__).resolve():
            continue
        for no, line in enumerate(path.read_text().splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{no}: {line.strip()}")
    assert not hits, hits
