"""Steps of the attacks against NumPy: targeted DLR, APGD's start, box and restarts, Square.

The references (tests/attack_steps_reference.py) are per-example NumPy code
from the papers; they take the same random draws from TensorFlow's
stateless generators (same seeds, shapes and algorithm) and do the rest
themselves, so the comparisons are exact up to rounding.
"""

from __future__ import annotations

import math

import attack_reference as ref
import attack_steps_reference as steps_ref
import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_gradreg import attacks
from keras_gradreg.attacks import auto_pgd, scores, square_attack

# ---------------------------------------------------------------------- #
# The targeted DLR loss.
# ---------------------------------------------------------------------- #


def test_targeted_dlr_by_hand():
    """z = (3, 1, 2, 0, -1), y = 0, t = 2: sorted 3, 2, 1, 0, so the scale is
    3 - (1 + 0) / 2 = 2.5 and the loss -(3 - 2) / 2.5 = -0.4."""
    z = tf.constant([[3.0, 1.0, 2.0, 0.0, -1.0]])
    got = scores.targeted_dlr(z, tf.constant([0]), tf.constant([2]))
    np.testing.assert_allclose(got.numpy(), [-0.4], rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_targeted_dlr_matches_numpy(dtype):
    rng = np.random.default_rng(0)
    z = rng.normal(scale=3.0, size=(200, 10))
    y = rng.integers(0, 10, size=200)
    t = (y + rng.integers(1, 10, size=200)) % 10
    got = scores.targeted_dlr(tf.constant(z.astype(dtype)), tf.constant(y), tf.constant(t))
    z = z.astype(dtype).astype("float64")
    want = [steps_ref.targeted_dlr(z[i], y[i], t[i])[0] for i in range(len(y))]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12 if dtype == "float64" else 1e-5)
    # Invariant to shifting and (positively) scaling the logits, as the paper says.
    moved = scores.targeted_dlr(tf.constant(2.5 * z + 7.0), tf.constant(y), tf.constant(t))
    np.testing.assert_allclose(moved.numpy(), want, rtol=1e-6)


def test_targeted_dlr_gradient_matches_numpy():
    """The gradient APGD-T ascends, through tf.math.top_k, against the hand derivation."""
    rng = np.random.default_rng(1)
    z = rng.normal(scale=2.0, size=(50, 6))
    y = rng.integers(0, 6, size=50)
    t = (y + rng.integers(1, 6, size=50)) % 6
    z_tf = tf.constant(z)
    with tf.GradientTape() as tape:
        tape.watch(z_tf)
        total = tf.reduce_sum(scores.targeted_dlr(z_tf, tf.constant(y), tf.constant(t)))
    got = tape.gradient(total, z_tf).numpy()
    want = np.stack([steps_ref.targeted_dlr(z[i], y[i], t[i])[1] for i in range(len(y))])
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------- #
# APGD: random start, box, restarts, targets.
# ---------------------------------------------------------------------- #


@pytest.mark.parametrize("p", [math.inf, 2.0])
def test_random_start_point_matches_numpy(p):
    """L-inf: uniform noise scaled to max |.| = eps; L2: a direction of length eps."""
    seed = tf.constant([5, 0], tf.int64)
    epsilon = tf.constant(0.3, tf.float64)  # as the attack passes it
    got = auto_pgd.random_start_point([7, 12], p, epsilon, seed, tf.float64).numpy()
    want = steps_ref.apgd_start_noise(7, 12, p, 0.3, seed)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(got, ord=p, axis=1), 0.3, rtol=1e-12)


@pytest.fixture(scope="module")
def tanh_images():
    """A float64 tanh net on 30 points of the box [0, 1]^6, labels its own predictions
    but for three (misclassified at x, never attacked)."""
    net = ref.TanhNet(inputs=6, hidden=8, classes=5, seed=1)
    x = np.random.default_rng(2).uniform(size=(30, 6))
    y = np.argmax(net.logits(x), axis=1)
    y[:3] = (y[:3] + 1) % 5
    return net, x, y


APGD_CASES = [
    pytest.param(dict(p=math.inf, epsilon=0.1, loss="ce"), marks=pytest.mark.slow),
    dict(p=2.0, epsilon=0.25, loss="ce"),  # The fast representatives: CE at L2,
    pytest.param(dict(p=math.inf, epsilon=0.1, loss="dlr"), marks=pytest.mark.slow),
    dict(p=math.inf, epsilon=0.1, loss="dlr", targets=3),  # and targeted DLR at L-inf.
]


def _case_id(case):
    return f"{case['loss']}-p={case['p']}-targets={case.get('targets', 0)}"


@pytest.mark.parametrize("case", APGD_CASES, ids=_case_id)
def test_apgd_start_box_and_restarts_match_numpy(tanh_images, case):
    """apgd(return_correct=True) with a random start, the [0, 1] box and 3 restarts (2 per
    target for APGD-T) gives NumPy's points and correctness.

    The L2 case found that runs were compared by their losses rounded to
    float32: of two restarts whose float64 losses differed by 3e-8, the
    library kept the lower one (fixed in auto_pgd._run_all).
    """
    net, x, y = tanh_images
    model = net.keras_model()
    targets = case.get("targets", 0)
    restarts = 2 if targets else 3
    settings = dict(epsilon=case["epsilon"], p=case["p"], steps=10, restarts=restarts, seed=11)
    extra = dict(targeted=True, target_classes=targets) if targets else {}
    x_adv, correct = attacks.apgd(
        model, x, y, loss=case["loss"], clip=(0.0, 1.0), **settings, **extra, return_correct=True
    )
    want_x, want_correct = steps_ref.apgd_protocol(
        net, x, y, clip=(0.0, 1.0), loss=case["loss"], targets=targets, **settings
    )
    np.testing.assert_array_equal(correct.numpy(), want_correct)
    np.testing.assert_allclose(x_adv.numpy(), want_x, rtol=1e-9, atol=1e-11)
    # The test can tell: some examples broken, some not; the box and the restarts
    # each change the reference's outcome.
    assert 0 < np.sum(want_correct) < len(x) - 3
    assert np.any((want_x == 0.0) | (want_x == 1.0))
    loss = case["loss"]
    no_box = steps_ref.apgd_protocol(net, x, y, clip=None, loss=loss, targets=targets, **settings)
    assert not np.allclose(no_box[0], want_x)
    one_run = steps_ref.apgd_protocol(
        net,
        x,
        y,
        clip=(0.0, 1.0),
        loss=loss,
        targets=min(targets, 1),
        **{**settings, "restarts": 1},
    )
    assert not np.allclose(one_run[0], want_x)


# ---------------------------------------------------------------------- #
# Square, L-inf: the schedule, one step, a short run.
# ---------------------------------------------------------------------- #

SHAPE = (5, 6, 3)


@pytest.fixture(scope="module")
def square_problem():
    """A float32 tanh net on (5, 6, 3) images in [0, 1], and its float64 NumPy mirror."""
    rng = np.random.default_rng(3)
    w1 = rng.normal(scale=0.3, size=(int(np.prod(SHAPE)), 8)).astype("float32")
    b1 = rng.normal(scale=0.1, size=8).astype("float32")
    w2 = rng.normal(scale=0.8, size=(8, 5)).astype("float32")
    b2 = rng.normal(scale=0.1, size=5).astype("float32")
    model = keras.Sequential(
        [
            keras.Input(SHAPE),
            keras.layers.Flatten(),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(5),
        ]
    )
    model.set_weights([w1, b1, w2, b2])

    def logits(images):
        flat = images.reshape(len(images), -1).astype("float64")
        return np.tanh(flat @ w1 + b1) @ w2.astype("float64") + b2

    x = rng.uniform(size=(24, *SHAPE)).astype("float32")
    y = np.argmax(logits(x), axis=1)
    return model, logits, x, y


@pytest.mark.parametrize("queries", [40, 300, 5000])
@pytest.mark.parametrize("layout", [(28, 28, 1), (5, 6, 3), (32, 32, 3)])
def test_square_window_sides_follow_the_rescaled_schedule(queries, layout):
    h, w, _ = layout
    got = square_attack.window_sides(queries, 0.8, layout, math.inf, True)
    want = [
        (s, s) for s in (steps_ref.square_side(i, queries, 0.8, h, w) for i in range(queries - 1))
    ]
    np.testing.assert_array_equal(got, want)
    assert len({tuple(s) for s in want}) > 2  # the schedule shrinks the window


def _square_kernels(model, queries):
    return square_attack._kernels(
        model, True, p=math.inf, queries=queries, p_init=0.8, rescale=True, shape=SHAPE
    )


@pytest.mark.parametrize("iteration", [0, 3, 9, 30])
def test_one_square_step_matches_numpy(square_problem, iteration):
    """From the same state, one iteration's window, signs, box and acceptance."""
    model, logits, x, y = square_problem
    queries, epsilon = 40, 0.08
    seed = tf.constant([4, 0], tf.int64)
    kernels = _square_kernels(model, queries)
    label = tf.constant(y, tf.int32)
    low, high, eps = (tf.constant(v, tf.float32) for v in (0.0, 1.0, epsilon))
    state = kernels.init(x, label, eps, low, high, seed)
    side = steps_ref.square_side(iteration, queries, 0.8, *SHAPE[:2])
    got = kernels.steps(
        x, label, state, eps, low, high, seed, tf.constant(iteration), tf.constant(iteration + 1)
    )
    draws = steps_ref.square_draws(seed, iteration, len(x), *SHAPE, side)
    want = steps_ref.square_step(
        x.astype("float64"),
        state.x_best.numpy().astype("float64"),
        state.margin.numpy().astype("float64"),
        state.correct.numpy(),
        lambda images: steps_ref.margin(logits(images), y),
        epsilon,
        side,
        draws,
        (0.0, 1.0),
    )
    np.testing.assert_allclose(got.x_best.numpy(), want[0], atol=1e-7)
    np.testing.assert_allclose(got.margin.numpy(), want[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got.correct.numpy(), want[2])
    accepted = np.any(want[0] != state.x_best.numpy(), axis=(1, 2, 3))
    assert 0 < np.sum(accepted) < np.sum(state.correct.numpy())  # some kept, some refused


def test_square_run_matches_numpy(square_problem):
    """square(return_correct=True), 60 queries from the stripes: NumPy's points and correctness."""
    model, logits, x, y = square_problem
    queries, epsilon, seed = 60, 0.08, 9
    y = y.copy()
    y[:2] = (y[:2] + 1) % 5  # misclassified at x: never attacked
    x_adv, correct = attacks.square(
        model, x, y, epsilon, queries=queries, seed=seed, return_correct=True
    )

    def margin_fn(images, labels):
        return steps_ref.margin(logits(images), labels)

    want_x = x.astype("float64").copy()
    want_correct = margin_fn(x, y) > 0
    active = np.flatnonzero(want_correct)
    run_seed = steps_ref.fold_in(tf.constant([seed, 0], tf.int64), 0)
    x_run = x[active].astype("float64")
    best = steps_ref.square_init(x_run, epsilon, run_seed, (0.0, 1.0))
    best_margin = margin_fn(best, y[active])
    run_correct = best_margin >= 0
    still = np.flatnonzero(run_correct)  # broken by the stripes: out of the loop
    xs, bs, ms, cs = x_run[still], best[still], best_margin[still], run_correct[still]
    for i in range(queries - 1):
        side = steps_ref.square_side(i, queries, 0.8, *SHAPE[:2])
        draws = steps_ref.square_draws(run_seed, i, len(still), *SHAPE, side)
        bs, ms, cs = steps_ref.square_step(
            xs, bs, ms, cs, lambda im: margin_fn(im, y[active][still]), epsilon, side, draws, (0, 1)
        )
    best[still], run_correct[still] = bs, cs
    want_x[active], want_correct[active] = best, run_correct
    np.testing.assert_array_equal(correct.numpy(), want_correct)
    np.testing.assert_allclose(x_adv.numpy(), want_x, atol=1e-7)
    assert 0 < np.sum(want_correct) < np.sum(margin_fn(x, y) > 0)  # the run broke some


# ---------------------------------------------------------------------- #
# Square, L2: one step on colour images.
# ---------------------------------------------------------------------- #

L2_SHAPE = (8, 8, 3)


@pytest.fixture(scope="module")
def colour_problem():
    """A float32 tanh net on (8, 8, 3) images in [0, 1], and its float64 NumPy mirror."""
    rng = np.random.default_rng(5)
    size = int(np.prod(L2_SHAPE))
    w1 = rng.normal(scale=0.2, size=(size, 8)).astype("float32")
    b1 = rng.normal(scale=0.1, size=8).astype("float32")
    w2 = rng.normal(scale=0.8, size=(8, 5)).astype("float32")
    b2 = rng.normal(scale=0.1, size=5).astype("float32")
    model = keras.Sequential(
        [
            keras.Input(L2_SHAPE),
            keras.layers.Flatten(),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(5),
        ]
    )
    model.set_weights([w1, b1, w2, b2])

    def logits(images):
        flat = images.reshape(len(images), -1).astype("float64")
        return np.tanh(flat @ w1 + b1) @ w2.astype("float64") + b2

    x = rng.uniform(size=(24, *L2_SHAPE)).astype("float32")
    return model, logits, x, np.argmax(logits(x), axis=1)


@pytest.mark.parametrize(
    "iteration",
    [pytest.param(0, marks=pytest.mark.slow), 5, pytest.param(30, marks=pytest.mark.slow)],
)
def test_one_l2_square_step_matches_the_authors_update(colour_problem, iteration):
    """From the same state, one L2 iteration on 3-channel images: the windows, the
    pattern, the per-channel mass moved into window 1, the norm, box and acceptance.

    It found two departures from the authors' update (fixed in
    square_attack.propose_l2): the windows' mass summed over channels, and the
    new window normalised together with copies of the pattern's edges outside it.
    """
    model, logits, x, y = colour_problem
    queries, epsilon = 40, 1.0
    seed = tf.constant([6, 0], tf.int64)
    kernels = square_attack._kernels(
        model, True, p=2.0, queries=queries, p_init=0.8, rescale=True, shape=L2_SHAPE
    )
    label = tf.constant(y, tf.int32)
    low, high, eps = (tf.constant(v, tf.float32) for v in (0.0, 1.0, epsilon))
    state = kernels.init(x, label, eps, low, high, seed)
    side = steps_ref.square_side_l2(iteration, queries, 0.8, *L2_SHAPE[:2])
    got = kernels.steps(
        x, label, state, eps, low, high, seed, tf.constant(iteration), tf.constant(iteration + 1)
    )
    draws = steps_ref.square_l2_draws(seed, iteration, len(x), *L2_SHAPE, side)
    want = steps_ref.square_l2_step(
        x.astype("float64"),
        state.x_best.numpy().astype("float64"),
        state.margin.numpy().astype("float64"),
        state.correct.numpy(),
        lambda images: steps_ref.margin(logits(images), y),
        epsilon,
        side,
        draws,
        (0.0, 1.0),
    )
    np.testing.assert_array_equal(got.correct.numpy(), want[2])
    np.testing.assert_allclose(got.x_best.numpy(), want[0], atol=1e-5)
    np.testing.assert_allclose(got.margin.numpy(), want[1], rtol=1e-4, atol=1e-5)
    accepted = np.any(want[0] != state.x_best.numpy(), axis=(1, 2, 3))
    assert 0 < np.sum(accepted) < np.sum(state.correct.numpy())  # some kept, some refused
