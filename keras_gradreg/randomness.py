"""Sharing one step's randomness between several forward passes.

Keras 3 layers draw their noise (dropout masks, Gaussian noise, ...) from
`keras.random.SeedGenerator`s whose state advances on every call. Reading
every generator's state before the first pass and writing it back before a
later pass makes that pass draw exactly the same masks.
"""

from __future__ import annotations

import keras
import tensorflow as tf


def seed_generators(model: keras.layers.Layer) -> list:
    """All seed generators owned by `model` and its sublayers, each once."""
    found, seen = [], set()
    for layer in model._flatten_layers(include_self=True, recursive=True):
        for generator in getattr(layer, "_seed_generators", ()):
            if id(generator) not in seen:
                seen.add(id(generator))
                found.append(generator)
    return found


def snapshot(generators: list) -> list[tf.Tensor]:
    """Copies of the generators' current states."""
    return [tf.identity(generator.state.value) for generator in generators]


def restore(generators: list, states: list[tf.Tensor]) -> None:
    """Writes states taken by `snapshot` back into the generators."""
    for generator, state in zip(generators, states):
        generator.state.assign(state)
