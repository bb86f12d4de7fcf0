"""Names that moved or were renamed, kept working for one release with a warning.

Each warning is a `DeprecationWarning` that names the replacement and the
release that removes the old name (`REMOVED_IN`); CHANGELOG.md lists them.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Any

REMOVED_IN = "0.3.0"


def warn(old: str, new: str, stacklevel: int = 3) -> None:
    """Warns that `old` is deprecated in favour of `new`."""
    warnings.warn(
        f"`{old}` is deprecated and will be removed in keras_gradreg {REMOVED_IN}: use {new}.",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


def moved_message(old: str, new: str) -> str:
    """The warning for the internal module `new` reached under its old public name `old`."""
    return (
        f"`{old}` is an internal module: its public name is deprecated and will be removed "
        f"in keras_gradreg {REMOVED_IN}. Its code is in `{new}`, which is not public API."
    )


def moved_module(old: str, new: str) -> None:
    """Run by the shim module `old` as it is imported: it becomes `new`, with a warning."""
    warnings.warn(moved_message(old, new), DeprecationWarning, stacklevel=3)
    sys.modules[old] = importlib.import_module(new)


def renamed(module: str, names: dict[str, tuple[str, Any]], name: str) -> Any:
    """A module `__getattr__`'s answer for the old `name` of `names` (old -> (new, object))."""
    if name not in names:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    new, value = names[name]
    warn(f"{module}.{name}", f"`{new}`", 4)
    return value
