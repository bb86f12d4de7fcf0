"""FastDropout: keep rate, scaling, seeding, mask sharing, XLA, serialization."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_gradreg as kgr  # noqa: E402
from keras_gradreg import _randomness as randomness  # noqa: E402
from keras_gradreg.layers import FastDropout, replace_dropout  # noqa: E402

ONES = np.ones((500, 400), "float32")  # 200k elements: keep-rate std ~0.001.


def _apply(layer, x, jit: bool):
    if jit:
        return np.asarray(tf.function(lambda t: layer(t, training=True), jit_compile=True)(x))
    return np.asarray(layer(x, training=True))


@pytest.mark.parametrize("rng_alg, jit", [("philox", False), ("philox", True), ("threefry", True)])
@pytest.mark.parametrize("rate", [0.2, 0.5])
def test_keep_rate_and_scale(rng_alg, jit, rate):
    out = _apply(FastDropout(rate, seed=1, rng_alg=rng_alg), ONES, jit)
    kept = out != 0
    assert abs(kept.mean() - (1 - rate)) < 0.005
    np.testing.assert_allclose(out[kept], 1 / (1 - rate), rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_same_seed_same_mask_and_masks_change_between_calls(jit):
    a, b = FastDropout(0.5, seed=3), FastDropout(0.5, seed=3)
    first = _apply(a, ONES, jit)
    np.testing.assert_array_equal(first, _apply(b, ONES, jit))
    second = _apply(a, ONES, jit)
    # Independent masks agree on about half the elements.
    assert abs(((first != 0) == (second != 0)).mean() - 0.5) < 0.01
    assert (
        abs(((first != 0) == (_apply(FastDropout(0.5, seed=4), ONES, jit) != 0)).mean() - 0.5)
        < 0.01
    )


@pytest.mark.parametrize("jit", [False, True])
def test_restoring_the_seed_state_repeats_the_mask(jit):
    layer = FastDropout(0.5, seed=5)
    layer(ONES[:1], training=True)  # Advance the state once.
    generators = randomness.seed_generators(layer)
    assert layer.seed_generator in generators
    states = [generator.state for generator in generators]
    saved = randomness.snapshot(states)
    first = _apply(layer, ONES, jit)
    randomness.restore(states, saved)
    np.testing.assert_array_equal(_apply(layer, ONES, jit), first)


@pytest.mark.parametrize("jit, expected", [(False, "philox"), (True, "threefry")])
def test_auto_is_threefry_under_xla_and_philox_otherwise(jit, expected):
    auto = _apply(FastDropout(0.5, seed=9), ONES, jit)
    np.testing.assert_array_equal(
        auto, _apply(FastDropout(0.5, seed=9, rng_alg=expected), ONES, jit)
    )


def test_noise_shape_broadcasts_the_mask():
    out = np.asarray(FastDropout(0.5, noise_shape=(None, 1), seed=0)(ONES, training=True))
    rows_kept = out[:, 0] != 0
    np.testing.assert_array_equal(out != 0, np.repeat(rows_kept[:, None], 400, axis=1))
    assert 0.4 < rows_kept.mean() < 0.6


def test_inference_and_rate_zero_are_identity():
    x = np.random.default_rng(0).normal(size=(4, 5)).astype("float32")
    np.testing.assert_array_equal(np.asarray(FastDropout(0.5)(x, training=False)), x)
    np.testing.assert_array_equal(np.asarray(FastDropout(0.0)(x, training=True)), x)


def test_bad_algorithm_is_rejected():
    with pytest.raises(ValueError, match="Received: rng_alg='auto_select'"):
        FastDropout(0.5, rng_alg="auto_select")


def test_serialization_round_trip():
    layer = FastDropout(0.3, noise_shape=(None, 1), seed=11, rng_alg="threefry", name="fd")
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, FastDropout)
    assert restored.get_config() == layer.get_config()
    assert (restored.rate, restored.seed, restored.rng_alg) == (0.3, 11, "threefry")


def test_replace_dropout_swaps_only_dropout():
    inputs = keras.Input((6,))
    x = keras.layers.Dropout(0.25, seed=2, name="drop")(inputs)
    outputs = keras.layers.Dense(3, name="dense")(x)
    clone = keras.models.clone_model(keras.Model(inputs, outputs), clone_function=replace_dropout)
    drop = clone.get_layer("drop")
    assert type(drop) is FastDropout and drop.rate == 0.25 and drop.rng_alg == "auto"
    assert type(clone.get_layer("dense")) is keras.layers.Dense


@pytest.mark.parametrize("jit_compile", [False, True])
def test_regularized_passes_share_fast_dropout_masks(jit_compile):
    """Adversarial with a tiny radius: the perturbed loss equals the clean one."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = rng.integers(0, 3, size=64)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(32, activation="relu")(FastDropout(0.5, seed=0)(inputs))
    outputs = keras.layers.Dense(3)(FastDropout(0.5, seed=1)(h))
    reg = kgr.GradientRegularizer(p=2, sigma=1e-6, method="adversarial")
    model = kgr.RegularizedModel(inputs, outputs, regularizer=reg)
    model.compile(
        optimizer=keras.optimizers.SGD(0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    logs = model.fit(x, y, batch_size=16, epochs=1, verbose=0).history
    np.testing.assert_allclose(logs["penalty"], logs["data_loss"], rtol=1e-4)
