"""The examples `evaluate_robustness` attacks: collected, checked, and how the model's outputs read.

Bad data is refused before any attack runs, each time with one `DataError`
(a `ValueError`) that names the argument and what was received: inputs
outside the `clip` box or not finite, labels that are not the model's
classes, shapes that do not fit the model. For a model without a compiled
loss, the outputs on the evaluated examples say whether they are
probabilities or logits (`looks_like_probabilities`).
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_gradreg._checks import Clip

# A probability row sums to 1 within this (float32 softmax over 1000 classes: ~1e-5).
SUM_TOLERANCE = 1e-3


class DataError(ValueError):
    """Bad examples or labels in `evaluate_robustness`'s `data` (the command names its flag)."""


def collect(data: Any, max_examples: int | None) -> tuple[np.ndarray, np.ndarray]:
    """All examples of `data` (up to `max_examples`) as numpy arrays x (float), y."""
    if isinstance(data, tf.data.Dataset):
        spec = data.element_spec
        if not isinstance(spec, tuple) or len(spec) < 2:
            raise DataError(
                "`data` must yield (x, y) or (x, y, sample_weight) batches; labels "
                f"are needed. Received: data with element_spec={spec!r}"
            )
        xs, ys, count = [], [], 0
        for batch in data:
            if max_examples is not None and count >= max_examples:
                break
            xs.append(np.asarray(batch[0]))
            ys.append(np.asarray(batch[1]))
            count += len(xs[-1])
        if not xs:
            raise DataError(f"`data` yielded no examples. Received: data={_short_repr(data)}")
        x, y = np.concatenate(xs), np.concatenate(ys)
    elif isinstance(data, (tuple, list)) and len(data) in (2, 3) and data[1] is not None:
        x, y = np.asarray(data[0]), np.asarray(data[1])
    else:
        raise DataError(
            "`data` must be a tf.data.Dataset of (x, y) batches or a tuple (x, y) of "
            f"arrays; labels are needed. Received: data={_short_repr(data)}"
        )
    if max_examples is not None:
        x, y = x[:max_examples], y[:max_examples]
    if len(x) == 0 or len(x) != len(y) or x.ndim < 2:
        raise DataError(
            "`data` must hold a batch of examples (rank >= 2) and one label per "
            f"example. Received: x with shape {x.shape} and y with shape {y.shape}"
        )
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise DataError(f"`data`'s inputs must be numbers. Received: x with dtype {x.dtype}")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    return x, y


def check_inputs(x: np.ndarray, clip: Clip) -> None:
    """Refuses inputs that are not finite or lie outside the `clip` box."""
    finite = np.isfinite(x)
    if not finite.all():
        first = int(np.flatnonzero(~finite.reshape(len(x), -1).all(axis=1))[0])
        raise DataError(
            "`data`'s inputs must be finite. Received: x with "
            f"{int(np.isnan(x).sum())} NaN and {int(np.isinf(x).sum())} infinite values "
            f"(the first in example {first})"
        )
    if clip is None:
        return
    low, high = (np.asarray(bound, np.float64) for bound in clip)
    outside = (x < low) | (x > high)
    if outside.any():
        raise DataError(
            f"`data`'s inputs must lie in the `clip` box [{_bound(low)}, {_bound(high)}] "
            "(scale them into it, or pass the box they live in as `clip`). Received: "
            f"x from {float(x.min()):g} to {float(x.max()):g}, {int(outside.sum())} values "
            f"outside, with clip={_short_repr(clip)}"
        )


def model_outputs(model: keras.Model, x: np.ndarray, batch_size: int) -> np.ndarray:
    """The model's outputs on `x` (inference), batch by batch; a shape mismatch is a DataError."""
    check_input_shape(model, x)
    parts = []
    for first in range(0, len(x), batch_size):
        try:
            outputs = model(tf.constant(x[first : first + batch_size]), training=False)
        except (ValueError, TypeError, tf.errors.InvalidArgumentError) as error:
            if first:
                raise
            reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise DataError(
                f"`data`'s inputs do not fit the model ({reason[:300]}). "
                f"Received: x with shape {x.shape}"
            ) from error
        if isinstance(outputs, (dict, list, tuple)):
            raise DataError(
                "The model must have one output (class scores). Received: outputs "
                f"{_short_repr(tf.nest.map_structure(lambda t: tuple(t.shape), outputs))}"
            )
        parts.append(np.asarray(tf.cast(outputs, tf.float32)))
    return np.concatenate(parts)


def check_input_shape(model: keras.Model, x: np.ndarray) -> None:
    """Refuses inputs whose shape differs from the model's declared input shape."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return
    if not inputs or len(inputs) != 1:
        return
    expected = tuple(inputs[0].shape)[1:]
    received = x.shape[1:]
    if len(expected) != len(received) or any(
        e is not None and e != r for e, r in zip(expected, received)
    ):
        shape = "(batch, " + ", ".join("None" if e is None else str(e) for e in expected) + ")"
        raise DataError(
            f"`data`'s inputs must have the model's input shape {shape}. "
            f"Received: x with shape {x.shape}"
        )


def num_classes(outputs: np.ndarray) -> int:
    """Classes of outputs shaped (n, classes) (2 for one output per example)."""
    return max(int(np.prod(outputs.shape[1:])) if outputs.ndim > 1 else 1, 2)


def check_labels(y: np.ndarray, outputs: np.ndarray) -> None:
    """Refuses labels that are neither indices of the model's classes nor targets like its outputs.

    Accepted: class indices of shape (n,) or (n, 1) in [0, classes) (0 or 1
    for a model with one output), or one-hot / probability targets shaped like
    the outputs.
    """
    classes = num_classes(outputs)
    if not (np.issubdtype(y.dtype, np.number) or y.dtype == bool):
        raise DataError(f"`data`'s labels must be numbers. Received: y with dtype {y.dtype}")
    if not np.isfinite(y).all():
        raise DataError(
            f"`data`'s labels must be finite. Received: y with {int(np.isnan(y).sum())} NaN "
            f"and {int(np.isinf(y).sum())} infinite values"
        )
    if y.ndim >= 2 and y.shape[1:] == outputs.shape[1:] and outputs.shape[-1] > 1:
        if y.min() < 0 or y.max() > 1:
            raise DataError(
                "`data`'s one-hot labels must lie in [0, 1]. "
                f"Received: y from {float(y.min()):g} to {float(y.max()):g}"
            )
        return
    if not (y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1)):
        raise DataError(
            f"`data`'s labels must be class indices of shape ({len(y)},) or ({len(y)}, 1), "
            f"or one-hot like the model's outputs, shape {(len(y), *outputs.shape[1:])}. "
            f"Received: y with shape {y.shape}"
        )
    whole = y == np.round(y)
    if not whole.all():
        index = int(np.flatnonzero(~whole.reshape(-1))[0])
        raise DataError(
            "`data`'s labels must be whole class indices. "
            f"Received: y[{index}]={y.reshape(-1)[index].item()!r}"
        )
    outside = (y < 0) | (y >= classes)
    if outside.any():
        raise DataError(
            f"`data`'s labels must be class indices in [0, {classes - 1}] for a model with "
            f"{classes} classes. Received: labels from {y.min():g} to {y.max():g} "
            f"({int(outside.sum())} outside)"
        )


def looks_like_probabilities(outputs: np.ndarray) -> bool:
    """Whether every row is non-negative and sums to 1 (within `SUM_TOLERANCE`).

    A model with one output per example: whether every output lies in [0, 1]
    (a sigmoid).
    """
    rows = np.asarray(outputs, np.float64).reshape(len(outputs), -1)
    if rows.shape[1] == 1:
        return bool(np.all((rows >= 0) & (rows <= 1)))
    return bool(np.all(rows >= 0) and np.all(np.abs(rows.sum(axis=1) - 1.0) <= SUM_TOLERANCE))


def cross_entropy(y: np.ndarray, outputs: np.ndarray, from_logits: bool) -> keras.losses.Loss:
    """The Keras cross-entropy for these labels and outputs (sparse, one-hot or binary)."""
    if outputs.ndim == 1 or int(np.prod(outputs.shape[1:])) == 1:
        return keras.losses.BinaryCrossentropy(from_logits=from_logits)
    if y.ndim >= 2 and y.shape[1:] == outputs.shape[1:]:
        return keras.losses.CategoricalCrossentropy(from_logits=from_logits)
    return keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)


def _bound(bound: np.ndarray) -> str:
    if bound.ndim == 0:
        return f"{float(bound):g}"
    return f"{float(bound.min()):g}..{float(bound.max()):g}"


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 200 else text[:197] + "..."
