"""evaluate_robustness's data: bad data refused before any attack; from_logits detected."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_gradreg.robustness import data as data_lib
from keras_gradreg.robustness import evaluate as evaluate_lib
from keras_gradreg.robustness import evaluate_robustness

FEATURES, CLASSES, N = 6, 3, 12


def linear_weights(seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(FEATURES, CLASSES)).astype("float32")
    b = rng.normal(scale=0.1, size=(CLASSES,)).astype("float32")
    return w, b


def examples(seed=1):
    rng = np.random.default_rng(seed)
    return rng.uniform(size=(N, FEATURES)).astype("float32"), rng.integers(0, CLASSES, size=N)


def functional(activation=None, seed=0):
    """A functional linear classifier, not compiled: logits or (softmax) probabilities."""
    inputs = keras.Input((FEATURES,))
    outputs = keras.layers.Dense(CLASSES, activation=activation)(inputs)
    model = keras.Model(inputs, outputs)
    model.set_weights(list(linear_weights(seed)))
    return model


@pytest.fixture
def no_attack(monkeypatch):
    """Fails the test if the evaluation gets as far as the clean pass or an attack."""

    def fail(*args, **kwargs):
        raise AssertionError("an attack or the clean pass ran")

    monkeypatch.setattr(evaluate_lib, "run_attacks", fail)
    monkeypatch.setattr(evaluate_lib, "_clean_pass", fail)


def numpy_cross_entropy(x, y, w, b):
    z = x.astype("float64") @ w + b
    z -= z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -log_p[np.arange(len(y)), y], np.exp(log_p)


# ---------------------------------------------------------------------- #
# Bad data, refused before any attack runs.
# ---------------------------------------------------------------------- #


def test_inputs_outside_the_clip_box_are_refused(no_attack):
    x, y = examples()
    x = x * 10  # Images in [0, 10] with the default clip (0, 1).
    x[0, 0], x[1, 1] = 0.0, 10.0
    outside = int(np.sum(x > 1))
    with pytest.raises(
        data_lib.DataError,
        match=rf"lie in the `clip` box \[0, 1\].*Received: x from 0 to 10, {outside} "
        r"values outside, with clip=\(0\.0, 1\.0\)",
    ):
        evaluate_robustness(functional(), (x, y), verbose=0)


def test_inputs_inside_a_wider_clip_box_are_accepted():
    x, y = examples()
    x = x * 10
    report = evaluate_robustness(
        functional(), (x, y), {math.inf: [0.0]}, attacks=("fgsm",), clip=(0, 10), verbose=0,
        sanity_examples=0,
    )  # fmt: skip
    assert report.num_examples == N


@pytest.mark.parametrize("bad, counts", [(np.nan, "1 NaN and 0 infinite"), (np.inf, "0 NaN and 1")])
def test_nan_or_infinite_inputs_are_refused(no_attack, bad, counts):
    x, y = examples()
    x[3, 2] = bad
    with pytest.raises(
        ValueError, match=rf"inputs must be finite\. Received: x with {counts}.*in example 3\)"
    ):
        evaluate_robustness(functional(), (x, y), clip=None, verbose=0)


@pytest.mark.parametrize(
    "labels, match",
    [
        (
            lambda y: np.where(np.arange(N) == 4, CLASSES, y),
            r"class indices in \[0, 2\] for a model with 3 classes\. Received: labels from 0 "
            r"to 3 \(1 outside\)",
        ),
        (lambda y: y - 1, r"Received: labels from -1 to \d"),
        (lambda y: np.stack([y, y], axis=1), r"Received: y with shape \(12, 2\)"),
        (lambda y: y[:-1], r"one label per example\. Received: x with shape \(12, 6\) and y with "),
        (lambda y: y + 0.5, r"whole class indices\. Received: y\[0\]=\d\.5"),
        (lambda y: np.where(np.arange(N) == 2, np.nan, y), r"finite\. Received: y with 1 NaN"),
    ],
    ids=["too_large", "negative", "wrong_shape", "wrong_count", "not_whole", "nan"],
)
def test_labels_outside_the_models_classes_or_misshapen_are_refused(no_attack, labels, match):
    x, y = examples()
    with pytest.raises(ValueError, match=match):
        evaluate_robustness(functional(), (x, labels(y)), verbose=0)


def test_one_hot_labels_are_accepted_and_misshapen_ones_refused(no_attack):
    x, y = examples()
    with pytest.raises(ValueError, match=r"Received: y with shape \(12, 4\)"):
        evaluate_robustness(functional(), (x, np.eye(4)[y]), verbose=0)
    outputs = np.asarray(functional()(x))
    data_lib.check_labels(np.eye(CLASSES)[y], outputs)  # No error.


def test_inputs_that_do_not_fit_the_model_are_refused(no_attack):
    x, y = examples()
    with pytest.raises(
        ValueError, match=r"the model's input shape \(batch, 6\)\. Received: x with shape \(12, 5\)"
    ):
        evaluate_robustness(functional(), (x[:, :5], y), verbose=0)


def test_a_dataset_with_bad_labels_is_refused_too(no_attack):
    x, y = examples()
    data = tf.data.Dataset.from_tensor_slices((x, y + CLASSES)).batch(5)
    with pytest.raises(ValueError, match=r"Received: labels from 3 to 5"):
        evaluate_robustness(functional(), data, verbose=0)


# ---------------------------------------------------------------------- #
# A model without a compiled loss: cross-entropy, from_logits detected.
# ---------------------------------------------------------------------- #


@pytest.mark.parametrize("activation", [None, "softmax"])
def test_cross_entropy_with_detected_from_logits_matches_numpy(activation):
    """The softmax model and the logits model with the same weights have the same
    cross-entropy and input gradient: the clean pass's mean ||grad_x CE||_1
    (the dual norm at p=inf) equals NumPy's W (softmax(z) - e_y), and the loss
    chosen equals NumPy's cross-entropy."""
    x, y = examples()
    w, b = linear_weights()
    model = functional(activation)
    outputs = np.asarray(model(x))
    probabilities = data_lib.looks_like_probabilities(outputs)
    assert probabilities == (activation == "softmax")
    loss = data_lib.cross_entropy(y, outputs, from_logits=not probabilities)
    expected, p = numpy_cross_entropy(x, y, w.astype("float64"), b.astype("float64"))
    np.testing.assert_allclose(np.asarray(loss.call(y, outputs)), expected, rtol=1e-5, atol=1e-6)

    report = evaluate_robustness(
        model, (x, y), {math.inf: [0.0], 2: [0.0]}, attacks=("fgsm",), sanity_examples=0,
        verbose=0,
    )  # fmt: skip
    assert report.settings["loss"] == "cross-entropy"
    assert report.settings["outputs"] == ("probabilities" if probabilities else "logits")
    assert report.settings["loss_from_logits"] is (not probabilities)
    gradient = (p - np.eye(CLASSES)[y]) @ w.T.astype("float64")  # d CE / d x per example
    np.testing.assert_allclose(
        report.gradient_norms["inf"], np.abs(gradient).sum(axis=1).mean(), rtol=1e-5
    )
    np.testing.assert_allclose(
        report.gradient_norms["2"], np.linalg.norm(gradient, axis=1).mean(), rtol=1e-5
    )
    assert report.clean_accuracy == np.mean(np.argmax(p, axis=1) == y)
    assert report.accuracy("fgsm", math.inf, 0.0) == report.clean_accuracy
    assert "probabilities_with_logits_loss" not in report.flags
    assert "logits_with_probability_loss" not in report.flags


def test_detection_reads_one_output_as_a_sigmoid_and_rows_within_the_tolerance():
    assert data_lib.looks_like_probabilities(np.array([[0.2], [1.0], [0.0]]))
    assert not data_lib.looks_like_probabilities(np.array([[0.2], [1.5]]))
    rows = np.array([[0.5, 0.5 + 0.9 * data_lib.SUM_TOLERANCE], [0.1, 0.9]])
    assert data_lib.looks_like_probabilities(rows)
    rows[0, 1] = 0.5 + 1.1 * data_lib.SUM_TOLERANCE
    assert not data_lib.looks_like_probabilities(rows)
    assert not data_lib.looks_like_probabilities(np.array([[1.2, -0.2]]))  # Sums to 1.


def test_the_detection_is_printed_unless_silent(capsys):
    x, y = examples()
    args = dict(epsilons={math.inf: [0.0]}, attacks=("fgsm",), sanity_examples=0)
    evaluate_robustness(functional("softmax"), (x, y), verbose=2, **args)
    assert capsys.readouterr().out.startswith(
        "No compiled loss: the outputs on the 12 examples look like probabilities, so the "
        "attacks use cross-entropy with from_logits=False.\n"
    )
    evaluate_robustness(functional("softmax"), (x, y), verbose=0, **args)
    assert capsys.readouterr().out == ""


def test_compiled_and_given_losses_are_recorded_as_such():
    x, y = examples()
    model = functional()
    args = dict(epsilons={math.inf: [0.0]}, attacks=("fgsm",), sanity_examples=0, verbose=0)
    given = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    report = evaluate_robustness(model, (x, y), loss=given, **args)
    assert (report.settings["loss"], report.settings["outputs"]) == ("given", "logits")
    model.compile(loss=given)
    report = evaluate_robustness(model, (x, y), **args)
    assert (report.settings["loss"], report.settings["loss_from_logits"]) == ("compiled", True)
