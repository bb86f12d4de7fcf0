"""`FastDropout`: Keras dropout with an explicit RNG, fast under XLA on CPU.

Keras's TensorFlow backend draws dropout masks with
`tf.nn.experimental.stateless_dropout` and the default `rng_alg`
("auto_select"). Under XLA on CPU that compiles to one loop fusion that
recomputes the seed scrambling of `StatelessRandomGetKeyCounter` for every
element and is not vectorised, many times slower than an explicit "philox"
or "threefry" (measurements: bench/README.md). Naming the algorithm gives the
same distribution much faster; inside a whole training step XLA's fusion of
"philox" is still not vectorised, "threefry" is, so under XLA this layer
uses "threefry". Seeds still come from the layer's
`keras.random.SeedGenerator`, so restoring its state reproduces the mask (what
`kgr.RegularizedModel` does to share masks between the passes of a step).
"""

from __future__ import annotations

from typing import Any

import keras

from keras_gradreg import _checks, _internals

RNG_ALGORITHMS = ("auto", "philox", "threefry")


@keras.saving.register_keras_serializable(package="keras_gradreg")
class FastDropout(keras.layers.Dropout):
    """`keras.layers.Dropout` drawing its mask with a named counter-based RNG.

    A drop-in replacement for `keras.layers.Dropout` (same arguments, same
    inverted scaling by 1 / (1 - rate), same `SeedGenerator` seeding). On the
    TensorFlow backend the mask comes from
    `tf.nn.experimental.stateless_dropout(..., rng_alg=rng_alg)`; on other
    backends the layer behaves exactly like `keras.layers.Dropout`. Masks differ
    from `keras.layers.Dropout`'s for the same seed (another key derivation).

    Args:
        rate: Fraction of the inputs to drop, in [0, 1].
        noise_shape: As for `keras.layers.Dropout`.
        seed: Python integer seeding the layer's `SeedGenerator`, or None.
        rng_alg: "auto" (default): "threefry" where the layer is traced for
            XLA (`jit_compile=True`), else "philox". "philox" runs with and
            without XLA; "threefry" needs XLA (TensorFlow's own CPU kernel
            does not implement it) and is the cheaper of the two under XLA
            on CPU. With and without XLA the same seed gives different masks.
        **kwargs: As for `keras.layers.Layer`.
    """

    def __init__(
        self,
        rate: float,
        noise_shape: Any = None,
        seed: int | None = None,
        rng_alg: str = "auto",
        **kwargs,
    ):
        _checks.check_choice(rng_alg, "rng_alg", RNG_ALGORITHMS)
        super().__init__(rate, noise_shape=noise_shape, seed=seed, **kwargs)
        self.rng_alg = rng_alg

    def call(self, inputs, training=False):
        if not training or self.rate == 0:
            return inputs
        if keras.backend.backend() != "tensorflow" or self.rate == 1:
            return super().call(inputs, training=training)
        import tensorflow as tf

        seed = self.seed_generator.next()
        # As Keras's backend does: XLA wants int32 seeds, the state is int64.
        if seed.dtype != tf.int32:
            seed = tf.cast(tf.math.floormod(seed, tf.int32.max - 1), tf.int32)
        noise_shape = None
        if self.noise_shape is not None:
            shape = tf.shape(inputs)
            noise_shape = [shape[i] if d is None else d for i, d in enumerate(self.noise_shape)]
        rng_alg = self.rng_alg
        if rng_alg == "auto":
            rng_alg = "threefry" if _internals.in_xla_context() else "philox"
        return tf.nn.experimental.stateless_dropout(
            inputs, rate=self.rate, seed=seed, rng_alg=rng_alg, noise_shape=noise_shape
        )

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "rng_alg": self.rng_alg}


def replace_dropout(layer: keras.layers.Layer, rng_alg: str = "auto") -> keras.layers.Layer:
    """A `clone_function` for `keras.models.clone_model` swapping in `FastDropout`.

    `keras.layers.Dropout` layers become `FastDropout` with the same config;
    every other layer is cloned from its config as `clone_model` does.

    ```python
    fast = keras.models.clone_model(model, clone_function=kgr.layers.replace_dropout)
    model = kgr.RegularizedModel(fast.inputs, fast.outputs, regularizer=reg)
    ```

    Args:
        layer: The layer to clone.
        rng_alg: Passed to `FastDropout`.

    Returns:
        A new, unbuilt layer.
    """
    if type(layer) is keras.layers.Dropout:
        return FastDropout.from_config({**layer.get_config(), "rng_alg": rng_alg})
    return layer.__class__.from_config(layer.get_config())
