"""One `fit` step of a linear softmax model against the NumPy closed form."""

from __future__ import annotations

import math

import linear_reference as ref
import numpy as np
import pytest
from conftest import NUM_CLASSES, NUM_FEATURES, compile_sgd, fast_slice, linear_model

import keras_gradreg as kgr

P_VALUES = [1.0, 2.0, math.inf, 3.0]
METHODS = ["penalty", "adversarial", "finite_difference"]
KINDS = ["sequential", "functional", "subclassed"]


def reference_step(x, y, w, b, **kwargs):
    """`linear_reference.one_step` in float64."""
    return ref.one_step(x.astype("float64"), y, w.astype("float64"), b.astype("float64"), **kwargs)


def fit_one_step(model, x, y, **kwargs):
    history = model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0, **kwargs)
    return {k: v[0] for k, v in history.history.items()}


@pytest.mark.parametrize(
    "p, method, kind",
    # Fast: every norm and method, each pair with one of the three ways of building the
    # model (in turn); CI runs the other two.
    fast_slice(
        [(p, m, k) for p in P_VALUES for m in METHODS for k in KINDS],
        lambda p, method, kind: (
            KINDS.index(kind) == (P_VALUES.index(p) + METHODS.index(method)) % len(KINDS)
        ),
        ids=lambda p, method, kind: f"{p}-{method}-{kind}",
    ),
)
def test_one_step_matches_numpy(linear_problem, p, method, kind):
    x, y, w, b = linear_problem
    settings = dict(p=p, sigma=0.3, method=method, clean_weight=0.25, fd_step=0.05)
    model = compile_sgd(linear_model(kind, kgr.GradientRegularizer(**settings), w, b))
    logs = fit_one_step(model, x, y)
    want_w, want_b, want_logs = reference_step(x, y, w, b, lr=0.1, **settings)
    got_w, got_b = model.get_weights()
    np.testing.assert_allclose(got_w, want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_b, want_b, rtol=1e-5, atol=1e-6)
    for key in ("loss", "data_loss", "penalty"):
        np.testing.assert_allclose(logs[key], want_logs[key], rtol=1e-5, err_msg=key)


@pytest.mark.parametrize("p", [2.0, math.inf])
def test_probability_outputs_match_logits(linear_problem, p):
    """A softmax-output model with a probability loss trains like the logits one."""
    x, y, w, b = linear_problem
    reg = kgr.GradientRegularizer(p=p, sigma=0.3)
    model = compile_sgd(
        linear_model("functional", reg, w, b, activation="softmax"), probabilities=True
    )
    logs = fit_one_step(model, x, y)
    want_w, want_b, want_logs = reference_step(x, y, w, b, p=p, sigma=0.3, method="penalty")
    np.testing.assert_allclose(model.get_weights()[0], want_w, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(logs["penalty"], want_logs["penalty"], rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_sample_and_class_weights(linear_problem, method):
    """Per-example weights scale each example's loss and its penalty alike."""
    x, y, w, b = linear_problem
    settings = dict(p=2.0, sigma=0.3, method=method, fd_step=0.05)
    weights = np.linspace(0.2, 2.0, len(y))
    model = compile_sgd(linear_model("functional", kgr.GradientRegularizer(**settings), w, b))
    logs = fit_one_step(model, x, y, sample_weight=weights.astype("float32"))
    want_w, _, want_logs = reference_step(x, y, w, b, weights=weights, **settings)
    np.testing.assert_allclose(model.get_weights()[0], want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logs["penalty"], want_logs["penalty"], rtol=1e-5)

    class_weight = {0: 0.5, 1: 2.0, 2: 1.0}
    model = compile_sgd(linear_model("functional", kgr.GradientRegularizer(**settings), w, b))
    fit_one_step(model, x, y, class_weight=class_weight)
    per_class = np.array([class_weight[c] for c in y])
    want_w, _, _ = reference_step(x, y, w, b, weights=per_class, **settings)
    np.testing.assert_allclose(model.get_weights()[0], want_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_logged_means_weight_each_batch_by_its_size(method):
    """32 examples in batches of 5 (the last holds 2) log the mean over all 32.

    lr=0 keeps the weights fixed, so each logged epoch mean must be the NumPy
    value on the whole set, and equal to one batch of 32; weighting every
    batch equally would give the mean of the 7 batch means instead.
    """
    rng = np.random.default_rng(3)
    x = rng.normal(size=(32, NUM_FEATURES)).astype("float32")
    y = rng.integers(0, NUM_CLASSES, size=32)
    w = rng.normal(scale=0.5, size=(NUM_FEATURES, NUM_CLASSES)).astype("float32")
    b = rng.normal(scale=0.1, size=(NUM_CLASSES,)).astype("float32")
    settings = dict(p=2.0, sigma=0.3, method=method, clean_weight=0.25, fd_step=0.05)
    logged = {}
    for batch_size in (5, 32):
        model = compile_sgd(
            linear_model("functional", kgr.GradientRegularizer(**settings), w, b), lr=0.0
        )
        history = model.fit(x, y, batch_size=batch_size, shuffle=False, verbose=0).history
        logged[batch_size] = {k: v[0] for k, v in history.items()}
    _, _, want = reference_step(x, y, w, b, lr=0.0, **settings)
    per_batch = [
        reference_step(x[i : i + 5], y[i : i + 5], w, b, lr=0.0, **settings)[2]
        for i in range(0, 32, 5)
    ]
    for key in ("loss", "data_loss", "penalty"):
        equal_weights = np.mean([logs[key] for logs in per_batch])
        assert abs(equal_weights - want[key]) > 1e-3 * abs(want[key]), key  # The test can tell.
        np.testing.assert_allclose(logged[5][key], want[key], rtol=1e-5, err_msg=key)
        np.testing.assert_allclose(logged[5][key], logged[32][key], rtol=1e-5, err_msg=key)
