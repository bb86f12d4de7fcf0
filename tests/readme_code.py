"""The README's code blocks, as the tests run them (a helper module, not a test file)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_custom_loop() -> str:
    """The code block that follows the `custom-loop` marker in README.md."""
    text = README.read_text()
    match = re.search(r"<!-- custom-loop:[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md has no custom-loop code block"
    return match.group(1)
