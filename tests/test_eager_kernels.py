"""The attack kernels and the strategy step, run eagerly, equal their graphs.

The attacks trace their loops with `tf.function`, whose autograph rewrites
each function into generated code: the original lines never run in a graph
(so line coverage cannot see them either). With
`tf.config.run_functions_eagerly(True)` the same Python runs op by op. Every
attack must then return the graph's points and verdicts, with the same seeds
(the attacks draw stateless random numbers from their seed).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_gradreg as kgr

SHAPE = (4, 4, 1)
CLASSES = 4


def _model(probabilities: bool = False) -> keras.Model:
    """A linear classifier of 4x4 images into 4 classes (logits, or softmax outputs)."""
    rng = np.random.default_rng(5)
    inputs = keras.Input(SHAPE)
    dense = keras.layers.Dense(CLASSES, activation="softmax" if probabilities else None)
    model = keras.Model(inputs, dense(keras.layers.Flatten()(inputs)))
    w = rng.normal(scale=1.5, size=(16, CLASSES)).astype("float32")
    model.set_weights([w, np.zeros(CLASSES, "float32")])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=not probabilities))
    return model


@pytest.fixture(scope="module")
def problem():
    """Models, and 8 images in [0, 1] labelled with the logits model's predictions."""
    logits_model, probability_model = _model(), _model(probabilities=True)
    x = np.random.default_rng(6).uniform(0, 1, size=(8, *SHAPE)).astype("float32")
    y = np.argmax(logits_model.predict(x, verbose=0), axis=1)
    return logits_model, probability_model, x, y


def _run_eagerly(run):
    previous = tf.config.functions_run_eagerly()
    tf.config.run_functions_eagerly(True)
    try:
        return run()
    finally:
        tf.config.run_functions_eagerly(previous)


ATTACKS = {
    "fgsm-inf": lambda m, x, y: kgr.attacks.fgsm(m, x, y, 0.1, return_correct=True),
    "fgsm-2": lambda m, x, y: kgr.attacks.fgsm(m, x, y, 0.5, p=2, return_correct=True),
    "pgd-inf-restarts": lambda m, x, y: kgr.attacks.pgd(
        m, x, y, 0.1, steps=4, restarts=2, seed=3, return_correct=True
    ),
    "pgd-2-last": lambda m, x, y: kgr.attacks.pgd(
        m, x, y, 0.5, p=2, steps=4, keep="last", seed=3, return_correct=True
    ),
    "pgd-1": lambda m, x, y: kgr.attacks.pgd(
        m, x, y, 1.0, p=1, steps=4, random_start=False, return_correct=True
    ),
    "apgd-ce-inf": lambda m, x, y: kgr.attacks.apgd(
        m, x, y, 0.1, steps=6, restarts=2, seed=3, return_correct=True
    ),
    "apgd-dlr-2": lambda m, x, y: kgr.attacks.apgd(
        m, x, y, 0.5, p=2, loss="dlr", steps=6, seed=3, return_correct=True
    ),
    "apgd-t-inf": lambda m, x, y: kgr.attacks.apgd(
        m,
        x,
        y,
        0.1,
        loss="dlr",
        targeted=True,
        target_classes=2,
        steps=6,
        seed=3,
        return_correct=True,
    ),  # fmt: skip
    "square-inf": lambda m, x, y: kgr.attacks.square(
        m, x, y, 0.1, queries=12, seed=3, return_correct=True
    ),
    "square-2": lambda m, x, y: kgr.attacks.square(
        m, x, y, 0.5, p=2, queries=12, seed=3, return_correct=True
    ),
    "fab-inf": lambda m, x, y: kgr.attacks.fab(
        m, x, y, 0.1, targets=2, steps=4, seed=3, return_correct=True
    ),
    "fab-2": lambda m, x, y: kgr.attacks.fab(
        m, x, y, 0.5, p=2, targets=2, steps=4, seed=3, return_correct=True
    ),
    "fab-1": lambda m, x, y: kgr.attacks.fab(
        m, x, y, 1.0, p=1, targets=1, steps=4, seed=3, return_correct=True
    ),
}
RADIUS = {"inf": 0.1, "2": 0.5, "1": 1.0}


def _norms(delta: np.ndarray, p: str) -> np.ndarray:
    flat = delta.reshape(len(delta), -1)
    return np.linalg.norm(flat, ord={"inf": np.inf, "2": 2, "1": 1}[p], axis=1)


# Every attack on the logits model; a slice on the softmax model (its outputs read
# as probabilities, attacked through their logarithm).
CASES = [(name, "logits") for name in ATTACKS] + [
    (name, "probabilities") for name in ("fgsm-inf", "apgd-ce-inf", "square-inf")
]


@pytest.mark.parametrize("name, outputs", CASES)
def test_attack_run_eagerly_equals_its_graph(problem, name, outputs):
    """Same points (to float32 rounding) and verdicts; the points lie in the ball and the box."""
    logits_model, probability_model, x, y = problem
    model = logits_model if outputs == "logits" else probability_model
    graph = ATTACKS[name](model, x, y)
    eager = _run_eagerly(lambda: ATTACKS[name](model, x, y))
    np.testing.assert_allclose(eager.x_adv.numpy(), graph.x_adv.numpy(), atol=1e-5)
    np.testing.assert_array_equal(eager.correct.numpy(), graph.correct.numpy())
    x_adv = graph.x_adv.numpy()
    p = name.split("-")[-1] if name.split("-")[-1] in RADIUS else name.split("-")[-2]
    assert np.all(_norms(x_adv - x, p) <= RADIUS[p] * (1 + 1e-5) + 1e-6)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    # The verdict is the model's own on the returned point.
    predicted = np.argmax(model.predict(x_adv, verbose=0), axis=1)
    np.testing.assert_array_equal(graph.correct.numpy(), predicted == y)


def test_the_attacks_change_verdicts(problem):
    """The cases above are not vacuous: with these radii the gradient attacks break examples."""
    logits_model, _, x, y = problem
    for name in ("fgsm-inf", "pgd-inf-restarts", "apgd-ce-inf", "fab-inf"):
        assert not np.all(ATTACKS[name](logits_model, x, y).correct.numpy()), name


# ---------------------------------------------------------------------- #
# fit and evaluate under a (one-replica) tf.distribute strategy.
# ---------------------------------------------------------------------- #


def _fit_under(strategy, steps_per_execution: int):
    x = np.random.default_rng(0).normal(size=(24, 6)).astype("float32")
    y = np.random.default_rng(1).integers(0, 3, size=24)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((6,))
        outputs = keras.layers.Dense(3)(keras.layers.Dense(5, activation="tanh")(inputs))
        model = kgr.RegularizedModel(
            inputs, outputs, regularizer=dict(p=2, sigma=0.3, method="penalty")
        )
        model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            steps_per_execution=steps_per_execution,
        )
    history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0).history
    evaluation = model.evaluate(x, y, batch_size=8, verbose=0, return_dict=True)
    return model.get_weights(), history, evaluation


def _fit_both_in_a_fresh_process(steps_per_execution: int, tmp_path) -> tuple:
    """`_fit_under` the default and a one-device strategy, in a new Python process.

    TensorFlow crashed (a segmentation fault in `fit` under OneDeviceStrategy)
    inside a pytest-xdist worker that had run many other tests, twice (a
    random-order run, seed 190002, with run_eagerly=True; a fast-set run on
    a loaded machine); both passed alone. In its own process a crash fails
    this test instead of taking down the worker and its other tests.
    """
    out = tmp_path / "fit_under.pkl"
    code = (
        "import pickle, sys; sys.path.insert(0, sys.argv[1]); import test_eager_kernels as t; "
        "import tensorflow as tf; "
        "want = t._fit_under(tf.distribute.get_strategy(), 1); "
        "got = t._fit_under(tf.distribute.OneDeviceStrategy('/cpu:0'), int(sys.argv[2])); "
        "pickle.dump((want, got, t._initial_weights()), open(sys.argv[3], 'wb'))"
    )
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run(
        [sys.executable, "-c", code, tests_dir, str(steps_per_execution), str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    with open(out, "rb") as f:
        return pickle.load(f)


# Not with run_eagerly=True: that case crashed a pytest-xdist worker process (in a
# random-order run of the fast set, seed 190002; it passed alone).
@pytest.mark.slow  # A subprocess.
@pytest.mark.parametrize("steps_per_execution", [1, 3])
def test_fit_under_a_one_replica_strategy_equals_the_default_strategy(
    steps_per_execution, tmp_path
):
    """The library's own distributed step (used under any strategy but the default one)
    trains and evaluates like Keras's step on the default strategy: the same weights
    after 6 steps, the same logs (the multi-replica cases are in test_distributed)."""
    want, got, initial = _fit_both_in_a_fresh_process(steps_per_execution, tmp_path)
    for a, b in zip(got[0], want[0]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The weights moved: the comparison is not between two initial states.
    assert max(np.abs(a - b).max() for a, b in zip(got[0], initial)) > 1e-2
    for key in ("loss", "data_loss", "penalty"):
        np.testing.assert_allclose(got[1][key], want[1][key], rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(got[2]["loss"], want[2]["loss"], rtol=1e-5)


def _initial_weights():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    outputs = keras.layers.Dense(3)(keras.layers.Dense(5, activation="tanh")(inputs))
    return keras.Model(inputs, outputs).get_weights()
