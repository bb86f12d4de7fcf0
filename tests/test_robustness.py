"""Tests for kgr.evaluate_robustness and RobustnessReport."""

import json
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_gradreg import attacks, robustness
from keras_gradreg.gradients import input_gradients
from keras_gradreg.robustness import RobustnessReport, evaluate_robustness

EPSILONS = {math.inf: [0.05, 0.1], 2: [0.5, 1.0]}


def _mnist_like(n, seed):
    """Ten smooth class templates on 28x28 plus noise, values in [0, 1]."""
    rng = np.random.default_rng(0)
    coarse = rng.uniform(size=(10, 7, 7))
    templates = np.kron(coarse, np.ones((4, 4)))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, size=n)
    x = 0.7 * templates[y] + 0.3 * rng.uniform(size=(n, 28, 28))
    return x[..., None].astype("float32"), y


@pytest.fixture(scope="module")
def trained():
    """A small MLP on MNIST-shaped synthetic data, logits output."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        keras.optimizers.Adam(0.01),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = _mnist_like(600, seed=1)
    model.fit(x, y, epochs=3, batch_size=60, verbose=0)
    x_test, y_test = _mnist_like(64, seed=2)
    return model, x_test, y_test


@pytest.fixture(scope="module")
def report(trained):
    model, x, y = trained
    return evaluate_robustness(model, (x, y), EPSILONS, steps=20, batch_size=32)


def test_pgd_below_fgsm_below_clean_and_no_flags(report):
    assert report.num_examples == 64
    assert report.clean_accuracy > 0.9
    for p, values in EPSILONS.items():
        for epsilon in values:
            pgd = report.accuracy("pgd", p, epsilon)
            fgsm = report.accuracy("fgsm", p, epsilon)
            assert pgd <= fgsm <= report.clean_accuracy
    # The attacks bite (else this test would prove nothing) and noise does not.
    assert report.accuracy("pgd", math.inf, 0.1) < 0.5 * report.clean_accuracy
    assert report.accuracy("noise", math.inf, 0.1) > report.accuracy("pgd", math.inf, 0.1)
    assert report.ok, report.flags
    assert report.zero_gradient_share == 0.0


def test_rows_match_the_attacks_and_numpy(trained, report):
    """Report numbers recomputed independently: clean accuracy, FGSM, dual norms."""
    model, x, y = trained
    logits = model.predict(x, verbose=0)
    assert report.clean_accuracy == np.mean(logits.argmax(1) == y)
    x_adv = attacks.fgsm(model, x, y, 0.1)
    fgsm = np.mean(model.predict(x_adv, verbose=0).argmax(1) == y)
    assert report.accuracy("fgsm", "inf", 0.1) == fgsm
    g = input_gradients(model, x, y).numpy().reshape(len(x), -1)
    np.testing.assert_allclose(report.gradient_norms["inf"], np.abs(g).sum(1).mean(), rtol=1e-4)
    np.testing.assert_allclose(
        report.gradient_norms["2"], np.linalg.norm(g, axis=1).mean(), rtol=1e-4
    )
    assert {(r["attack"], r["p"], r["epsilon"]) for r in report.rows} == {
        (a, p, e)
        for a in ("fgsm", "pgd", "noise")
        for p, es in (("inf", [0.05, 0.1]), (2, [0.5, 1.0]))
        for e in es
    }


def test_report_serialises_prints_and_plots(report, tmp_path):
    path = str(tmp_path / "report.json")
    report.save_json(path)
    with open(path) as file:
        data = json.load(file)
    assert data["rows"][0].keys() == {"attack", "p", "epsilon", "accuracy"}
    assert RobustnessReport.load_json(path) == report
    text = str(report)
    assert "clean accuracy" in text and "pgd" in text and "all passed" in text
    assert f"{100 * report.accuracy('pgd', 2, 1.0):.2f}%" in text
    png = str(tmp_path / "report.png")
    report.plot(png)
    with open(png, "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"


def test_dataset_input_and_max_examples_give_the_same_report(trained, report):
    model, x, y = trained
    extra_x, extra_y = _mnist_like(20, seed=3)
    data = tf.data.Dataset.from_tensor_slices(
        (np.concatenate([x, extra_x]), np.concatenate([y, extra_y]))
    ).batch(32)
    again = evaluate_robustness(model, data, EPSILONS, steps=20, max_examples=64)
    assert again.num_examples == 64
    assert again.rows == report.rows


def test_random_starts_are_reproducible_with_a_seed(trained):
    model, x, y = trained
    kwargs = dict(epsilons={2: [1.0]}, steps=3, random_start=True, restarts=2)
    first = evaluate_robustness(model, (x, y), seed=3, **kwargs)
    assert first.rows == evaluate_robustness(model, (x, y), seed=3, **kwargs).rows
    assert first.settings["random_start"] and first.settings["restarts"] == 2


def test_zero_gradient_model_is_flagged(trained):
    """Quantised input (zero gradient almost everywhere): a classic mask."""
    model, x, y = trained

    class Quantise(keras.layers.Layer):
        def call(self, inputs):
            return tf.round(inputs * 8.0) / 8.0

    masked = keras.Sequential([keras.Input((28, 28, 1)), Quantise(), *model.layers])
    masked.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    report = evaluate_robustness(masked, (x, y), {math.inf: [0.05]}, steps=5)
    assert report.zero_gradient_share == 1.0
    assert "zero_gradients" in report.flags
    # FGSM and PGD cannot move the input at all: clean accuracy survives.
    assert report.accuracy("fgsm", math.inf, 0.05) == report.clean_accuracy


@pytest.mark.filterwarnings("ignore:.*received `from_logits=True`")
def test_softmax_model_with_logits_loss_is_flagged(trained):
    model, x, y = trained
    probabilities = keras.Sequential([*model.layers, keras.layers.Softmax()])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    report = evaluate_robustness(probabilities, (x, y), {2: [0.5]}, loss=loss, steps=3)
    assert "probabilities_with_logits_loss" in report.flags
    correct = evaluate_robustness(
        probabilities, (x, y), {2: [0.5]}, loss="sparse_categorical_crossentropy", steps=3
    )
    assert not correct.flags


def test_logits_model_with_probability_loss_is_flagged(trained):
    model, x, y = trained
    report = evaluate_robustness(
        model, (x, y), {2: [0.5]}, loss="sparse_categorical_crossentropy", steps=3
    )
    assert "logits_with_probability_loss" in report.flags


def test_weak_pgd_is_flagged(trained):
    """PGD with one tiny step barely moves: weaker than FGSM, and flagged."""
    model, x, y = trained
    report = evaluate_robustness(
        model, (x, y), {math.inf: [0.1]}, steps=1, step_size_factor=0.01, random_start=False
    )
    assert report.accuracy("pgd", math.inf, 0.1) > report.accuracy("fgsm", math.inf, 0.1)
    assert "pgd_weaker_than_fgsm" in report.flags


def test_flag_logic_on_constructed_numbers():
    rows = [
        {"attack": "fgsm", "p": "inf", "epsilon": 0.1, "accuracy": 0.5},
        {"attack": "fgsm", "p": "inf", "epsilon": 0.2, "accuracy": 0.7},
        {"attack": "pgd", "p": "inf", "epsilon": 0.1, "accuracy": 0.4},
        {"attack": "pgd", "p": "inf", "epsilon": 0.2, "accuracy": 0.3},
        {"attack": "noise", "p": "inf", "epsilon": 0.1, "accuracy": 0.2},
        {"attack": "noise", "p": "inf", "epsilon": 0.2, "accuracy": 0.9},
    ]
    flags = robustness._sanity_flags(rows, 0.9, ("fgsm", "pgd"), 0.01, 0.0, 0.05, True, 0.0, 0.5)
    assert set(flags) == {"accuracy_not_decreasing", "noise_stronger_than_attack"}
    assert (
        "fgsm p=inf: 50.00% at epsilon=0.1 but 70.00% at epsilon=0.2"
        in flags["accuracy_not_decreasing"]
    )
    assert "p=inf epsilon=0.1" in flags["noise_stronger_than_attack"]
    # Within the tolerance nothing fires.
    quiet = robustness._sanity_flags(
        [dict(r, accuracy=0.405) if r["epsilon"] == 0.1 else r for r in rows[2:4]]
        + [dict(r, accuracy=0.9) for r in rows[4:]],
        0.4,
        ("pgd",),
        0.01,
        0.04,
        0.05,
        False,
        1.0,
        0.0,
    )
    assert quiet == {}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(epsilons={math.inf: [-1.0]}), r"Received: epsilon=-1\.0"),
        (dict(epsilons={0.5: [0.1]}), r"Received: p=0\.5"),
        (dict(epsilons={3: [0.1]}), r"Received: p=3"),
        (dict(epsilons={}), r"Received: epsilons=\{\}"),
        (dict(steps=0), r"Received: steps=0"),
        (dict(attacks=("cw",)), r"Received: attacks=\('cw',\)"),
        (dict(clip=(1, 0)), r"Received: clip=\(1, 0\)"),
        (dict(tolerance=-0.1), r"Received: tolerance=-0\.1"),
        (dict(data="x_only"), r"labels are needed\. Received: data='x_only'"),
    ],
)
def test_bad_arguments_raise_before_any_work(trained, kwargs, match):
    model, x, y = trained
    args = dict(model=model, data=(x, y))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        evaluate_robustness(**args)


def test_data_without_labels_raises(trained):
    model, x, _ = trained
    with pytest.raises(ValueError, match=r"Received: data with element_spec="):
        evaluate_robustness(model, tf.data.Dataset.from_tensor_slices(x).batch(8))
    with pytest.raises(ValueError, match=r"labels are needed"):
        evaluate_robustness(model, (x, None))


@pytest.mark.skipif(not os.path.exists("/work/shared/data/mnist.npz"), reason="no MNIST file")
@pytest.mark.slow
def test_real_mnist_plain_mlp_is_not_robust():
    """Real MNIST, a 3-epoch MLP on 5k images, 200 test images: the ordering
    PGD <= FGSM <= clean holds and FGSM at eps = 0.25 breaks most examples."""
    data = np.load("/work/shared/data/mnist.npz")
    x = data["x_train"][:5000].reshape(-1, 784).astype("float32") / 255
    x_test = data["x_test"][:200].reshape(-1, 784).astype("float32") / 255
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((784,)), keras.layers.Dense(128, activation="relu"), keras.layers.Dense(10)]
    )
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, data["y_train"][:5000], epochs=3, batch_size=64, verbose=0)
    report = evaluate_robustness(
        model, (x_test, data["y_test"][:200]), {math.inf: [0.1, 0.25]}, steps=20
    )
    assert report.clean_accuracy > 0.85
    assert report.accuracy("fgsm", math.inf, 0.25) < 0.2
    assert report.accuracy("pgd", math.inf, 0.1) <= report.accuracy("fgsm", math.inf, 0.1)
    assert report.ok, report.flags
