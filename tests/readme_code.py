"""The code blocks of README.md and docs/*.md, as the tests run them (a helper, not a test file).

A Python block that a test runs follows a marker naming it and the test:
`<!-- name: run by tests/test_x.py ... -->`; the test gets it with
`code_block(path, "name")`. A block no test runs follows `<!-- not run: why -->`.
tests/test_docs_code.py checks that every Python block has one of the two.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
GUIDE = ROOT / "docs" / "guide.md"
PAGES = (README, *sorted((ROOT / "docs").glob("*.md")))
# A marker comment, then (after blank space) a fenced block: (marker, language, code).
BLOCK = re.compile(r"(?:^<!--\s*((?:(?!-->).)*?)\s*-->\s*)?^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(path: Path) -> list[tuple[str | None, str, str]]:
    """(marker text or None, language, code) of each fenced block of `path`."""
    return [(m.group(1), m.group(2), m.group(3)) for m in BLOCK.finditer(path.read_text())]


def code_block(path: Path, name: str) -> str:
    """The Python block of `path` whose marker starts with `name:`."""
    found = [
        code
        for marker, language, code in blocks(path)
        if language == "python" and marker and marker.split(":", 1)[0].strip() == name
    ]
    assert len(found) == 1, f"{path.name} has {len(found)} Python blocks marked {name!r}"
    return found[0]
