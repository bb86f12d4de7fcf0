"""`_estimators`' registry and `_randomness.SharedRandomness`, the passes' seed protocol."""

from __future__ import annotations

import keras
import numpy as np

from keras_gradreg._estimators import ESTIMATORS
from keras_gradreg._randomness import SharedRandomness, seed_generators
from keras_gradreg.regularizer import METHODS


def test_one_entry_per_method():
    assert sorted(ESTIMATORS) == sorted(METHODS)
    assert [name for name, entry in ESTIMATORS.items() if entry.needs_divergence] == ["trades"]


def _model():
    keras.utils.set_random_seed(3)
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(6),
            keras.layers.BatchNormalization(momentum=0.5),
            keras.layers.Dropout(0.5),
        ]
    )


def _values(variables):
    return [np.array(v) for v in variables]


def test_replay_draws_the_first_pass_masks_and_leaving_restores_the_kept_state():
    model = _model()
    x = np.random.default_rng(0).normal(size=(8, 5)).astype("float32")
    moving = [v for v in model.non_trainable_variables if "moving" in v.path]
    seeds = [generator.state for generator in seed_generators(model)]
    with SharedRandomness(model) as shared:
        first = np.array(model(x, training=True))
        shared.keep_state()
        kept = _values(moving)
        fresh = np.array(model(x, training=True))  # New masks: the seeds moved on.
        shared.replay()
        replayed = np.array(model(x, training=True))
        assert not np.array_equal(_values(moving)[0], kept[0])  # The passes updated them...
        after_passes = _values(seeds)
    for value, want in zip(_values(moving), kept):  # ...and leaving wrote them back.
        np.testing.assert_array_equal(value, want)
    np.testing.assert_array_equal(replayed, first)
    assert np.mean(first == 0) > 0.2 and not np.array_equal(fresh, first)
    for value, want in zip(_values(seeds), after_passes):  # Seeds are not written back.
        np.testing.assert_array_equal(value, want)


def test_rewind_writes_back_the_seeds_and_the_state_read_before_the_pass():
    model = _model()
    x = np.random.default_rng(1).normal(size=(8, 5)).astype("float32")
    shared = SharedRandomness(model)
    shared.keep_state()
    before = _values(model.non_trainable_variables)
    first = np.array(model(x, training=True))
    after_first = _values(model.non_trainable_variables)
    shared.rewind()
    for value, want in zip(_values(model.non_trainable_variables), before):
        np.testing.assert_array_equal(value, want)
    np.testing.assert_array_equal(np.array(model(x, training=True)), first)
    for value, want in zip(_values(model.non_trainable_variables), after_first):
        np.testing.assert_array_equal(value, want)
