"""Tests for FAB-T (kgr.attacks.fab), its projection step, and the suite's traces."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from attack_reference import TanhNet
from fab_reference import fab_linear, fab_run, minimal_distances, project_rows

from keras_gradreg import attacks
from keras_gradreg.attacks import common
from keras_gradreg.attacks.fab_attack import distances
from keras_gradreg.robustness import evaluate_robustness

NORMS = (math.inf, 2.0, 1.0)


def _projection_problem(seed, box):
    """Rows in [0, 1]^24 with some zero weights; the last rows cannot reach their hyperplane."""
    rng = np.random.default_rng(seed)
    t = rng.uniform(0.05, 0.95, size=(40, 24))
    w = rng.normal(size=(40, 24)) * (rng.uniform(size=(40, 24)) > 0.2)
    b = np.sum(w * t, axis=1) + rng.normal(scale=1.5, size=40)
    if box:
        b[-5:] = np.sum(np.abs(w[-5:]), axis=1) * 2.0 * np.sign(rng.normal(size=5))
    return t, w, b


@pytest.mark.parametrize("p", NORMS)
@pytest.mark.parametrize("box", [True, False])
def test_projection_matches_an_independent_reference(p, box):
    t, w, b = _projection_problem(int(p if p < 3 else 3) + 10 * box, box)
    low, high = (0.0, 1.0) if box else (-np.inf, np.inf)
    expected = project_rows(t, w, b, p, low, high)
    bounds = (tf.constant(0.0, tf.float64), tf.constant(1.0, tf.float64)) if box else (None, None)
    d = attacks.project_hyperplane(tf.constant(t), tf.constant(w), tf.constant(b), p, *bounds)
    np.testing.assert_allclose(d.numpy(), expected, rtol=1e-9, atol=1e-9)
    reached = np.abs(np.sum(w * (t + expected), axis=1) - b) < 1e-8
    # Every row reaches its hyperplane except the five made unreachable.
    assert reached.sum() == (35 if box else 40)
    if box:
        assert np.all((t + d.numpy() >= -1e-12) & (t + d.numpy() <= 1 + 1e-12))


def test_projection_linf_closed_form_without_a_box():
    """Without a box, the L-inf projection moves every coordinate by c / ||w||_1."""
    t = np.array([[0.2, -0.4, 1.0, 0.0]])
    w = np.array([[2.0, -1.0, 0.0, 0.5]])
    b = np.array([3.0])
    c = 3.0 - (0.4 + 0.4 + 0.0)
    d = attacks.project_hyperplane(tf.constant(t), tf.constant(w), tf.constant(b), math.inf)
    np.testing.assert_allclose(d.numpy(), [[c / 3.5, -c / 3.5, 0.0, c / 3.5]], rtol=1e-12)


@pytest.mark.parametrize(
    "p, jit",
    [(p, False) for p in NORMS] + [pytest.param(p, True, marks=pytest.mark.slow) for p in NORMS],
)
def test_projection_is_the_same_eagerly_in_graphs_and_with_xla(p, jit):
    t, w, b = (tf.constant(a, tf.float32) for a in _projection_problem(5, True))
    low, high = tf.constant(0.0), tf.constant(1.0)
    eager = attacks.project_hyperplane(t, w, b, p, low, high)
    fn = tf.function(lambda *a: attacks.project_hyperplane(*a, p, low, high), jit_compile=jit)
    np.testing.assert_allclose(fn(t, w, b).numpy(), eager.numpy(), rtol=1e-5, atol=1e-6)


def _linear(classes=10, features=20, n=64, seed=0, probabilities=False):
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(features, classes)).astype("float32")
    bias = rng.normal(size=classes).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((features,)),
            keras.layers.Dense(classes, activation="softmax" if probabilities else None),
        ]
    )
    model.layers[0].set_weights([weights, bias])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=not probabilities))
    x = rng.normal(size=(n, features)).astype("float32")
    y = np.argmax(x @ weights + bias, axis=1)
    y[:4] = (y[:4] + 1) % classes  # four examples misclassified at x
    return model, weights, bias, x, y


@pytest.mark.parametrize("p", NORMS)
def test_fab_finds_the_minimal_perturbation_of_a_linear_model(p):
    """Closed form (z_y - z_j) / ||w_y - w_j||_dual, and FAB's iterates step for step."""
    model, weights, bias, x, y = _linear(n=24)
    x_adv, correct = attacks.fab(
        model, x, y, math.inf, p, targets=1, clip=None, return_correct=True
    )
    found = distances(tf.constant(x_adv - x), p).numpy()
    exact = minimal_distances(weights, bias, x, y, p)
    z = x @ weights + bias
    target = np.argsort(np.where(np.arange(10) == y[:, None], -np.inf, z), axis=1)[:, -1]
    ok = np.argmax(z, axis=1) == y
    np.testing.assert_array_equal(correct.numpy(), np.zeros(24, bool))
    np.testing.assert_array_equal(found[~ok], 0.0)  # Not attacked: x itself.
    closest = exact[np.arange(24), target][ok]
    assert np.all(found[ok] >= closest * (1 - 1e-5))
    assert np.all(found[ok] <= closest * 1.01)
    reference = [fab_linear(weights, bias, x[i], y[i], target[i], p) for i in np.flatnonzero(ok)]
    np.testing.assert_allclose(found[ok], reference, rtol=2e-5, atol=1e-6)
    assert not np.any(np.argmax(x_adv[ok] @ weights + bias, axis=1) == y[ok])


@pytest.mark.parametrize("p", NORMS)
def test_fab_follows_a_numpy_fab_step_for_step_on_a_tanh_network_in_the_box(p):
    """Float64 network with hand-derived gradients, box [0, 1], 30 steps, two targets."""
    net = TanhNet(inputs=12, hidden=8, classes=5, seed=3)
    model = net.keras_model()
    rng = np.random.default_rng(4)
    x = rng.uniform(size=(12, 12))
    z = net.logits(x)
    y = np.argmax(z, axis=1)
    found, correct = attacks.fab(model, x, y, math.inf, p, targets=2, steps=30, return_correct=True)
    order = np.argsort(-np.where(np.arange(5) == y[:, None], -np.inf, z), axis=1)
    for i in range(len(x)):
        point, distance = fab_run(
            net.logits, net.input_gradient, x[i], y[i], order[i, 0], p, 30, 0.0, 1.0
        )
        if math.isinf(distance):  # Not broken towards the first target: the second one ran.
            point, distance = fab_run(
                net.logits, net.input_gradient, x[i], y[i], order[i, 1], p, 30, 0.0, 1.0
            )
        np.testing.assert_allclose(found.numpy()[i], point, atol=1e-9)
        assert correct.numpy()[i] == math.isinf(distance)


def test_fab_reads_probabilities_through_their_logarithm():
    """A softmax output gives the points its logits give (the boundary is the same)."""
    logits, *_, x, y = _linear(n=16)
    probabilities, *_ = _linear(n=16, probabilities=True)
    a = attacks.fab(logits, x, y, 0.3, clip=None, from_logits=True)
    b = attacks.fab(probabilities, x, y, 0.3, clip=None, from_logits=False)
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


def _robust_epsilons(exact_min, count, far=0.02):
    """`count` radii each at least `far` (relative) from every example's distance."""
    values = np.sort(exact_min[np.isfinite(exact_min) & (exact_min > 0)])
    candidates = np.sqrt(values[:-1] * values[1:])
    gaps = values[1:] / values[:-1] - 1
    chosen = candidates[gaps > 2 * far]
    return list(chosen[np.linspace(0, len(chosen) - 1, count).astype(int)])


def _exact_robust_accuracy(p):
    """A linear model, 4 radii and its exact robust accuracy at each (NumPy)."""
    model, weights, bias, x, y = _linear(n=48, seed=1)
    clean = np.argmax(x @ weights + bias, axis=1) == y
    exact_min = np.where(clean, minimal_distances(weights, bias, x, y, p).min(axis=1), 0.0)
    epsilons = _robust_epsilons(exact_min, 4)
    expected = [float(np.mean(exact_min > e)) for e in epsilons]
    assert len(set(expected)) == 4  # Four different answers to find.
    return model, x, y, epsilons, expected


@pytest.mark.parametrize("p", [math.inf, 2.0, 1.0])
def test_fab_alone_finds_the_exact_robust_accuracy_of_linear_models(p):
    model, x, y, epsilons, expected = _exact_robust_accuracy(p)
    report = evaluate_robustness(
        model, (x, y), {p: epsilons}, attacks=("fab-t",), clip=None, sanity_examples=0, verbose=0
    )
    assert [report.robust_accuracy(p, e) for e in epsilons] == expected


@pytest.mark.slow
@pytest.mark.parametrize("p", [math.inf, 2.0])
def test_the_standard_suite_finds_the_exact_robust_accuracy_of_linear_models(p):
    model, x, y, epsilons, expected = _exact_robust_accuracy(p)
    report = evaluate_robustness(
        model, (x, y), {p: epsilons}, square_queries=100, clip=None, sanity_examples=0, verbose=0
    )
    assert report.settings["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert [report.robust_accuracy(p, e) for e in epsilons] == expected


@pytest.fixture(scope="module")
def mlp():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((6, 6, 1)), keras.layers.Flatten(), keras.layers.Dense(16, "tanh"),
         keras.layers.Dense(10)]
    )  # fmt: skip
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(40, 6, 6, 1)).astype("float32")
    y = np.argmax(model(x).numpy(), axis=1)
    return model, x, y


@pytest.mark.parametrize("p, epsilon", [(math.inf, 0.05), (2.0, 0.3), (1.0, 1.0)])
def test_fab_stays_in_the_ball_and_box_and_reproduces_with_a_seed(mlp, p, epsilon):
    model, x, y = mlp
    args = dict(targets=3, steps=20, restarts=2, seed=7)
    x_adv, correct = attacks.fab(model, x, y, epsilon, p, **args, return_correct=True)
    x_adv = x_adv.numpy()
    assert np.all(distances(tf.constant(x_adv - x), p).numpy() <= epsilon * (1 + 1e-6))
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    predicted = np.argmax(model(x_adv).numpy(), axis=1)
    np.testing.assert_array_equal(correct.numpy(), predicted == y)
    assert 0 < np.sum(~correct.numpy()) < len(x)  # Some broken, some not.
    np.testing.assert_array_equal(correct.numpy() | (x_adv != x).any(axis=(1, 2, 3)), True)
    again = attacks.fab(model, x, y, epsilon, p, **args).numpy()
    np.testing.assert_array_equal(again, x_adv)


@pytest.mark.slow
def test_fab_is_the_same_with_and_without_xla():
    model, _, _, x, y = _linear(n=16)
    args = dict(clip=(-3.0, 3.0), targets=2, steps=30, seed=1)
    graph = attacks.fab(model, x, y, math.inf, jit_compile=False, **args)
    xla = attacks.fab(model, x, y, math.inf, jit_compile=True, **args)
    np.testing.assert_allclose(xla.numpy(), graph.numpy(), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(epsilon=-0.1), r"Received: epsilon=-0\.1"),
        (dict(epsilon=float("nan")), r"Received: epsilon=nan"),
        (dict(p=0.5), r"Received: p=0\.5"),
        (dict(targets=0), r"Received: targets=0"),
        (dict(steps=0), r"Received: steps=0"),
        (dict(restarts=2, epsilon=math.inf), r"Received: epsilon=inf, restarts=2"),
        (dict(beta=1.5), r"Received: beta=1\.5"),
        (dict(eta=0), r"Received: eta=0"),
        (dict(clip=(1, 0)), r"Received: clip=\(1, 0\)"),
        (dict(y=None), r"Received: y=None"),
    ],
)
def test_bad_input_is_refused_before_any_work(mlp, kwargs, match):
    model, x, y = mlp
    args = {**dict(model=model, x=x, y=y, epsilon=0.1), **kwargs}
    with pytest.raises(ValueError, match=match):
        attacks.fab(**args)


def test_fab_traces_once_for_every_batch_size_and_radius(mlp):
    model, x, y = mlp
    for n, epsilon in ((40, 0.05), (17, 0.1), (3, 0.2)):
        attacks.fab(model, x[:n], y[:n], epsilon, targets=2, steps=5, restarts=2, seed=0)
    (kernel,) = [
        k for key, k in common._CACHE[model].items()
        if key[0].__name__ == "_fab_fn" and ("steps", 5) in key[-1]
    ]  # fmt: skip
    assert kernel._graph.experimental_get_tracing_count() == 1


@pytest.mark.slow
def test_one_evaluation_over_five_radii_traces_each_kernel_once():
    """Batches of 32 then 18, and fewer examples at each radius: one trace per kernel."""
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [keras.Input((12,)), keras.layers.Dense(16, "relu"), keras.layers.Dense(10)]
    )
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(1).uniform(size=(50, 12)).astype("float32")
    y = np.argmax(model(x).numpy(), axis=1)
    evaluate_robustness(
        model, (x, y), {math.inf: [0.01, 0.02, 0.05, 0.1, 0.2]}, apgd_steps=5, fab_steps=5,
        square_queries=20, batch_size=32, sanity_examples=10, verbose=0,
    )  # fmt: skip
    kernels = common._CACHE[model]
    traced = sorted(
        (key[0].__name__, kernel._graph.experimental_get_tracing_count())
        for key, kernel in kernels.items()
    )
    assert traced == [
        ("_apgd_fn", 1), ("_apgd_fn", 1), ("_fab_fn", 1), ("_scores_fn", 1), ("_scores_fn", 1),
        ("_square_init_builder", 1), ("_square_steps_builder", 1), ("clean_fn", 1),
        ("noise_fn", 1),
    ]  # fmt: skip
    assert all(k._xla.experimental_get_tracing_count() == 0 for k in kernels.values())
