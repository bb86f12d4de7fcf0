"""Tests for kgr.attacks: golden linear cases, projections, seeds, bad input."""

import math
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_gradreg import attacks
from keras_gradreg.attacks import common, projected

NORMS = [math.inf, 2.0, 1.0]


def _np_norm(v, p):
    return np.linalg.norm(v.reshape(len(v), -1), ord=p, axis=1)


def _dual(p):
    return 1.0 if math.isinf(p) else (math.inf if p == 1.0 else p / (p - 1.0))


# ---------------------------------------------------------------------- #
# Projections against a NumPy reference.
# ---------------------------------------------------------------------- #


def _np_project_l1(v, radius):
    """Reference: bisection on the soft threshold (not the sort algorithm)."""
    out = []
    for row, r in zip(v, radius):
        if np.abs(row).sum() <= r:
            out.append(row)
            continue
        lo, hi = 0.0, np.abs(row).max()
        for _ in range(200):
            mid = (lo + hi) / 2
            if np.maximum(np.abs(row) - mid, 0).sum() > r:
                lo = mid
            else:
                hi = mid
        out.append(np.sign(row) * np.maximum(np.abs(row) - hi, 0))
    return np.stack(out)


def _np_project(v, p, radius):
    if math.isinf(p):
        return np.clip(v, -radius[:, None], radius[:, None])
    if p == 2.0:
        norm = np.linalg.norm(v, axis=1, keepdims=True)
        return v * np.minimum(1.0, radius[:, None] / np.maximum(norm, 1e-30))
    return _np_project_l1(v, radius)


@pytest.mark.parametrize("p", NORMS)
def test_projection_matches_numpy_reference(p):
    rng = np.random.default_rng(0)
    v = rng.normal(size=(6, 30)) * rng.uniform(0.1, 3.0, size=(6, 1))
    radius = np.array([0.0, 0.1, 0.5, 1.0, 5.0, 100.0])  # the last leaves v inside
    got = attacks.project_ball(tf.constant(v, tf.float64), p, tf.constant(radius)).numpy()
    np.testing.assert_allclose(got, _np_project(v, p, radius), atol=1e-9)
    assert np.all(_np_norm(got, p) <= radius + 1e-9)
    np.testing.assert_allclose(got[-1], v[-1])
    # Idempotent, and a scalar radius means the same radius for every row.
    again = attacks.project_ball(tf.constant(got), p, tf.constant(radius)).numpy()
    np.testing.assert_allclose(again, got, atol=1e-9)
    scalar = attacks.project_ball(tf.constant(v, tf.float64), p, 0.5).numpy()
    np.testing.assert_allclose(scalar, _np_project(v, p, np.full(6, 0.5)), atol=1e-9)


def test_l1_projection_keeps_image_shape_and_float32_accuracy():
    rng = np.random.default_rng(1)
    v = rng.normal(size=(4, 5, 5, 2)).astype("float32")
    got = attacks.project_l1(tf.constant(v), 2.0).numpy()
    assert got.shape == v.shape
    expected = _np_project_l1(v.reshape(4, -1).astype("float64"), np.full(4, 2.0))
    np.testing.assert_allclose(got.reshape(4, -1), expected, atol=1e-5)
    np.testing.assert_allclose(np.abs(got).reshape(4, -1).sum(axis=1), 2.0, rtol=1e-5)


@pytest.mark.parametrize("p", NORMS)
def test_random_points_lie_in_ball_and_on_sphere(p):
    seed = tf.constant([3, 4], tf.int64)
    inside = attacks.random_in_ball([64, 7, 3], p, 0.3, seed).numpy()
    on = attacks.random_on_sphere([64, 7, 3], p, 0.3, seed).numpy()
    assert np.all(_np_norm(inside, p) <= 0.3 + 1e-6)
    np.testing.assert_allclose(_np_norm(on, p), 0.3, rtol=1e-5)
    again = attacks.random_in_ball([64, 7, 3], p, 0.3, seed).numpy()
    np.testing.assert_array_equal(inside, again)
    # Uniform in the ball: the mean norm is radius * d / (d + 1) for d = 21.
    np.testing.assert_allclose(np.mean(_np_norm(inside, p)) / 0.3, 21 / 22, atol=0.03)


# ---------------------------------------------------------------------- #
# Golden linear models: the exact minimal adversarial distance is known.
# ---------------------------------------------------------------------- #


def _linear(weights, bias, activation=None):
    model = keras.Sequential(
        [keras.Input((weights.shape[0],)), keras.layers.Dense(weights.shape[1])]
    )
    if activation is not None:
        model.add(keras.layers.Activation(activation))
    model.layers[0].set_weights([weights, bias])
    return model


def _two_class_case(seed=0, n=300, d=12):
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(d, 2)).astype("float32")
    bias = rng.normal(size=2).astype("float32") * 0.1
    x = rng.normal(size=(n, d)).astype("float32")
    y = rng.integers(0, 2, size=n)
    return weights, bias, x, y


def _distances(weights, bias, x, y, p):
    """margin / ||w_y - w_other||_q; 0 for examples already misclassified."""
    logits = x.astype("float64") @ weights + bias
    rows = np.arange(len(y))
    margin = logits[rows, y] - logits[rows, 1 - y]
    diff = (weights[:, y] - weights[:, 1 - y]).T.astype("float64")
    return np.maximum(margin, 0.0) / np.linalg.norm(diff, ord=_dual(p), axis=1)


def _away_from(dist, epsilon, band):
    return np.abs(dist - epsilon) > band * epsilon


def _assert_golden(model, x, y, dist, epsilon, band, attack, loss=None):
    keep = _away_from(dist, epsilon, band)
    x_adv = attack(model, x, y, epsilon, loss=loss)
    predicted = np.argmax(model.predict(np.asarray(x_adv), verbose=0), axis=1)
    fooled = predicted != y
    np.testing.assert_array_equal(fooled[keep], dist[keep] < epsilon)
    # Both sides of the boundary are exercised.
    assert 20 < np.sum(keep & (dist < epsilon)) and 20 < np.sum(keep & (dist > epsilon))


@pytest.mark.parametrize("p", NORMS)
def test_fgsm_and_pgd_find_exactly_the_examples_closer_than_epsilon(p):
    weights, bias, x, y = _two_class_case()
    model = _linear(weights, bias)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    dist = _distances(weights, bias, x, y, p)
    epsilon = float(np.median(dist[dist > 0]))

    def fgsm(*args, **kwargs):
        return attacks.fgsm(*args, p=p, clip=None, **kwargs)

    def pgd_from_x(*args, **kwargs):
        return attacks.pgd(*args, p=p, steps=20, random_start=False, clip=None, **kwargs)

    def pgd_random(*args, **kwargs):
        return attacks.pgd(*args, p=p, steps=60, restarts=2, clip=None, seed=1, **kwargs)

    _assert_golden(model, x, y, dist, epsilon, 0.01, fgsm, loss)
    _assert_golden(model, x, y, dist, epsilon, 0.01, pgd_from_x, loss)
    _assert_golden(model, x, y, dist, epsilon, 0.05, pgd_random, loss)


@pytest.mark.parametrize("p", NORMS)
def test_golden_case_with_probabilities_and_compiled_loss(p):
    """A softmax model with the compiled (probability) loss: same distances."""
    weights, bias, x, y = _two_class_case(seed=1)
    model = _linear(weights, bias, activation="softmax")
    model.compile(loss="sparse_categorical_crossentropy")
    dist = _distances(weights, bias, x, y, p)
    epsilon = float(np.median(dist[dist > 0]))

    def fgsm(*args, **kwargs):
        return attacks.fgsm(*args, p=p, clip=None, **kwargs)

    _assert_golden(model, x, y, dist, epsilon, 0.01, fgsm)


@pytest.mark.parametrize("activation, from_logits", [(None, True), ("sigmoid", False)])
def test_binary_classifier_threshold_follows_from_logits(activation, from_logits):
    """One output unit: distance |z| / ||w||_q; threshold 0 (logits) or 0.5."""
    rng = np.random.default_rng(2)
    weights = rng.normal(size=(10, 1)).astype("float32")
    bias = np.array([0.2], "float32")
    x = rng.normal(size=(300, 10)).astype("float32")
    logits = (x @ weights + bias)[:, 0]
    y = (logits > 0).astype("float32")
    y[:30] = 1.0 - y[:30]  # some misclassified examples: distance 0
    model = _linear(weights, bias, activation)
    loss = keras.losses.BinaryCrossentropy(from_logits=from_logits)
    assert attacks.loss_from_logits(model, loss) is from_logits
    signed = np.where(y > 0.5, logits, -logits)
    dist = np.maximum(signed, 0) / np.abs(weights[:, 0]).sum()  # p = inf, q = 1
    epsilon = float(np.median(dist[dist > 0]))
    keep = _away_from(dist, epsilon, 0.01)
    for attack in (attacks.fgsm, attacks.pgd):
        _, correct = attack(
            model, x, y[:, None], epsilon, loss=loss, clip=None, return_correct=True
        )
        np.testing.assert_array_equal(~correct.numpy()[keep], dist[keep] < epsilon)


@pytest.mark.parametrize("activation, from_logits", [(None, True), ("sigmoid", False)])
@pytest.mark.parametrize("attack", ["apgd", "square", "fab"])
def test_the_suite_reads_a_binary_classifiers_one_output(attack, activation, from_logits):
    """z = 3x, one output: an example holds at L-inf 0.3 iff it is right and |x| > 0.3.

    The decision boundary is x = 0 (logit 0, probability 0.5), at L-inf
    distance |x|. A batch traced with an unknown size once hid the single
    column, and the suite read the classifier as having one class.
    """
    x = np.linspace(-1.0, 1.0, 12, dtype="float32").reshape(-1, 1)
    y = np.array([0, 1] * 6)
    model = _linear(np.array([[3.0]], "float32"), np.array([0.0], "float32"), activation)
    holds = ((x[:, 0] > 0) == (y == 1)) & (np.abs(x[:, 0]) > 0.3)
    settings = {"apgd": dict(steps=10), "square": dict(queries=100), "fab": dict(steps=10)}
    settings = dict(p=math.inf, from_logits=from_logits, clip=None, **settings[attack])
    _, correct = getattr(attacks, attack)(model, x, y, 0.3, return_correct=True, **settings)
    np.testing.assert_array_equal(correct.numpy(), holds)
    assert 0 < holds.sum() < np.sum((x[:, 0] > 0) == (y == 1))  # Some broken, some held.


def test_fgsm_matches_hand_computed_step_and_box():
    """Softmax regression: g = (softmax(z) - onehot) W^T, x_adv = clip(x + eps sign g)."""
    rng = np.random.default_rng(3)
    weights = rng.normal(size=(8, 3)).astype("float32")
    bias = np.zeros(3, "float32")
    x = rng.uniform(size=(5, 8)).astype("float32")
    y = np.array([0, 1, 2, 0, 1])
    model = _linear(weights, bias)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    z = x @ weights
    probs = np.exp(z - z.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    g = (probs - np.eye(3)[y]) @ weights.T
    got = attacks.fgsm(model, x, y, 0.1, loss=loss).numpy()
    np.testing.assert_allclose(got, np.clip(x + 0.1 * np.sign(g), 0, 1), atol=1e-6)
    got2 = attacks.fgsm(model, x, y, 0.5, p=2, loss=loss, clip=None).numpy()
    r = 0.5 * g / np.linalg.norm(g, axis=1, keepdims=True)
    np.testing.assert_allclose(got2, x + r, atol=1e-5)
    # One-hot labels give the same attack as integer labels (the same hand-computed point).
    onehot = keras.losses.CategoricalCrossentropy(from_logits=True)
    got3 = attacks.fgsm(model, x, np.eye(3)[y], 0.1, loss=onehot).numpy()
    np.testing.assert_allclose(got3, np.clip(x + 0.1 * np.sign(g), 0, 1), atol=1e-6)
    np.testing.assert_array_equal(got3, got)
    # And with the probability form of the loss on a softmax model.
    softmax = _linear(weights, bias, activation="softmax")
    got4 = attacks.fgsm(softmax, x, np.eye(3)[y], 0.1, loss="categorical_crossentropy").numpy()
    np.testing.assert_allclose(got4, np.clip(x + 0.1 * np.sign(g), 0, 1), atol=1e-6)


# ---------------------------------------------------------------------- #
# PGD: constraints, seeds, box-aware steps.
# ---------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def small_net():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 1)),
            keras.layers.Conv2D(4, 3, activation="tanh"),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(4)
    x = rng.uniform(size=(16, 6, 6, 1)).astype("float32")
    y = rng.integers(0, 3, size=16)
    return model, x, y


@pytest.mark.parametrize("p, epsilon", [(math.inf, 0.1), (2.0, 0.8), (1.0, 3.0)])
def test_pgd_stays_in_ball_and_box_and_is_reproducible(small_net, p, epsilon):
    model, x, y = small_net
    kwargs = dict(p=p, steps=5, restarts=2, seed=7)
    a = attacks.pgd(model, x, y, epsilon, **kwargs).numpy()
    b = attacks.pgd(model, x, y, epsilon, **kwargs).numpy()
    c = attacks.pgd(model, x, y, epsilon, **{**kwargs, "seed": 8}).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.all(_np_norm(a - x, p) <= epsilon * (1 + 1e-5))
    assert a.min() >= 0.0 and a.max() <= 1.0
    # A box that excludes part of the ball is respected as well.
    x = np.clip(x, 0.2, 0.9)
    boxed = attacks.pgd(model, x, y, epsilon, clip=(0.2, 0.9), **kwargs).numpy()
    assert boxed.min() >= 0.2 - 1e-7 and boxed.max() <= 0.9 + 1e-7


def test_pgd_never_worse_than_clean_and_stronger_than_fgsm(small_net):
    model, x, y = small_net
    clean = np.argmax(model.predict(x, verbose=0), axis=1) == y
    _, pgd_correct = attacks.pgd(model, x, y, 0.3, steps=10, seed=0, return_correct=True)
    _, fgsm_correct = attacks.fgsm(model, x, y, 0.3, return_correct=True)
    pgd_correct, fgsm_correct = pgd_correct.numpy(), fgsm_correct.numpy()
    assert np.all(pgd_correct <= clean)
    assert pgd_correct.sum() <= fgsm_correct.sum() <= clean.sum()
    # The returned correctness is that of the returned points.
    x_adv = attacks.pgd(model, x, y, 0.3, steps=10, seed=0)
    np.testing.assert_array_equal(
        np.argmax(model.predict(x_adv, verbose=0), axis=1) == y, pgd_correct
    )


def test_more_pgd_restarts_never_raise_correctness_per_example(small_net):
    """Restart r draws from the seed folded with r whatever the total, and the best
    point is kept across restarts: a mutant keeping only the last restart's best
    point fails this (one restart breaks examples that the last of three does not)."""
    model, x, y = small_net
    correct = {
        restarts: attacks.pgd(
            model,
            x,
            y,
            0.12,
            steps=1,
            restarts=restarts,
            seed=0,
            step_size=0.0,
            return_correct=True,
        )[1].numpy()
        for restarts in (1, 2, 5)
    }
    assert np.all(correct[2] <= correct[1]) and np.all(correct[5] <= correct[2])
    assert np.sum(correct[5]) < np.sum(correct[1])


def test_pgd_with_epsilon_zero_returns_the_input(small_net):
    model, x, y = small_net
    for p in NORMS:
        np.testing.assert_allclose(attacks.pgd(model, x, y, 0.0, p=p, steps=2, seed=0), x)


def test_l1_pgd_moves_pixels_that_sit_on_the_box():
    """A pixel at 1 pushing upwards is skipped, so L1 PGD still makes progress."""
    weights = np.zeros((4, 2), "float32")
    weights[:, 1] = [5.0, 1.0, 0.0, 0.0]  # class 1 rises most with pixel 0
    model = _linear(weights, np.array([0.0, 0.0], "float32"))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    x = np.array([[1.0, 0.2, 0.5, 0.5]], "float32")  # pixel 0 already at the top
    x_adv = attacks.pgd(model, x, np.array([0]), 0.5, p=1, steps=10, random_start=False, loss=loss)
    np.testing.assert_allclose(x_adv.numpy(), [[1.0, 0.7, 0.5, 0.5]], atol=1e-5)


def test_xla_and_graph_kernels_agree(small_net):
    """Same correctness and losses at the returned points (the points may
    differ where two steps have almost the same loss). No random start: XLA
    draws another Philox stream."""
    model, x, y = small_net
    kwargs = dict(p=2, steps=3, random_start=False)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    graph, graph_correct = attacks.pgd(
        model, x, y, 0.5, jit_compile=False, **kwargs, return_correct=True
    )
    xla, xla_correct = attacks.pgd(
        model, x, y, 0.5, jit_compile=True, **kwargs, return_correct=True
    )
    np.testing.assert_array_equal(graph_correct, xla_correct)
    np.testing.assert_allclose(loss(y, model(graph)), loss(y, model(xla)), rtol=1e-3)


def test_pgd_inside_dataset_map_matches_direct_call(small_net):
    """Graph kernel on both calls: with jit_compile=None an eager call on a GPU would use
    XLA, which draws the random start from another stream than the graph in the map."""
    model, x, y = small_net
    seed = tf.constant([5, 0], tf.int64)
    kwargs = dict(steps=3, seed=seed, jit_compile=False)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    mapped = ds.map(lambda xb, yb: attacks.pgd(model, xb, yb, 0.1, **kwargs))
    got = np.concatenate([batch.numpy() for batch in mapped])
    direct = np.concatenate(
        [attacks.pgd(model, x[i : i + 8], y[i : i + 8], 0.1, **kwargs) for i in (0, 8)]
    )
    assert not np.array_equal(got, x)  # The attack moved the points.
    np.testing.assert_allclose(got, direct, atol=1e-6)


# ---------------------------------------------------------------------- #
# Losses, labels and validation.
# ---------------------------------------------------------------------- #


def test_loss_from_logits_detection():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    assert attacks.loss_from_logits(model, "sparse_categorical_crossentropy") is False
    assert attacks.loss_from_logits(model, keras.losses.CategoricalCrossentropy(True)) is True
    assert attacks.loss_from_logits(model, "mse") is None
    assert attacks.loss_from_logits(model, lambda y, p: p) is None
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert attacks.loss_from_logits(model) is True


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(epsilon=-1.0), r"Received: epsilon=-1\.0"),
        (dict(epsilon=float("nan")), r"Received: epsilon=nan"),
        (dict(p=0.5), r"Received: p=0\.5"),
        (dict(p=3), r"Received: p=3"),
        (dict(steps=0), r"Received: steps=0"),
        (dict(restarts=0), r"Received: restarts=0"),
        (dict(restarts=2, random_start=False), r"Received: restarts=2"),
        (dict(step_size=-0.1), r"Received: step_size=-0\.1"),
        (dict(clip=(1.0, 0.0)), r"Received: clip=\(1\.0, 0\.0\)"),
        (dict(seed="a"), r"Received: seed='a'"),
        (dict(y=None), r"Received: y=None"),
    ],
)
def test_pgd_rejects_bad_arguments(small_net, kwargs, match):
    model, x, y = small_net
    args = dict(model=model, x=x, y=y, epsilon=0.1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        attacks.pgd(**args)


def test_fgsm_rejects_bad_arguments(small_net):
    model, x, y = small_net
    with pytest.raises(ValueError, match=r"Received: epsilon=-1\.0"):
        attacks.fgsm(model, x, y, -1.0)
    with pytest.raises(ValueError, match=r"Received: p=0\.5"):
        attacks.fgsm(model, x, y, 0.1, p=0.5)
    # FGSM accepts any p >= 1 (the family's closed form).
    x_adv = attacks.fgsm(model, x, y, 0.5, p=3, clip=None).numpy()
    np.testing.assert_allclose(_np_norm(x_adv - x, 3), 0.5, rtol=1e-4)


_STRATEGY_SCRIPT = textwrap.dedent(
    """
    import numpy as np, tensorflow as tf, keras
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from keras_gradreg import attacks
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(8, 5)).astype("float32"); y = rng.integers(0, 3, 8)
    ds = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(8))

    @tf.function
    def step(xb, yb):
        return strategy.run(
            lambda a, b: attacks.pgd(model, a, b, 0.1, steps=3, random_start=False, loss=loss),
            args=(xb, yb))

    for xb, yb in ds:
        out = strategy.gather(step(xb, yb), axis=0).numpy()
    ref = attacks.pgd(model, x, y, 0.1, steps=3, random_start=False, loss=loss).numpy()
    print("MAXDIFF", float(np.abs(out - ref).max()))
    """
)


@pytest.mark.slow
def test_pgd_under_mirrored_strategy_matches_single_device():
    """Per-example gradients: two replicas give the single-device result."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [sys.executable, "-c", _STRATEGY_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = [ln for ln in result.stdout.splitlines() if ln.startswith("MAXDIFF")][-1]
    assert float(line.split()[1]) < 1e-6


def test_recompiled_model_gets_a_kernel_for_its_new_loss():
    """With loss=None the cached kernel follows the model's current compiled loss."""
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    first = common.compiled_kernel(model, None, projected._fgsm_fn, p=math.inf)
    assert common.compiled_kernel(model, None, projected._fgsm_fn, p=math.inf) is first
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=False))
    assert common.compiled_kernel(model, None, projected._fgsm_fn, p=math.inf) is not first
