"""Random subsets of a batch, for `GradientRegularizer(fraction < 1)`.

The subset of a step is a function of a two-number seed (drawn from the
regularizer's `keras.random.SeedGenerator`, so `keras.utils.set_random_seed`
makes runs reproduce and a saved model resumes the sequence) and of the
batch size. Each row gets a key from an integer hash (`keras_gradreg._hashing`)
of the seed and the row's index, and the m rows with the largest
keys form the subset: a uniformly random subset of size m, without
replacement. Integer arithmetic gives the same rows eagerly, in graphs and
under XLA (TensorFlow's stateless random ops do not: XLA's Philox differs
from the CPU kernel's), and NumPy can reproduce it (tests/test_lazy.py).
"""

from __future__ import annotations

import math
from typing import Any

import tensorflow as tf

from keras_gradreg._hashing import GOLDEN, mix, seed_base

# A fraction times a batch size that is an integer up to float rounding
# (0.3 * 100 = 30.000000000000004) must not round up to the next integer.
_ROUNDING = 1e-6


def subset_size(batch_size: int | tf.Tensor, fraction: float) -> int | tf.Tensor:
    """m = ceil(fraction * batch_size), at least 1 (float rounding forgiven)."""
    if isinstance(batch_size, int):
        return max(1, math.ceil(fraction * batch_size - _ROUNDING))
    product = fraction * tf.cast(batch_size, tf.float64) - _ROUNDING
    return tf.maximum(1, tf.cast(tf.math.ceil(product), tf.int32))


def row_keys(seed: tf.Tensor, batch_size: int | tf.Tensor) -> tf.Tensor:
    """One pseudo-random key in [0, 1) per row (float32, 24 random bits), from `seed`.

    Args:
        seed: Two integers (any integer dtype; only their low 32 bits count).
        batch_size: Number of rows.
    """
    index = tf.cast(tf.range(batch_size), tf.uint32)
    keys = mix(index * tf.constant(GOLDEN, tf.uint32) + seed_base(seed))
    return tf.cast(tf.bitwise.right_shift(keys, 8), tf.float32) * (2.0**-24)


def subset_rows(seed: tf.Tensor, batch_size: int | tf.Tensor, fraction: float) -> tf.Tensor:
    """Indices (int32, ascending) of ceil(fraction * batch_size) distinct random rows."""
    keys = row_keys(seed, batch_size)
    rows = tf.math.top_k(keys, k=subset_size(batch_size, fraction), sorted=False).indices
    return tf.sort(rows)


def scale_rows(sample_weight: Any, scale: tf.Tensor | None) -> Any:
    """Per-example weights times `scale`, one number per row; `scale` itself if there are none.

    "finite_difference" differentiates the reduced loss with respect to
    `scale` at 1 for each example's part of it (`FiniteDifference`).
    """
    if scale is None:
        return sample_weight
    if sample_weight is None:
        return scale

    def times(weights):
        if weights is None:
            return None
        weights = tf.convert_to_tensor(weights)
        if not weights.dtype.is_floating:
            weights = tf.cast(weights, scale.dtype)
        shape = [-1] + [1] * (weights.shape.rank - 1)
        return weights * tf.reshape(tf.cast(scale, weights.dtype), shape)

    return tf.nest.map_structure(times, sample_weight)


def batch_size_of(x: Any) -> int | tf.Tensor:
    """Rows of a batch: its first tensor's leading dimension (static if known)."""
    first = next(t for t in tf.nest.flatten(x) if t is not None)
    static = first.shape[0]
    return int(static) if static is not None else tf.shape(first)[0]


def gather_rows(structure: Any, rows: tf.Tensor | None) -> Any:
    """Every tensor of `structure` (None kept) restricted to `rows` of its first axis.

    `rows=None` means the whole batch: `structure` itself.
    """
    if rows is None:
        return structure
    return tf.nest.map_structure(lambda t: None if t is None else tf.gather(t, rows), structure)
