"""Argument checks shared by the library: one wording for every bad value.

Each check returns the value in canonical form (a Python float or int) or
raises `ValueError` whose message names the argument and ends with
`Received: name=value`, before any work starts. Booleans are never numbers
here (`True` is an `int` to Python, never a sensible radius or count).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NoReturn

import numpy as np

Clip = tuple[Any, Any] | None


def fail(name: str, requirement: str, value: Any) -> NoReturn:
    """Raises the one `ValueError` wording: "`name` must be <requirement>. Received: ..."."""
    raise ValueError(f"`{name}` must be {requirement}. Received: {name}={value!r}")


def inf_as_text(value: Any) -> Any:
    """`value`, with an infinite number written "inf" or "-inf" (JSON has no infinity).

    The one way the library, the binary and the experiments write an infinite
    p or radius to JSON; `keras_gradreg.norms.canonical_p` reads "inf" back.
    In text, `f"{p:g}"` writes it the same way.
    """
    if is_number(value) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def is_number(value: Any) -> bool:
    """Whether `value` is a real Python or NumPy scalar and not a bool."""
    return not isinstance(value, (bool, np.bool_)) and isinstance(
        value, (int, float, np.integer, np.floating)
    )


def check_number(value: Any, name: str) -> float:
    """A real number that is not NaN (infinities allowed), as a float."""
    if not is_number(value):
        raise ValueError(f"`{name}` must be a number. Received: {name}={value!r}")
    if math.isnan(float(value)):
        raise ValueError(f"`{name}` must not be NaN. Received: {name}={value!r}")
    return float(value)


def check_nonnegative(value: Any, name: str) -> float:
    """A finite number >= 0 (a radius, a tolerance), as a float."""
    if not is_number(value) or not math.isfinite(float(value)) or float(value) < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0. Received: {name}={value!r}")
    return float(value)


def check_positive(value: Any, name: str) -> float:
    """A finite number > 0 (a step length), as a float."""
    if not is_number(value) or not 0.0 < float(value) < math.inf:
        raise ValueError(f"`{name}` must be a finite number > 0. Received: {name}={value!r}")
    return float(value)


def check_unit_interval(value: Any, name: str) -> float:
    """A number in [0, 1] (a weight or a fraction), as a float."""
    value = check_number(value, name)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must be in [0, 1]. Received: {name}={value!r}")
    return value


def check_fraction(value: Any, name: str) -> float:
    """A number in (0, 1] (a share that must not be empty), as a float."""
    if not is_number(value) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"`{name}` must be a number in (0, 1]. Received: {name}={value!r}")
    return float(value)


def check_rate(value: Any, name: str) -> float:
    """A number in [0, 1) (a dropout rate, a momentum), as a float."""
    if not is_number(value) or not 0.0 <= float(value) < 1.0:
        fail(name, "a number in [0, 1)", value)
    return float(value)


def check_count(value: Any, name: str, minimum: int = 1) -> int:
    """An integer >= `minimum` (steps, restarts, a batch size; 0 for an epoch count), as an int."""
    if not is_number(value) or not isinstance(value, (int, np.integer)) or value < minimum:
        fail(name, f"an integer >= {minimum}", value)
    return int(value)


def check_bool(value: Any, name: str) -> bool:
    """True or False (a NumPy bool too), as a bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"`{name}` must be True or False. Received: {name}={value!r}")
    return bool(value)


def check_seed(value: Any, name: str = "seed") -> int | None:
    """An integer seed or None."""
    if value is None:
        return None
    if not is_number(value) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"`{name}` must be an integer or None. Received: {name}={value!r}")
    return int(value)


def check_choice(value: Any, name: str, choices: Iterable[Any]) -> Any:
    """One of `choices` (compared with ==)."""
    choices = tuple(choices)
    try:
        found = value in choices
    except (TypeError, ValueError):  # An array compared with a choice.
        found = False
    if not found:
        raise ValueError(f"`{name}` must be one of {choices}. Received: {name}={value!r}")
    return value


def check_clip(clip: Clip, name: str = "clip") -> Clip:
    """None, or a pair (low, high) of numbers or arrays with low < high everywhere."""
    if clip is None:
        return None
    if not isinstance(clip, (tuple, list)) or len(clip) != 2:
        raise ValueError(f"`{name}` must be None or a pair (low, high). Received: {name}={clip!r}")
    try:
        low, high = (np.asarray(bound, dtype=np.float64) for bound in clip)
        ordered = bool(np.all(low < high))
    except (TypeError, ValueError):
        ordered = False
    if not ordered:
        raise ValueError(
            f"`{name}` must be a pair (low, high) with low < high. Received: {name}={clip!r}"
        )
    return (clip[0], clip[1])
