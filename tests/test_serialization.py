"""`.keras` round trips of RegularizedModel, GradientRegularizer and Maxout."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import NUM_CLASSES, NUM_FEATURES, LinearNet, compile_sgd

import keras_gradreg as kgr
from keras_gradreg import _internals


def maxout_model(regularizer):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((NUM_FEATURES,))
    hidden = kgr.layers.Maxout(4)(keras.layers.Dense(12)(inputs))
    hidden = keras.layers.Dropout(0.3, seed=3)(hidden)
    outputs = keras.layers.Dense(NUM_CLASSES)(hidden)
    return kgr.RegularizedModel(inputs, outputs, regularizer=regularizer)


@pytest.mark.parametrize("kind", ["functional", "subclassed"])
def test_keras_round_trip(tmp_path, kind):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, NUM_FEATURES)).astype("float32")
    y = rng.integers(0, NUM_CLASSES, size=32)
    reg = kgr.GradientRegularizer(p="inf", sigma=0.2, method="finite_difference", fd_step=0.02)
    if kind == "functional":
        model = maxout_model(reg)
    else:
        model = LinearNet(regularizer=reg)
    compile_sgd(model, metrics=["accuracy"])
    model.fit(x, y, batch_size=8, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)

    loaded = keras.models.load_model(path)
    assert isinstance(loaded, kgr.RegularizedModel)
    assert type(loaded).__name__ == type(model).__name__
    assert loaded.regularizer == reg
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))

    # The next training step (optimizer state and dropout seeds included) is the same.
    logs = model.fit(x, y, batch_size=8, verbose=0, shuffle=False).history
    loaded_logs = loaded.fit(x, y, batch_size=8, verbose=0, shuffle=False).history
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert logs.keys() == loaded_logs.keys()
    for key in logs:
        np.testing.assert_allclose(logs[key], loaded_logs[key], rtol=1e-6, err_msg=key)


def test_regularizer_config_round_trip():
    reg = kgr.GradientRegularizer(p="inf", sigma=0.3, method="adversarial", clean_weight=0.5)
    config = keras.saving.serialize_keras_object(reg)
    assert config["config"]["p"] == "inf"
    assert keras.saving.deserialize_keras_object(config) == reg
    assert kgr.GradientRegularizer.from_config(reg.get_config()) == reg


def test_regularizer_can_be_replaced():
    model = maxout_model(None)
    model.regularizer = {"p": 1, "sigma": 0.05}
    assert model.regularizer == kgr.GradientRegularizer(p=1, sigma=0.05)


def test_weights_files_keep_the_dropout_seed_state(tmp_path):
    """BackupAndRestore resumes from weights files: the masks must continue too."""
    model = maxout_model(None)
    compile_sgd(model)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, NUM_FEATURES)).astype("float32")
    y = rng.integers(0, NUM_CLASSES, size=16)
    model.fit(x, y, batch_size=8, verbose=0)
    path = str(tmp_path / "w.weights.h5")
    model.save_weights(path)
    states = [g.state.numpy() for g in _internals.layer_seed_generators(model.layers[3])]
    fresh = maxout_model(None)
    fresh.load_weights(path)
    np.testing.assert_array_equal(
        [g.state.numpy() for g in _internals.layer_seed_generators(fresh.layers[3])], states
    )
    assert states[0][1] > 0  # The generator had advanced.
