"""Counter-based random numbers from an integer hash: the same in every mode.

Each number is a function of a two-word seed, a row's position and a column
index, through MurmurHash3's 32-bit finaliser. Integer arithmetic gives the
same numbers eagerly, in graphs and under XLA (TensorFlow's stateless random
ops do not: XLA's Philox differs from the CPU kernel's), and keying rows by
their position in the global batch gives the same numbers on 1 replica and on
2. NumPy can reproduce them (tests/test_ascent.py).
"""

from __future__ import annotations

import math

import tensorflow as tf

GOLDEN = 0x9E3779B9  # 2**32 / golden ratio: spreads consecutive indices.
_COLUMN = 0x85EBCA77  # A second odd constant, for columns.


def mix(h: tf.Tensor) -> tf.Tensor:
    """MurmurHash3's 32-bit finaliser (uint32 in, uint32 out)."""
    h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, 16))
    h = h * tf.constant(0x85EBCA6B, tf.uint32)
    h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, 13))
    h = h * tf.constant(0xC2B2AE35, tf.uint32)
    return tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, 16))


def seed_words(seed: tf.Tensor) -> tf.Tensor:
    """The low 32 bits of a seed's two integers, as uint32."""
    return tf.cast(tf.math.floormod(tf.cast(seed, tf.int64), 2**32), tf.uint32)


def seed_base(seed: tf.Tensor) -> tf.Tensor:
    """One uint32 word mixing both of the seed's words."""
    words = seed_words(seed)
    golden = tf.constant(GOLDEN, tf.uint32)
    return mix(tf.bitwise.bitwise_xor(words[0], mix(words[1] + golden)))


def fold_in(seed: tf.Tensor, index) -> tf.Tensor:
    """A seed for the `index`-th draw from `seed` (index 0 gives `seed` itself)."""
    seed = tf.cast(seed, tf.int64)
    shift = tf.cast(index, tf.int64) * GOLDEN
    return tf.stack([tf.math.floormod(seed[0] + shift, 2**32), seed[1]])


def uniform(seed: tf.Tensor, positions: tf.Tensor, columns, stream: int = 0) -> tf.Tensor:
    """Uniform numbers in [0, 1), float32, shape (rows, columns), 24 random bits each.

    Args:
        seed: Two integers.
        positions: Each row's position (its key), integers, shape (rows,).
        columns: Numbers per row.
        stream: Distinct streams of the same seed give independent numbers.
    """
    base = seed_base(seed) + tf.constant((stream * GOLDEN) % 2**32, tf.uint32)
    rows = mix(tf.cast(positions, tf.uint32) * tf.constant(GOLDEN, tf.uint32) + base)
    column = tf.cast(tf.range(columns), tf.uint32) * tf.constant(_COLUMN, tf.uint32)
    keys = mix(rows[:, None] + column[None, :])
    return tf.cast(tf.bitwise.right_shift(keys, 8), tf.float32) * (2.0**-24)


def normal(seed: tf.Tensor, positions: tf.Tensor, columns, stream: int = 0) -> tf.Tensor:
    """Standard normal numbers, float32, shape (rows, columns), by Box-Muller.

    Uses streams `stream` and `stream + 1` of `uniform`.
    """
    u = 1.0 - uniform(seed, positions, columns, stream)  # In (0, 1]: log(u) is finite.
    v = uniform(seed, positions, columns, stream + 1)
    return tf.sqrt(-2.0 * tf.math.log(u)) * tf.cos(2.0 * math.pi * v)
