"""train.checkpoints: epoch states written whole, the newest readable one restored."""

from __future__ import annotations

import os

import keras
import numpy as np

import keras_gradreg as kgr
from train import checkpoints


def _model(seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((3,))
    outputs = keras.layers.Dense(2)(kgr.layers.FastDropout(0.5)(inputs))
    model = kgr.RegularizedModel(inputs, outputs)
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


def _same(a, b):
    for x, y in zip(a.weights + a.optimizer.variables, b.weights + b.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_states_keep_two_epochs_and_fall_back_from_an_unreadable_one(tmp_path):
    state = checkpoints.TrainingState(str(tmp_path / "backup"))
    assert state.restore(_model(0)) == 0  # Nothing saved yet.
    saved = {}
    for epoch in (1, 2, 3):
        saved[epoch] = _model(epoch)
        state.save(saved[epoch], epoch)
    assert state.epochs() == [3, 2] and sorted(os.listdir(tmp_path / "backup")) == [
        "epoch_000002",
        "epoch_000003",
    ]
    restored = _model(9)
    assert state.restore(restored) == 3
    _same(restored, saved[3])
    # The newest state's file is damaged: the one before is restored.
    path = tmp_path / "backup" / "epoch_000003" / checkpoints.WEIGHTS
    path.write_bytes(path.read_bytes()[:100])
    restored = _model(9)
    assert state.restore(restored) == 2
    _same(restored, saved[2])
