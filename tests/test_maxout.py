"""The Maxout layer: pylearn2 grouping, shapes, errors, serialization."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_gradreg as kgr


def test_dense_grouping_matches_pylearn2():
    """Channels [i*k, (i+1)*k) feed unit i."""
    x = np.random.default_rng(0).normal(size=(4, 12)).astype("float32")
    out = kgr.layers.Maxout(3)(x)
    np.testing.assert_array_equal(np.asarray(out), x.reshape(4, 3, 4).max(axis=2))


def test_conv_rank_and_other_axis():
    x = np.random.default_rng(1).normal(size=(2, 5, 5, 6)).astype("float32")
    out = kgr.layers.Maxout(2)(x)
    assert out.shape == (2, 5, 5, 2)
    np.testing.assert_array_equal(np.asarray(out), x.reshape(2, 5, 5, 2, 3).max(axis=-1))
    channels_first = np.moveaxis(x, -1, 1)
    out = kgr.layers.Maxout(2, axis=1)(channels_first)
    np.testing.assert_array_equal(
        np.asarray(out), np.moveaxis(x.reshape(2, 5, 5, 2, 3).max(-1), -1, 1)
    )


def test_in_a_model_with_output_shape():
    inputs = keras.Input((7, 7, 3))
    conv = keras.layers.Conv2D(8, 3)(inputs)
    outputs = kgr.layers.Maxout(4)(conv)
    assert outputs.shape == (None, 5, 5, 4)
    assert kgr.layers.Maxout(4).compute_output_shape((None, 5, 5, 8)) == (None, 5, 5, 4)


def test_indivisible_channels_fail_at_build():
    with pytest.raises(ValueError, match=r"Received: num_units=4, input_shape=\(None, 10\)"):
        kgr.layers.Maxout(4)(keras.Input((10,)))


@pytest.mark.parametrize("bad", [0, -2, 2.5, True])
def test_bad_num_units(bad):
    with pytest.raises(ValueError, match="Received: num_units="):
        kgr.layers.Maxout(bad)


def test_config_round_trip():
    layer = kgr.layers.Maxout(5, axis=1, name="mx")
    config = keras.saving.serialize_keras_object(layer)
    clone = keras.saving.deserialize_keras_object(config)
    assert (clone.num_units, clone.axis, clone.name) == (5, 1, "mx")
