"""keras_gradreg.attacks.auto_pgd: cases added to kill the mutants of the first pass.

Each case's expected value comes from a derivation independent of the
code: a Dropout layer is the identity at inference, a sigmoid output's
class is decided by p > 0.5, and the unit vector of a zero gradient is
defined as 0. docs/testing.md, "Mutation testing", lists the mutants each
case kills.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from keras_gradreg import attacks
from keras_gradreg.attacks import auto_pgd


def test_apgd_attacks_the_model_in_inference_mode():
    # Dropout is the identity at inference: APGD on the net with it finds what it finds
    # on the same net without it (dropout at rate 0.5 during the attack would not).
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(24, 36)).astype("float32")
    hidden = keras.layers.Dense(16, "tanh")
    head = keras.layers.Dense(10)
    inputs = keras.Input((36,))
    plain = keras.Model(inputs, head(hidden(inputs)))
    with_dropout = keras.Model(inputs, head(keras.layers.Dropout(0.5)(hidden(inputs))))
    y = np.argmax(plain(x).numpy(), axis=1)
    args = dict(p=math.inf, steps=10, seed=7, return_correct=True)
    expected, expected_correct = attacks.apgd(plain, x, y, 0.1, **args)
    got, got_correct = attacks.apgd(with_dropout, x, y, 0.1, **args)
    np.testing.assert_array_equal(got.numpy(), expected.numpy())
    np.testing.assert_array_equal(got_correct.numpy(), expected_correct.numpy())
    assert 0 < np.sum(expected_correct) < len(x)  # Some broken, some held.


def test_a_sigmoid_output_is_read_as_a_probability():
    # One probability output p: the class is 1 where p > 0.5. At epsilon 0 the attack
    # cannot move, so the examples it reports correct are those the rule classifies right.
    x = np.linspace(-1.0, 1.0, 12, dtype="float32").reshape(-1, 1)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, activation="sigmoid")])
    model.set_weights([np.array([[3.0]], "float32"), np.array([0.0], "float32")])
    y = np.array([0, 1] * 6)
    predicted = (1.0 / (1.0 + np.exp(-3.0 * x[:, 0])) > 0.5).astype(int)
    _, correct = attacks.apgd(
        model, x, y, 0.0, steps=2, from_logits=False, clip=None, return_correct=True
    )
    np.testing.assert_array_equal(correct.numpy(), predicted == y)
    assert 0 < np.sum(predicted == y) < len(x)


def test_the_unit_l2_direction_of_a_zero_gradient_is_zero():
    gradient = tf.constant([[[3.0, 0.0], [4.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    unit = auto_pgd._unit_l2(gradient).numpy()  # noqa: SLF001
    np.testing.assert_allclose(unit[0], [[0.6, 0.0], [0.8, 0.0]], rtol=1e-6)
    np.testing.assert_array_equal(unit[1], np.zeros((2, 2)))
