"""Argument checks and layer helpers shared by the network builders."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import keras

from keras_gradreg.layers import FastDropout


def check_rate(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"`{name}` must be a number in [0, 1). Received: {name}={value!r}")
    return float(value)


def check_norm(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(
            f"`{name}` must be a finite number > 0 or None. Received: {name}={value!r}"
        )
    return float(value)


def check_positive_ints(name: str, value: Any) -> tuple[int, ...]:
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or not value
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)
    ):
        raise ValueError(
            f"`{name}` must be a non-empty sequence of positive integers. "
            f"Received: {name}={value!r}"
        )
    return tuple(value)


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
        raise ValueError(
            f"`input_shape` must be a non-empty tuple. Received: input_shape={input_shape!r}"
        )
    input_shape = check_positive_ints("input_shape", input_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(
            f"`num_classes` must be an integer >= 2. Received: num_classes={num_classes!r}"
        )
    if preprocessing is not None and not isinstance(preprocessing, keras.layers.Layer):
        raise ValueError(
            "`preprocessing` must be a keras.layers.Layer or None. "
            f"Received: preprocessing={preprocessing!r}"
        )
    return (
        input_shape,
        check_rate("input_dropout", input_dropout),
        check_rate("hidden_dropout", hidden_dropout),
        check_norm("max_norm", max_norm),
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
