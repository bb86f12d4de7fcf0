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
import pytest
import tensorflow as tf
from conftest import dropout_twins

from keras_gradreg import attacks
from keras_gradreg.attacks import auto_pgd


def test_apgd_attacks_the_model_in_inference_mode():
    # Dropout is the identity at inference: APGD on the net with it finds what it finds
    # on the same net without it (dropout at rate 0.5 during the attack would not).
    x, y, plain, with_dropout = dropout_twins()
    args = dict(p=math.inf, steps=10, seed=7, return_correct=True)
    expected, expected_correct = attacks.apgd(plain, x, y, 0.05, **args)
    got, got_correct = attacks.apgd(with_dropout, x, y, 0.05, **args)
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


class _CountCalls(keras.layers.Layer):
    """The identity, counting its calls: the attack's forward passes."""

    def build(self, input_shape):
        self.calls = self.add_weight(shape=(), initializer="zeros", trainable=False, name="n")

    def call(self, inputs):
        self.calls.assign_add(1.0)
        return inputs


def test_the_defaults_are_autoattacks_standard_version():
    # Croce and Hein (2020), the standard version: 100 iterations and 1 restart, 9 target
    # classes for APGD-T. At epsilon 0 nothing breaks, so every run and step is taken:
    # the defaults make as many forward passes as those settings given explicitly,
    # and one more step or run makes more.
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(4, 3)).astype("float32")
    count = _CountCalls()
    model = keras.Sequential([keras.Input((3,)), count, keras.layers.Dense(11)])
    y = np.argmax(model(x).numpy(), axis=1)

    def passes(**settings):
        count.calls.assign(0.0)
        attacks.apgd(model, x, y, 0.0, **settings)
        return float(count.calls.numpy())

    standard = passes(steps=100, restarts=1)
    assert passes() == standard
    assert passes(steps=101) > standard and passes(restarts=2) > standard
    targeted = dict(loss="dlr", targeted=True)
    assert passes(**targeted) == passes(**targeted, target_classes=9)
    assert passes(**targeted, target_classes=10) > passes(**targeted)


def test_from_logits_is_read_from_the_compiled_loss():
    # A softmax model compiled with from_logits=False: left out, from_logits is the loss's
    # False (scores are log-probabilities), not the logits default, whose CE differs.
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(16, 6)).astype("float32")
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, activation="softmax")])
    model.layers[0].set_weights([rng.normal(size=(6, 4)).astype("float32"), np.zeros(4, "f4")])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=False))
    y = np.argmax(model(x).numpy(), axis=1)
    args = dict(p=2.0, steps=5, seed=3, clip=None)
    default = attacks.apgd(model, x, y, 0.5, **args).numpy()
    probabilities = attacks.apgd(model, x, y, 0.5, from_logits=False, **args).numpy()
    logits = attacks.apgd(model, x, y, 0.5, from_logits=True, **args).numpy()
    np.testing.assert_array_equal(default, probabilities)
    assert np.abs(default - logits).max() > 1e-3


def test_one_hot_targets_are_read_as_their_classes():
    # y given one-hot (batch, classes) is the same labels as the integers it encodes.
    # The weights are set (not drawn by Keras, whose draws depended on the tests run
    # before: once none of the 16 stayed correct), the labels the model's own on 12.
    rng = np.random.default_rng(2)
    x = rng.uniform(size=(16, 6)).astype("float32")
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
    model.layers[0].set_weights([rng.normal(size=(6, 4)).astype("float32"), np.zeros(4, "f4")])
    y = np.argmax(model(x).numpy(), axis=1)
    y[12:] = (y[12:] + 1) % 4  # Four misclassified.
    args = dict(p=math.inf, steps=5, seed=3, return_correct=True)
    labels, labels_correct = attacks.apgd(model, x, y, 0.1, **args)
    one_hot, one_hot_correct = attacks.apgd(model, x, np.eye(4, dtype="float32")[y], 0.1, **args)
    np.testing.assert_array_equal(one_hot.numpy(), labels.numpy())
    np.testing.assert_array_equal(one_hot_correct.numpy(), labels_correct.numpy())
    assert 0 < np.sum(labels_correct)


@tf.custom_gradient
def _gradient_on_the_host(x):
    """The identity, whose gradient runs a Python function: no XLA kernel for it."""

    def gradient(upstream):
        copied = tf.py_function(lambda t: t, [upstream], upstream.dtype)
        return tf.reshape(copied, tf.shape(upstream))

    return tf.identity(x), gradient


class GradientOnTheHost(keras.layers.Layer):
    def call(self, inputs):
        return _gradient_on_the_host(inputs)


def test_jit_compile_true_compiles_the_attack_loop_with_xla():
    # The forward pass compiles; the loop's input gradient has an op XLA refuses. Asked
    # for XLA, the loop is compiled (and refused); asked for none, it runs.
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(4, 3)).astype("float32")
    model = keras.Sequential([keras.Input((3,)), GradientOnTheHost(), keras.layers.Dense(4)])
    y = np.argmax(model(x).numpy(), axis=1)
    assert attacks.apgd(model, x, y, 0.1, steps=3, jit_compile=False).shape == x.shape
    with pytest.raises(tf.errors.InvalidArgumentError, match="unsupported operations"):
        attacks.apgd(model, x, y, 0.1, steps=3, jit_compile=True)


def test_apgd_leaves_the_models_state_untouched():
    # Inference passes only: a BatchNormalization layer's moving statistics stay as they
    # were (a training-mode pass on any example would move them).
    rng = np.random.default_rng(4)
    x = rng.uniform(size=(12, 5)).astype("float32")
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.BatchNormalization(momentum=0.5), keras.layers.Dense(3)]
    )
    y = np.argmax(model(x).numpy(), axis=1)
    before = [v.numpy().copy() for v in model.non_trainable_variables]
    attacks.apgd(model, x, y, 0.2, steps=3, seed=1)
    for got, want in zip(model.non_trainable_variables, before):
        np.testing.assert_array_equal(got.numpy(), want)


def test_a_checkpoint_halves_the_step_on_the_papers_two_conditions():
    # Croce and Hein (2020), section 3.2, at checkpoint w_j (here after 4 iterations):
    # halve if (1) the loss rose at fewer than rho * 4 = 3 of them, or (2) the step was
    # not halved at w_{j-1} and the best loss has not risen since. One example each:
    # 3 rises, halved last, best rose: keep; 4 rises, not halved last, best flat: halve;
    # 4 rises, halved last, best flat: keep; 2 rises: halve.
    n = 4
    state = dict(
        step=tf.fill([n], 0.4),
        x=tf.zeros([n, 2]),
        x_best=tf.ones([n, 2]),
        grad=tf.zeros([n, 2]),
        grad_best=tf.ones([n, 2]),
        loss=tf.constant([1.5, 1.0, 1.0, 1.0]),
        loss_best=tf.constant([2.0, 1.0, 1.0, 1.0]),
        loss_best_checked=tf.constant([1.0, 1.0, 1.0, 1.0]),
        halved_last=tf.constant([True, False, True, True]),
        increases=tf.constant([3, 4, 4, 2]),
        last_checkpoint=tf.constant(0),
    )
    after = auto_pgd._at_checkpoint(state, tf.constant(3), 0.75)  # noqa: SLF001
    halved = np.array([False, True, False, True])
    np.testing.assert_allclose(after["step"].numpy(), np.where(halved, 0.2, 0.4), rtol=1e-7)
    want_x = np.where(halved[:, None], 1.0, 0.0) * np.ones((n, 2))
    np.testing.assert_array_equal(after["x"].numpy(), want_x)
    np.testing.assert_array_equal(after["halved_last"].numpy(), halved)
    np.testing.assert_array_equal(after["increases"].numpy(), np.zeros(n))
    assert int(after["last_checkpoint"]) == 4


def test_the_best_point_is_the_first_to_reach_the_best_loss():
    # Croce and Hein's code (and tests/attack_reference.py) replace the best point only
    # where the new loss is strictly higher: on a tie (a plateau the momentum crosses,
    # where a clipped score gives two iterates the same loss) the earlier point stays.
    # Example 0 ties, 1 rises, 2 falls; the loss counts a rise only for example 1.
    n = 3
    state = dict(
        x=tf.zeros([n, 2]),
        x_prev=tf.zeros([n, 2]),
        x_adv=tf.zeros([n, 2]),
        x_best=tf.zeros([n, 2]),
        grad=tf.zeros([n, 2]),
        grad_best=tf.zeros([n, 2]),
        loss=tf.constant([1.0, 1.0, 1.0]),
        loss_best=tf.constant([1.0, 1.0, 1.0]),
        correct=tf.constant([True, True, True]),
        increases=tf.constant([0, 0, 0]),
    )
    x_new, grad_new = tf.ones([n, 2]), tf.fill([n, 2], 2.0)
    loss_new = tf.constant([1.0, 1.5, 0.5])
    after = auto_pgd._record(state, x_new, loss_new, tf.constant([True] * n), grad_new)  # noqa: SLF001
    replaced = np.array([False, True, False])
    np.testing.assert_array_equal(
        after["x_best"].numpy(), np.where(replaced[:, None], 1.0, 0.0) * np.ones((n, 2))
    )
    np.testing.assert_array_equal(
        after["grad_best"].numpy(), np.where(replaced[:, None], 2.0, 0.0) * np.ones((n, 2))
    )
    np.testing.assert_array_equal(after["loss_best"].numpy(), [1.0, 1.5, 1.0])
    np.testing.assert_array_equal(after["increases"].numpy(), [0, 1, 0])
    np.testing.assert_array_equal(after["x"].numpy(), np.ones((n, 2)))
    np.testing.assert_array_equal(after["x_prev"].numpy(), np.zeros((n, 2)))
