"""FAB's projection and attack loop against hand computations: cases added to kill mutants.

tests/test_fab.py checks the projections and the loop against an independent
NumPy reference (tests/fab_reference.py); these pin what that comparison
cannot see: rounding at the level search's tolerance, slopes below 1, a box
not starting at 0, the closed ball, inference mode (docs/testing.md,
"Mutation testing").
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf
from conftest import dropout_twins

from keras_gradreg import attacks
from keras_gradreg.attacks.fab_attack import _within
from keras_gradreg.attacks.fab_projections import _level, project_hyperplane

WEIGHTS = np.array([[1.0, 1.0, 1.0]], np.float32)
BREAKS = np.array([[0.1, 0.2, 0.3]], np.float32)  # g(lam) = sum_i min(lam, b_i): 0.6 at lam >= 0.3


def test_level_reaches_a_target_one_float32_rounding_above_the_saturated_sum():
    # A box that reaches the hyperplane up to float32 rounding: g never exceeds its
    # saturated sum 0.6, the target is one ulp above it. Within the tolerance (64 ulps
    # of float32, not of float64) the target counts as reached: lam is the last break,
    # not +inf (which would mean the box falls short of the hyperplane).
    saturated = tf.reduce_sum(WEIGHTS * BREAKS, axis=1).numpy()[0]
    for ulps in (1, 3):
        target = saturated
        for _ in range(ulps):
            target = np.nextafter(target, np.float32(1.0), dtype=np.float32)
        lam = _level(tf.constant(WEIGHTS), tf.constant(BREAKS), tf.constant([target])).numpy()
        assert np.isfinite(lam[0]) and abs(lam[0] - 0.3) < 1e-6, (ulps, lam)


def test_level_is_infinite_for_a_target_beyond_the_saturated_sum_and_exact_below_it():
    lam = _level(tf.constant(WEIGHTS), tf.constant(BREAKS), tf.constant([0.61, 0.45], np.float32))
    # On (0.1, 0.2] g(lam) = 0.1 + 2 lam, which is 0.45 at lam = 0.175; 0.61 > 0.6 is out of reach.
    assert math.isinf(lam.numpy()[0])
    np.testing.assert_allclose(lam.numpy()[1], 0.175, rtol=1e-6)


def test_level_takes_newton_steps_of_the_true_slope_when_it_is_below_one():
    # g(lam) = 2e-3 lam with no break: Newton lands on lam = 0.5 in one step of
    # residual / slope; a step of the residual alone would creep towards it.
    weights = np.full((1, 2), 1e-3, np.float32)
    breaks = np.full((1, 2), np.inf, np.float32)
    lam = _level(tf.constant(weights), tf.constant(breaks), tf.constant([1e-3], np.float32))
    np.testing.assert_allclose(lam.numpy(), [0.5], rtol=1e-6)


@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
def test_projection_stops_at_a_lower_bound_that_is_not_zero(p):
    # One coordinate at 0.5 in the box [0.3, 1], the hyperplane -x = -0.2 (x = 0.2): the
    # move is downwards, by at most t - low = 0.2, so the box's corner x = 0.3 is the answer.
    t = tf.constant([[0.5]])
    d = project_hyperplane(t, tf.constant([[-1.0]]), tf.constant([-0.2]), p, 0.3, 1.0)
    np.testing.assert_allclose(d.numpy(), [[-0.2]], rtol=1e-6)
    # Inside the box's reach, the exact move: -x = -0.4 (x = 0.4), d = -0.1.
    d = project_hyperplane(t, tf.constant([[-1.0]]), tf.constant([-0.4]), p, 0.3, 1.0)
    np.testing.assert_allclose(d.numpy(), [[-0.1]], rtol=1e-6)


def test_a_point_found_at_exactly_epsilon_breaks_the_image():
    # The threat model is the closed ball ||r|| <= epsilon, as the other attacks'
    # projections are: a distance equal to epsilon counts, one above it or none does not.
    distance = tf.constant([0.25, 0.25000003, 0.1, math.inf])
    np.testing.assert_array_equal(_within(distance, tf.constant(0.25)), [True, False, True, False])


def test_fab_attacks_the_model_in_inference_mode():
    # A Dropout layer is the identity at inference: FAB on the net with it finds what it
    # finds on the same net without it (dropout at rate 0.5 during the attack would not).
    x, y, plain, with_dropout = dropout_twins()
    args = dict(targets=3, steps=20, seed=7)
    expected = attacks.fab(plain, x, y, 0.05, math.inf, **args).numpy()
    got = attacks.fab(with_dropout, x, y, 0.05, math.inf, **args).numpy()
    np.testing.assert_array_equal(got, expected)
    assert (expected != x).any()  # The attack moved some points.
