"""Argument checks and layer helpers shared by the network builders."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras

from keras_gradreg import _checks
from keras_gradreg.layers import FastDropout


def check_norm(value: Any, name: str) -> float | None:
    """None (no constraint) or a finite number > 0."""
    return None if value is None else _checks.check_positive(value, name)


def check_positive_ints(value: Any, name: str) -> tuple[int, ...]:
    """A non-empty sequence of integers >= 1, as a tuple."""
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        _checks.fail(name, "a non-empty sequence of positive integers", value)
    try:
        return tuple(_checks.check_count(v, name) for v in value)
    except ValueError:
        _checks.fail(name, "a non-empty sequence of positive integers", value)


def check_common(
    input_shape: Any,
    num_classes: Any,
    input_dropout: Any,
    hidden_dropout: Any,
    max_norm: Any,
    preprocessing: Any,
) -> tuple[tuple[int, ...], float, float, float | None]:
    """Validates the arguments every builder takes; returns them normalised."""
    if not isinstance(input_shape, (tuple, list)) or not input_shape:
        _checks.fail("input_shape", "a non-empty tuple", input_shape)
    if preprocessing is not None and not isinstance(preprocessing, keras.layers.Layer):
        _checks.fail("preprocessing", "a keras.layers.Layer or None", preprocessing)
    _checks.check_count(num_classes, "num_classes", minimum=2)
    return (
        check_positive_ints(input_shape, "input_shape"),
        _checks.check_rate(input_dropout, "input_dropout"),
        _checks.check_rate(hidden_dropout, "hidden_dropout"),
        check_norm(max_norm, "max_norm"),
    )


def dense_constraint(max_norm: float | None):
    """Bounds the L2 norm of each output unit's incoming weights (pylearn2's max_col_norm)."""
    return None if max_norm is None else keras.constraints.MaxNorm(max_norm, axis=0)


def conv_constraint(max_norm: float | None):
    """Bounds the L2 norm of each filter (pylearn2's max_kernel_norm)."""
    return None if max_norm is None else keras.constraints.MaxNorm(max_norm, axis=[0, 1, 2])


def dropout(x, rate: float, name: str):
    """`FastDropout` (fast under XLA on CPU, see its docstring) unless rate is 0."""
    return FastDropout(rate, name=name)(x) if rate > 0 else x


def logits(x, num_classes: int, hidden_dropout: float, max_norm: float | None, depth: int):
    """Dropout, then the float32 logits layer."""
    x = dropout(x, hidden_dropout, f"dropout_{depth}")
    return keras.layers.Dense(
        num_classes, kernel_constraint=dense_constraint(max_norm), dtype="float32", name="logits"
    )(x)
