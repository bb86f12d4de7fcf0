"""Tests for kgr.attacks.square: schedule, pattern, golden linear cases, constraints."""

import math

import numpy as np
import pytest
import tensorflow as tf
from attack_reference import distances, small_conv_classifier, two_live_classes

from keras_gradreg import attacks
from keras_gradreg.attacks import square_attack


def test_schedule_halves_at_the_published_iterations():
    fraction = square_attack.square_fraction
    # The 10000-query schedule: p_init until iteration 10, then halved after 10, 50, ...
    expected = {0: 0.8, 10: 0.8, 11: 0.4, 50: 0.4, 51: 0.2, 200: 0.2, 201: 0.1, 501: 0.05,
                1001: 0.025, 2001: 0.0125, 4001: 0.00625, 6001: 0.003125, 8001: 0.0015625,
                9999: 0.0015625}  # fmt: skip
    for iteration, value in expected.items():
        assert fraction(iteration, 10000, 0.8) == pytest.approx(value)
    # Rescaled to 5000 queries the thresholds come twice as early: int(i / 5000 * 10000).
    assert fraction(5, 5000, 0.8) == 0.8 and fraction(6, 5000, 0.8) == 0.4
    assert fraction(5, 5000, 0.8, rescale=False) == 0.8
    assert fraction(11, 5000, 0.8, rescale=False) == 0.4


def test_window_sides_follow_the_schedule():
    sides = square_attack.window_sides(5000, 0.8, (28, 28, 1), math.inf, True)
    assert tuple(sides[0]) == (25, 25)  # round(sqrt(0.8 * 784)) = 25
    assert tuple(sides[6]) == (18, 18)  # round(sqrt(0.4 * 784)) = 17.7
    assert tuple(sides[-1]) == (1, 1)  # round(sqrt(0.0015625 * 784)) = 1.1
    l2 = square_attack.window_sides(5000, 0.8, (28, 28, 1), 2.0, True)
    assert tuple(l2[6]) == (19, 19)  # 18 made odd
    assert tuple(l2[-1]) == (3, 3)  # at least 3
    rows = square_attack.window_sides(100, 0.8, (1, 50, 1), math.inf, True)
    assert tuple(rows[0]) == (1, 40)  # vectors: runs of round(0.8 * 50) features


def test_l2_pattern_matches_the_paper_by_hand():
    """3x3: the top row holds the rectangles of a 1x3 window, [1/4, 5/4, 1/4]; the
    two bottom rows those of a 2x3 window, [[1/4] * 3, [1/4, 5/4, 1/4]], negated;
    each half unit norm, then the whole."""
    top = np.array([[0.25, 1.25, 0.25]])
    bottom = np.array([[0.25, 0.25, 0.25], [0.25, 1.25, 0.25]])
    expected = np.concatenate([top / np.linalg.norm(top), -bottom / np.linalg.norm(bottom)])
    expected /= np.linalg.norm(expected)
    np.testing.assert_allclose(square_attack.square_pattern(3, 3), expected)
    for height, width in ((5, 5), (1, 7), (9, 9)):
        pattern = square_attack.square_pattern(height, width)
        assert pattern.shape == (height, width)
        np.testing.assert_allclose(np.linalg.norm(pattern), 1.0)


@pytest.mark.parametrize(
    "shape", [(784,), (28, 28, 1), (9, 7, 3)], ids=["vectors", "mnist", "colour"]
)
def test_l2_pattern_is_placed_whole_at_the_window(shape):
    """Each iteration's pattern lands at its window corner: square_pattern(h, w) there (its
    transpose when flipped, on images), for random corners; and a vector's pattern table is
    one row high (a side x side table made the 784-feature MLP's L2 Square 17x slower)."""
    layout = square_attack.image_layout(shape)
    loop = square_attack._SquareLoop(lambda: None, True, 2.0, 300, 0.8, True, shape)
    sides = square_attack.window_sides(300, 0.8, layout, 2.0, True)
    assert loop.table.shape[2:] == (1 if layout[0] == 1 else sides.max(), sides.max())
    rng = np.random.default_rng(0)
    for iteration in (0, 20, 298):
        h, w = sides[iteration]
        top = rng.integers(0, layout[0] - h + 1, size=6).astype("int32")
        left = rng.integers(0, layout[1] - w + 1, size=6).astype("int32")
        flip = np.array([False, True] * 3)
        placed = loop.placed_pattern(top, left, flip, iteration).numpy()
        for k in range(6):
            want = square_attack.square_pattern(h, w)
            if flip[k] and h > 1:
                want = want.T
            window = placed[k, top[k] : top[k] + h, left[k] : left[k] + w, 0]
            np.testing.assert_allclose(window, want, rtol=1e-6, atol=1e-7)


def test_linf_square_fools_exactly_the_examples_closer_than_epsilon():
    """3x3 images, a linear model: the best L-inf perturbation is a corner, which
    1000 queries of random windows find."""
    model, x, y, weights, bias = two_live_classes(d=9, image=(3, 3, 1))
    dist = distances(x, y, weights, bias, math.inf)
    epsilon = float(np.median(dist[dist > 0]))
    x_adv, correct = attacks.square(
        model, x, y, epsilon, queries=1000, clip=None, seed=0, return_correct=True
    )
    keep = np.abs(dist - epsilon) > 0.01 * epsilon
    fooled = ~correct.numpy()
    np.testing.assert_array_equal(fooled[keep], dist[keep] < epsilon)
    assert 20 < np.sum(keep & (dist < epsilon)) and 20 < np.sum(keep & (dist > epsilon))
    predicted = np.argmax(model.predict(x_adv, verbose=0), axis=1)
    np.testing.assert_array_equal(predicted != y, fooled)
    assert np.max(np.abs(x_adv.numpy() - x)) <= epsilon * (1 + 1e-6)


@pytest.mark.slow  # 11 s; the L2 step is checked against NumPy in the fast set.
def test_l2_square_fools_what_its_budget_reaches():
    """8x8 images, a linear model whose weights are constant on 4x4 blocks. The L2
    update moves mass between patterned windows, so in 5000 queries it gets within
    about 20% of the optimal direction (a NumPy port of the authors' code did the
    same): every example closer than 0.6 eps is fooled, none farther than eps."""
    rng = np.random.default_rng(0)
    model, x, y, weights, bias = two_live_classes(d=64, image=(8, 8, 1))
    blocks = np.kron(rng.normal(size=(2, 2, 2)), np.ones((4, 4, 1))).reshape(64, 2)
    weights[:, :2] = blocks
    model.layers[-1].set_weights([weights, bias])
    dist = distances(x, y, weights, bias, 2.0)
    epsilon = float(np.median(dist[dist > 0]))
    x_adv, correct = attacks.square(
        model, x, y, epsilon, p=2, clip=None, seed=0, return_correct=True
    )
    fooled = ~correct.numpy()
    assert np.all(fooled[dist < 0.6 * epsilon])
    assert not np.any(fooled[dist > epsilon])
    assert np.mean(fooled[(dist < epsilon) & (dist > 0)]) > 0.7
    norms = np.linalg.norm((x_adv.numpy() - x).reshape(len(x), -1), axis=1)
    assert np.all(norms <= epsilon * (1 + 1e-5))


@pytest.fixture(scope="module")
def image_net():
    return small_conv_classifier((8, 8, 2))


# L2 slices: slow (test_l2_square_fools_what_its_budget_reaches keeps L2 in the fast set).
@pytest.mark.parametrize(
    "p, epsilon", [(math.inf, 0.05), pytest.param(2.0, 0.5, marks=pytest.mark.slow)]
)
def test_square_stays_in_ball_and_box_and_reproduces(image_net, p, epsilon):
    model, x, y = image_net
    args = dict(p=p, queries=300, seed=3)
    a, correct = attacks.square(model, x, y, epsilon, **args, return_correct=True)
    np.testing.assert_array_equal(a, attacks.square(model, x, y, epsilon, **args))
    assert not np.array_equal(a, attacks.square(model, x, y, epsilon, **{**args, "seed": 4}))
    a = a.numpy()
    norms = np.linalg.norm((a - x).reshape(len(x), -1), ord=p, axis=1)
    assert np.all(norms <= epsilon * (1 + 1e-5))
    assert a.min() >= 0.0 and a.max() <= 1.0
    np.testing.assert_array_equal(
        np.argmax(model.predict(a, verbose=0), axis=1) == y, correct.numpy()
    )
    assert 0 < np.sum(correct) < len(x)


@pytest.mark.parametrize(
    "p, epsilon", [(math.inf, 0.03), pytest.param(2.0, 0.3, marks=pytest.mark.slow)]
)
def test_more_queries_and_restarts_never_raise_correctness(image_net, p, epsilon):
    """With the schedule in absolute iterations, a larger budget repeats the smaller
    one's queries first; restarts are nested too."""
    model, x, y = image_net
    args = dict(p=p, seed=0, rescale_schedule=False)
    few = attacks.square(model, x, y, epsilon, queries=40, **args, return_correct=True)[1].numpy()
    many = attacks.square(model, x, y, epsilon, queries=600, **args, return_correct=True)[1].numpy()
    assert np.all(many <= few) and np.sum(many) < np.sum(few)
    more = attacks.square(
        model, x, y, epsilon, queries=40, restarts=3, **args, return_correct=True
    )[1].numpy()
    assert np.all(more <= few)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(epsilon=-1.0), r"Received: epsilon=-1\.0"),
        (dict(p=1), r"Received: p=1\.0"),
        (dict(queries=0), r"Received: queries=0"),
        (dict(p_init=1.5), r"Received: p_init=1\.5"),
        (dict(restarts=0), r"Received: restarts=0"),
        (dict(clip=(1, 0)), r"Received: clip=\(1, 0\)"),
        (dict(x=np.zeros((2, 2, 2, 2, 2), "float32")), r"Received: an input of shape"),
    ],
)
def test_square_rejects_bad_arguments(image_net, kwargs, match):
    model, x, y = image_net
    args = dict(model=model, x=x[:2], y=y[:2], epsilon=0.1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        attacks.square(**args)


def test_square_on_vectors_and_one_query():
    """Vector inputs are one row of features; one query is the initial stripes only
    (examples misclassified at x are not attacked)."""
    model, x, y, weights, bias = two_live_classes(d=12)
    x_adv = attacks.square(model, x, y, 0.2, queries=1, clip=None, seed=0).numpy()
    delta = x_adv - x
    attacked = np.argmax(model.predict(x, verbose=0), axis=1) == y
    np.testing.assert_allclose(np.abs(delta[attacked]), 0.2, rtol=1e-5)  # every feature +-eps
    np.testing.assert_array_equal(delta[~attacked], 0.0)
    tf.debugging.assert_equal(tf.shape(x_adv), tf.shape(x))
