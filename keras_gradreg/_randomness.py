"""Sharing one step's randomness (and state) between several forward passes.

Keras 3 layers draw their noise (dropout masks, Gaussian noise, ...) from
`keras.random.SeedGenerator`s whose state advances on every call. Reading
every generator's state before the first pass and writing it back before a
later pass makes that pass draw exactly the same masks. The same snapshot
and restore of other variables undoes what a probing pass changed.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_gradreg import _internals


def seed_generators(model: keras.layers.Layer, include_global: bool = True) -> list:
    """The seed generators `model`'s layers draw from, each once.

    Those owned by the model and its sublayers, and (with `include_global`)
    Keras's global generator (what `keras.random.*(seed=None)` uses) if it
    exists. Randomness drawn from TensorFlow's own stateful RNG
    (`tf.random.uniform`) is not covered.
    """
    found, seen = [], set()
    owned = (
        generator
        for layer in _internals.all_layers(model)
        for generator in _internals.layer_seed_generators(layer)
    )
    global_generator = _internals.global_seed_generator()
    extra = [global_generator] if include_global and global_generator else []
    for generator in (*owned, *extra):
        if id(generator) not in seen:
            seen.add(id(generator))
            found.append(generator)
    return found


def snapshot(variables: list) -> list[tf.Tensor]:
    """Copies of the variables' current values."""
    return [tf.identity(variable.value) for variable in variables]


def restore(variables: list, values: list[tf.Tensor]) -> None:
    """Writes values taken by `snapshot` back into the variables."""
    for variable, value in zip(variables, values):
        variable.assign(value)
