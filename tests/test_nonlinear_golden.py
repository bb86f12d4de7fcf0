"""The estimators on a nonlinear network (a 4-5-3 tanh MLP) against float64 NumPy.

`kgr.regularized_loss`'s total, data loss and penalty, and the gradient of
the total in the parameters, against tests/mlp_reference.py: a hand-written
forward and backward pass, the per-example input gradient, r* and the dual
norms from the method's table, and the penalty's parameter gradient by
central differences. The network's input Hessian is not zero (tanh), so the
double-backpropagation term is checked where the linear goldens cannot.
"""

from __future__ import annotations

import math

import keras
import mlp_reference as ref
import numpy as np
import pytest
import tensorflow as tf

import keras_gradreg as kgr

INPUTS, HIDDEN, CLASSES = 4, 5, 3
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

CASES = [
    dict(method="penalty", p=2.0),
    dict(method="penalty", p=math.inf),
    dict(method="penalty", p=1.0),
    dict(method="penalty", p=3.0),
    dict(method="adversarial", p=2.0, clean_weight=0.25),
    dict(method="adversarial", p=math.inf, clean_weight=0.0),
    dict(method="adversarial", p=1.0, clean_weight=0.5),
    dict(method="finite_difference", p=2.0, fd_step=0.05),
    dict(method="finite_difference", p=math.inf, fd_step=0.05),
    dict(method="finite_difference", p=1.0, fd_step=0.05),
]


def problem(n=12, seed=0):
    """Float32-representable data and parameters (the reference runs on the same values)."""
    params = {k: v.astype("float32") for k, v in ref.init(INPUTS, HIDDEN, CLASSES, seed).items()}
    rng = np.random.default_rng(seed + 1)
    x = rng.normal(size=(n, INPUTS)).astype("float32")
    y = rng.integers(0, CLASSES, size=n)
    weights = rng.uniform(0.3, 2.0, size=n).astype("float32")
    return params, x, y, weights


def keras_mlp(params):
    model = keras.Sequential(
        [
            keras.Input((INPUTS,)),
            keras.layers.Dense(HIDDEN, activation="tanh"),
            keras.layers.Dense(CLASSES),
        ]
    )
    model.set_weights([params[k] for k in ref.PARAMETERS])
    return model


def as64(params):
    return {k: v.astype("float64") for k, v in params.items()}


def test_reference_backward_pass_matches_central_differences():
    """The reference's hand-written backward pass agrees with its own forward pass."""
    params, x, y, weights = problem()
    params, x, weights = as64(params), x.astype("float64"), weights.astype("float64")
    by_hand = ref.loss_parameter_gradients(params, x, y, weights)
    numeric = ref.central_differences(lambda q: ref.mean_loss(q, x, y, weights), params)
    for name in ref.PARAMETERS:
        np.testing.assert_allclose(by_hand[name], numeric[name], rtol=1e-6, atol=1e-9)
    # The input gradient too, one coordinate at a time on the per-example losses.
    g = ref.input_gradients(params, x, y)
    step = 1e-6
    for j in range(INPUTS):
        e = np.zeros(INPUTS)
        e[j] = step
        up = ref.per_example_loss(params, x + e, y)
        down = ref.per_example_loss(params, x - e, y)
        np.testing.assert_allclose(g[:, j], (up - down) / (2 * step), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, math.inf])
def test_reference_direction_attains_the_dual_norm(p):
    params, x, y, _ = problem()
    g = ref.input_gradients(as64(params), x.astype("float64"), y)
    d = ref.worst_case_direction(g, p)
    np.testing.assert_allclose(np.linalg.norm(d, ord=p, axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.sum(g * d, axis=1), ref.dual_norm(g, p), rtol=1e-12)


def _library(params, x, y, weights, settings):
    model = keras_mlp(params)
    reg = kgr.GradientRegularizer(sigma=0.3, **settings)
    with tf.GradientTape() as tape:
        result = kgr.regularized_loss(model, x, y, LOSS, reg, sample_weight=weights)
    gradients = tape.gradient(result.total, model.trainable_variables)
    named = dict(zip(ref.PARAMETERS, (g.numpy() for g in gradients)))
    return result, named


@pytest.mark.parametrize("weighted", [True, False], ids=["sample_weight", "unweighted"])
@pytest.mark.parametrize("settings", CASES, ids=lambda s: f"{s['method']}-p={s['p']}")
def test_regularized_loss_matches_numpy_on_a_tanh_mlp(settings, weighted):
    params, x, y, weights = problem()
    if not weighted:
        weights = np.ones_like(weights)
    result, got = _library(params, x, y, weights, settings)
    total, data_loss, penalty, want = ref.objective(
        as64(params), x.astype("float64"), y, weights.astype("float64"), sigma=0.3, **settings
    )
    np.testing.assert_allclose(float(result.data_loss), data_loss, rtol=1e-5)
    np.testing.assert_allclose(float(result.penalty), penalty, rtol=1e-5)
    np.testing.assert_allclose(float(result.total), total, rtol=1e-5)
    clean = ref.loss_parameter_gradients(as64(params), x.astype("float64"), y, weights)
    scale = max(np.max(np.abs(want[k])) for k in ref.PARAMETERS)
    for name in ref.PARAMETERS:
        # float32 against float64: agreement to 1e-4 of the largest entry.
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4 * scale)
    # The test can tell: the term moves the gradient by far more than the tolerance.
    moved = max(np.max(np.abs(want[k] - clean[k])) for k in ref.PARAMETERS)
    assert moved > 0.05 * scale


def test_penalty_gradient_is_not_the_first_order_part_alone():
    """The tanh MLP's input Hessian matters: dropping the second-order part of the
    penalty's gradient (d||g||/dW through the tanh' factor) would change it by much
    more than the golden's tolerance. A check that the golden above can fail."""
    params, x, y, weights = problem()
    p64, x64, w64 = as64(params), x.astype("float64"), weights.astype("float64")
    full = ref.central_differences(lambda q: ref.penalty(q, x64, y, w64, 2.0, 0.3), p64)

    def frozen_hidden(q):
        # The penalty with tanh'(a) held at the original parameters' value.
        h = np.tanh(x64 @ p64["w1"] + p64["b1"])
        e = ref.logit_errors(q, x64, y)
        g = ((e @ q["w2"].T) * (1.0 - h**2)) @ q["w1"].T
        return float(0.3 * np.sum(w64 * np.linalg.norm(g, axis=1)) / len(y))

    partial = ref.central_differences(frozen_hidden, p64)
    _, got = _library(params, x, y, weights, dict(method="penalty", p=2.0))
    clean = ref.loss_parameter_gradients(p64, x64, y, w64)
    difference = np.max(np.abs(full["w1"] - partial["w1"]))
    assert difference > 1e-3
    np.testing.assert_allclose(got["w1"], clean["w1"] + full["w1"], atol=difference / 20)


def test_finite_difference_takes_each_examples_difference_absolutely():
    """At h = 1 two examples' losses fall along r* (the tanh bends back): the
    estimator adds |c_i (l_i(x + h r*) - l_i(x))|, so the term and its gradient are
    the NumPy reference's, and differ from the signed batch difference
    sigma * (L(x + h r*) - L(x)) / h, which is not bounded below in the parameters."""
    settings = dict(method="finite_difference", p=math.inf, fd_step=1.0)
    params, x, y, weights = problem()
    p64, x64, w64 = as64(params), x.astype("float64"), weights.astype("float64")
    d = ref.worst_case_direction(ref.input_gradients(p64, x64, y), math.inf)
    parts = ref.per_example_loss(p64, x64 + d, y) - ref.per_example_loss(p64, x64, y)
    assert np.sum(parts < 0) == 2  # The case tests what it says.
    result, got = _library(params, x, y, weights, settings)
    total, data_loss, penalty, want = ref.objective(p64, x64, y, w64, sigma=0.3, **settings)
    np.testing.assert_allclose(float(result.penalty), penalty, rtol=1e-5)
    np.testing.assert_allclose(float(result.total), total, rtol=1e-5)
    scale = max(np.max(np.abs(want[k])) for k in ref.PARAMETERS)
    for name in ref.PARAMETERS:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4 * scale)
    signed = 0.3 * np.sum(w64 * parts) / len(y)
    assert penalty - signed > 100 * 1e-5 * penalty  # Far outside the tolerance above.
    assert result.total >= result.data_loss
