"""keras_gradreg._subsets against NumPy and closed forms: cases added to kill mutants.

tests/test_lazy.py checks the subset term on a model; these pin the pieces:
the size m = max(1, ceil(fraction * n)) as a Python int and as a tensor, the
keys and rows against the hash reproduced in tests/linear_reference.py, and
the row gathering and the per-example weight scaling (docs/testing.md,
"Mutation testing").
"""

from __future__ import annotations

import math

import linear_reference as ref
import numpy as np
import pytest
import tensorflow as tf

from keras_gradreg import _subsets as subsets

# (batch size, fraction, m): rounding, the floor of 1, the whole batch.
SIZES = [(100, 0.3, 30), (20, 0.3, 6), (10, 0.25, 3), (7, 0.01, 1), (8, 1.0, 8), (9, 0.5, 5)]


@pytest.mark.parametrize("batch_size, fraction, m", SIZES)
def test_subset_size_is_the_rounded_up_share(batch_size, fraction, m):
    assert m == max(1, math.ceil(round(fraction * batch_size, 9)))
    got = subsets.subset_size(batch_size, fraction)
    assert got == m and isinstance(got, int)
    tensor = subsets.subset_size(tf.constant(batch_size), fraction)
    assert tensor.dtype == tf.int32 and int(tensor) == m


def _np_keys(seed, batch_size):
    s0, s1 = (int(v) & ref._MASK for v in seed)
    base = ref._mix(s0 ^ ref._mix((s1 + 0x9E3779B9) & ref._MASK))
    words = [ref._mix((i * 0x9E3779B9 + base) & ref._MASK) >> 8 for i in range(batch_size)]
    return np.array(words, np.float64) * 2.0**-24


@pytest.mark.parametrize("seed", [[3, 9], [2**32 + 5, -1]])
def test_keys_and_rows_match_numpy(seed):
    """Keys in [0, 1) from 24 hash bits; rows ascending, distinct, those of the largest keys."""
    keys = subsets.row_keys(tf.constant(seed, tf.int64), 12).numpy()
    assert keys.dtype == np.float32
    np.testing.assert_array_equal(keys, _np_keys(seed, 12))
    for batch_size, fraction, m in SIZES:
        rows = subsets.subset_rows(tf.constant(seed, tf.int64), batch_size, fraction).numpy()
        assert rows.dtype == np.int32 and len(rows) == m
        np.testing.assert_array_equal(rows, ref.subset_rows(seed, batch_size, fraction))
        dynamic = subsets.subset_rows(tf.constant(seed), tf.constant(batch_size), fraction)
        np.testing.assert_array_equal(dynamic.numpy(), rows)


def test_batch_size_and_gather_rows():
    x = {"a": None, "b": tf.reshape(tf.range(12.0), [4, 3]), "c": tf.constant([5, 6, 7, 8])}
    assert subsets.batch_size_of(x) == 4 and isinstance(subsets.batch_size_of(x), int)
    dynamic = tf.function(
        subsets.batch_size_of, input_signature=[tf.TensorSpec([None, 2], tf.float32)]
    )
    assert int(dynamic(tf.zeros([5, 2]))) == 5
    picked = subsets.gather_rows(x, tf.constant([3, 1]))
    assert picked["a"] is None
    np.testing.assert_array_equal(picked["b"].numpy(), [[9, 10, 11], [3, 4, 5]])
    np.testing.assert_array_equal(picked["c"].numpy(), [8, 6])
    assert subsets.gather_rows(x, None) is x


def test_scale_rows_multiplies_each_examples_weights_by_its_number():
    """finite_difference's per-example weighting, against NumPy: rows of weights of any
    rank times their row's number, integer weights as floats, None kept, and the
    numbers themselves when there are no weights."""
    scale = tf.constant([1.0, 2.0, 0.5])
    assert subsets.scale_rows(None, scale) is scale
    weights = np.array([3.0, 4.0, 5.0], np.float32)
    assert subsets.scale_rows(weights, None) is weights
    np.testing.assert_array_equal(subsets.scale_rows(weights, scale), [3.0, 8.0, 2.5])
    temporal = np.arange(6, dtype=np.float32).reshape(3, 2)
    np.testing.assert_array_equal(
        subsets.scale_rows(temporal, scale), temporal * np.array([[1.0], [2.0], [0.5]])
    )
    counts = subsets.scale_rows(np.array([1, 2, 3]), scale)
    assert counts.dtype == tf.float32
    np.testing.assert_array_equal(counts, [1.0, 4.0, 1.5])
    nested = subsets.scale_rows({"a": weights, "b": None}, scale)
    assert nested["b"] is None
    np.testing.assert_array_equal(nested["a"], [3.0, 8.0, 2.5])
    half = subsets.scale_rows(tf.constant([2.0, 2.0, 2.0], tf.float16), scale)
    assert half.dtype == tf.float16
    np.testing.assert_array_equal(half, [2.0, 4.0, 1.0])
