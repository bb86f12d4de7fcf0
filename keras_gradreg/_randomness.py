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


class SharedRandomness:
    """One step's masks shared by several forward passes that leave no trace.

    Made before the step's first pass, it reads the state of `model`'s seed
    generators; `replay()` writes it back, so the next pass draws the first
    pass's masks again. `keep_state()`, called after the pass whose state
    updates the step keeps, reads the rest of the state: the model's
    non-trainable variables (BatchNorm statistics) and `extra_state`
    (e.g. loss trackers). Leaving the `with` block writes that state back,
    so the passes after `keep_state()` leave no trace in it:

    ```python
    with SharedRandomness(model, extra_state) as shared:
        y_pred, loss = forward(x)  # The step's pass: its masks and state updates.
        shared.keep_state()
        shared.replay()
        moved = forward(x_moved)  # The same masks; no trace when the block ends.
    ```

    Args:
        model: The layer whose seed generators (and Keras's global one) the
            passes draw from, and whose non-trainable variables they update.
        extra_state: More variables a pass changes that must be written back.
    """

    def __init__(self, model: keras.layers.Layer, extra_state: list | tuple = ()):
        self._model, self._extra_state = model, extra_state
        self._seeds = [generator.state for generator in seed_generators(model)]
        self._seed_values = snapshot(self._seeds)
        self._state: list = []
        self._state_values: list[tf.Tensor] = []

    def keep_state(self) -> None:
        """Reads the state (seeds excluded) that leaving the block writes back."""
        seeds = {id(state) for state in self._seeds}
        variables = [*self._model.non_trainable_variables, *self._extra_state]
        self._state = [variable for variable in variables if id(variable) not in seeds]
        self._state_values = snapshot(self._state)

    def replay(self) -> None:
        """Writes the seeds back: the next pass draws the masks of the first."""
        restore(self._seeds, self._seed_values)

    def rewind(self) -> None:
        """Writes the seeds and the kept state back: the next pass runs as the first did."""
        self.replay()
        restore(self._state, self._state_values)

    def __enter__(self) -> SharedRandomness:
        return self

    def __exit__(self, *exc_info) -> None:
        restore(self._state, self._state_values)
