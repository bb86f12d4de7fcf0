"""keras_gradreg.objective: cases added to kill the mutants of the first pass.

Each case's expected value comes from a derivation independent of the
code: a hand count of the forward passes that the step keeps (the state a
step leaves is that of one clean pass), the linear softmax model's cross
entropy in NumPy, and Keras's documented division of a loss by the number
of replicas. docs/testing.md, "Mutation testing", lists the mutants each
case kills.
"""

from __future__ import annotations

import math

import keras
import linear_reference as ref
import numpy as np
import pytest
import tensorflow as tf
from conftest import NUM_CLASSES, NUM_FEATURES, linear_data, plain_linear_model

import keras_gradreg as kgr
from keras_gradreg import objective
from keras_gradreg._estimators import Passes
from keras_gradreg._subsets import gather_rows

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class _Replicas:
    """A stand-in for a strategy with `count` replicas in sync."""

    def __init__(self, count: int):
        self.num_replicas_in_sync = count


@pytest.mark.parametrize("replicas", [2, 4])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_model_losses_are_divided_by_the_replicas_as_keras_divides_the_loss(
    monkeypatch, replicas, dtype
):
    """model.losses enter divided by the replicas; the logs multiply them back."""
    layer = keras.layers.Dense(
        2, kernel_initializer="ones", kernel_regularizer=keras.regularizers.L2(0.5)
    )
    layer.build((None, 3))  # sum of the 6 squared ones, times 0.5: 3.
    monkeypatch.setattr(tf.distribute, "get_strategy", lambda: _Replicas(replicas))
    value = tf.constant(3.0, dtype)
    scaled = objective._scale_for_replicas(value)  # noqa: SLF001
    assert scaled.dtype == value.dtype
    assert float(scaled) == 3.0 / replicas
    unscaled = objective.unscale_for_replicas(value)
    assert unscaled.dtype == value.dtype
    assert float(unscaled) == 3.0 * replicas
    total = objective._with_model_losses(layer, tf.constant(1.0))  # noqa: SLF001
    assert float(total) == pytest.approx(1.0 + 3.0 / replicas, rel=1e-7)


def _counting_passes(model, y, counter):
    """Passes whose forward pass adds 1 to `counter`, given as state to restore."""

    def forward(inputs, rows=None, example_scale=None):
        del example_scale  # "penalty" weighs no example.
        targets = gather_rows(y, rows)
        counter.assign_add(1.0)
        y_pred = model(inputs, training=True)
        return y_pred, LOSS(targets, y_pred)

    return Passes(model, forward, extra_state=[counter])


@pytest.mark.parametrize("every, fraction", [(2, 1.0), (1, 0.5), (2, 0.5)])
@pytest.mark.parametrize("step", [0, 1])
def test_a_step_with_a_run_time_choice_updates_the_state_once(every, fraction, step):
    """The state a forward pass updates moves once per step, as in a plain step.

    With `every` or `fraction` the term's passes run inside a `tf.cond`
    after the clean pass; they start from the state before it and leave no
    trace of their own, so the counter of forward passes reads 1 whether
    the step computes the term (step 0) or skips it (step 1 with every=2).
    """
    x, y, w, b = linear_data(12, 0)
    model = plain_linear_model(w, b)
    reg = kgr.GradientRegularizer(p=2, sigma=0.5, every=every, fraction=fraction)
    counter = keras.Variable(0.0)
    passes = _counting_passes(model, tf.constant(y), counter)
    result = objective.regularized_objective(passes, tf.constant(x), reg, tf.constant(step))
    assert float(counter) == 1.0
    np.testing.assert_allclose(result.y_pred, x @ w + b, rtol=1e-5, atol=1e-6)
    want = ref.per_example_loss(x, y, w, b).mean()
    np.testing.assert_allclose(float(result.data_loss), want, rtol=1e-5)
    computed = step % every == 0
    assert (float(result.penalty) > 0.0) == computed


def test_integer_inputs_give_the_plain_loss_at_sigma_0_and_nan_above():
    """No floating-point input: sigma 0 is the plain loss; a later sigma > 0 is NaN.

    Traced at sigma 0 with the settings read at run time, the step has no
    input to differentiate; raising sigma afterwards cannot be honoured, so
    the total and the penalty are NaN (the data loss stays the clean one).
    """
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((2,), dtype="int32"),
            keras.layers.Embedding(4, 3),
            keras.layers.Flatten(),
            keras.layers.Dense(NUM_CLASSES),
        ]
    )
    x = np.array([[0, 1], [2, 3], [3, 3], [1, 0]], "int32")
    y = np.array([0, 2, 1, 1])
    table, kernel, bias = (v.astype("float64") for v in model.get_weights())
    want = ref.per_example_loss(table[x].reshape(len(x), -1), y, kernel, bias).mean()
    reg = kgr.GradientRegularizer(p=2, sigma=0.0)
    step = tf.function(lambda: kgr.regularized_loss(model, x, y, LOSS, reg, fixed_settings=False))
    result = step()
    assert float(result.total) == float(result.data_loss)
    np.testing.assert_allclose(float(result.data_loss), want, rtol=1e-6)
    assert float(result.penalty) == 0.0
    reg.sigma = 0.5
    result = step()
    assert math.isnan(float(result.total)) and math.isnan(float(result.penalty))
    np.testing.assert_allclose(float(result.data_loss), want, rtol=1e-6)


@pytest.mark.parametrize("fixed_settings", [None, False])
def test_a_later_sigma_0_gives_the_plain_values_even_after_an_overflow(fixed_settings):
    """Traced at sigma > 0 and run at sigma 0, the step's values are the plain ones.

    A loss scale of 3e38 overflows the scaled input gradient (float32's
    largest value is 3.4e38): the penalty is NaN at sigma 0.5, and at a
    later sigma 0 the total is the clean loss (NumPy) and the penalty 0,
    with the zeros fixed when traced (None) and with nothing fixed (False).
    The scale is a variable, as a mixed-precision optimizer's is: as a
    Python float, TensorFlow 2.16's graph optimizer folds the constant
    product and the overflow (the case under test) does not happen.
    """
    x, y, w, b = linear_data(8, 0)
    w = 10.0 * w
    model = plain_linear_model(w, b)
    reg = kgr.GradientRegularizer(p=2, sigma=0.5)
    settings = dict(loss_scale=tf.Variable(3e38), fixed_settings=fixed_settings)
    step = tf.function(lambda: kgr.regularized_loss(model, x, y, LOSS, reg, **settings))
    assert math.isnan(float(step().penalty))
    reg.sigma = 0.0
    result = step()
    want = ref.per_example_loss(x, y, w, b).mean()
    np.testing.assert_allclose(float(result.total), want, rtol=1e-5)
    assert float(result.total) == float(result.data_loss)
    assert float(result.penalty) == 0.0


def test_regularized_objective_reads_sigma_at_run_time_by_default():
    """Left out, fixed_settings is False: a traced step follows a later sigma.

    The linear model's penalty is sigma times the batch mean of
    ||grad_x l_i||_2 (NumPy closed form), at sigma 0.5 and, with no new
    trace, at 0.25.
    """
    x, y, w, b = linear_data(8, 0)
    model = plain_linear_model(w, b)
    reg = kgr.GradientRegularizer(p=2, sigma=0.5)
    counter = keras.Variable(0.0)
    passes = _counting_passes(model, tf.constant(y), counter)
    step = tf.function(lambda: objective.regularized_objective(passes, tf.constant(x), reg))
    norms = ref.dual_norm(ref.input_gradients(x, y, w, b), 2.0).mean()
    for sigma in (0.5, 0.25):
        reg.sigma = sigma
        np.testing.assert_allclose(float(step().penalty), sigma * norms, rtol=1e-5)


def test_clean_weight_0_at_a_later_sigma_0_is_the_loss_at_the_clipped_input():
    """Traced at clean_weight 0, the objective has no clean loss: at sigma 0 it is L(clip(x)).

    The ascent's point at radius 0 is x clipped to the box (docs of
    `regularized_loss`); inputs outside [0, 1] make it differ from the
    clean loss L(x), which is still reported as `data_loss` (NumPy both).
    """
    x, y, w, b = linear_data(8, 0)
    model = plain_linear_model(w, b)
    reg = kgr.GradientRegularizer(
        method="adversarial", p=2, sigma=0.5, clean_weight=0.0, clip=(0.0, 1.0)
    )
    step = tf.function(lambda: kgr.regularized_loss(model, x, y, LOSS, reg))
    step()
    reg.sigma = 0.0
    result = step()
    clipped = ref.per_example_loss(np.clip(x, 0.0, 1.0), y, w, b).mean()
    clean = ref.per_example_loss(x, y, w, b).mean()
    assert abs(clipped - clean) > 0.01
    np.testing.assert_allclose(float(result.total), clipped, rtol=1e-5)
    np.testing.assert_allclose(float(result.data_loss), clean, rtol=1e-5)
    assert float(result.penalty) == 0.0


def test_clean_weight_0_leaves_an_infinite_clean_loss_out_of_the_total():
    """At a fixed clean_weight 0 the clean loss is not differentiated: 0 * inf never enters.

    One feature, logits (a x, -a x), label 1: the cross entropy is about
    2 a x, which overflows float32 at x = 10 (a = 2e37) but not at the
    ascent's point clip(x + sigma sign(g), 0, 1) = 1: the total is that
    finite loss (NumPy, float64), the clean loss is inf, and the step's
    parameter gradient is finite.
    """
    a = 2e37
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(2, use_bias=False)])
    model.set_weights([np.array([[a, -a]], "float32")])
    x, y = np.array([[10.0]], "float32"), np.array([1])
    reg = kgr.GradientRegularizer(
        method="adversarial", p=math.inf, sigma=0.5, clean_weight=0.0, clip=(0.0, 1.0)
    )
    with tf.GradientTape() as tape:
        result = kgr.regularized_loss(model, x, y, LOSS, reg)
    logits = np.array([a, -a])
    moved = np.logaddexp(logits[0], logits[1]) - logits[1]
    assert math.isinf(float(result.data_loss))
    np.testing.assert_allclose(float(result.total), moved, rtol=1e-6)
    np.testing.assert_allclose(float(result.penalty), moved, rtol=1e-6)
    gradient = tape.gradient(result.total, model.trainable_variables)[0]
    assert np.isfinite(gradient.numpy()).all()


class _OptionalInput(keras.Model):
    """A linear model of inputs["x"]; inputs["extra"] may be None and is not read."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(NUM_CLASSES)

    def call(self, inputs):
        return self.dense(inputs["x"])


def test_a_none_in_the_inputs_is_passed_through():
    """A None leaf of a nested input stays None; the rest is the linear closed form."""
    x, y, w, b = linear_data(8, 0)
    model = _OptionalInput()
    model.dense.build((None, NUM_FEATURES))  # Keras 3.10 cannot build from a None input.
    model.built = True
    model.dense.set_weights([w, b])
    reg = kgr.GradientRegularizer(p=2, sigma=0.5)
    result = kgr.regularized_loss(model, {"x": x, "extra": None}, y, LOSS, reg)
    norms = ref.dual_norm(ref.input_gradients(x, y, w, b), 2.0).mean()
    want = ref.per_example_loss(x, y, w, b).mean() + 0.5 * norms
    np.testing.assert_allclose(float(result.total), want, rtol=1e-5)


class _UnreducedLoss(keras.losses.Loss):
    """A Loss whose call ignores its reduction: one value per example."""

    def __call__(self, y_true, y_pred, sample_weight=None):
        return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)


def test_a_loss_that_does_not_reduce_is_refused_with_its_shape():
    x, y, w, b = linear_data(8, 0)
    model = keras.Sequential([keras.Input((NUM_FEATURES,)), keras.layers.Dense(NUM_CLASSES)])
    reg = kgr.GradientRegularizer(p=2, sigma=0.5)
    with pytest.raises(ValueError, match=r"reduce the batch to a scalar\. .*shape \(8,\)$"):
        kgr.regularized_loss(model, x, y, _UnreducedLoss(), reg)


class _IntegerLoss(keras.layers.Layer):
    """The identity, adding the integer 2 to the model's losses."""

    def call(self, inputs):
        self.add_loss(tf.constant(2, tf.int32))
        return inputs


def test_an_integer_model_loss_is_added_as_a_float():
    x, y, w, b = linear_data(8, 0)
    dense = keras.layers.Dense(NUM_CLASSES)
    model = keras.Sequential([keras.Input((NUM_FEATURES,)), _IntegerLoss(), dense])
    dense.set_weights([w, b])
    reg = kgr.GradientRegularizer(p=2, sigma=0.0)
    result = kgr.regularized_loss(model, x, y, LOSS, reg)
    assert result.data_loss.dtype == tf.float32
    want = ref.per_example_loss(x, y, w, b).mean() + 2.0
    np.testing.assert_allclose(float(result.data_loss), want, rtol=1e-6)
