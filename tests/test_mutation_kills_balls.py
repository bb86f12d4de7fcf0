"""keras_gradreg.balls against NumPy: cases added to kill mutants (docs/testing.md).

The projections' main tests are in tests/test_attacks.py; these pin what
they leave open: exact random points (the hash reproduced in NumPy by
tests/members_reference.py), image-shaped batches with one radius per
example, and the sign and sphere draws' exact support.
"""

from __future__ import annotations

import math

import members_reference as mref
import numpy as np
import pytest
import tensorflow as tf

from keras_gradreg import balls

SEED = [7, 11]


def _np_in_ball(p, radius, rows, size, positions):
    """The documented draws: cube uniforms; normal direction times u^(1/d); L1 exponentials."""
    if math.isinf(p):
        return radius * (2.0 * mref.uniform(SEED, positions, size) - 1.0)
    if p == 2.0:
        direction = mref.normal(SEED, positions, size)
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        u = mref.uniform(SEED, positions, 1, stream=2)
        return radius * u ** (1.0 / size) * direction
    exponential = -np.log(1.0 - mref.uniform(SEED, positions, size + 1))
    point = exponential[:, :-1] / exponential.sum(axis=1, keepdims=True)
    signs = np.where(mref.uniform(SEED, positions, size, stream=1) < 0.5, -1.0, 1.0)
    return radius * signs * point


@pytest.mark.parametrize("p", [math.inf, 2.0, 1.0])
def test_random_in_ball_equals_numpy_draws(p):
    """Rows keyed 0..n-1 by default, or by `positions`; image shape and dtype kept."""
    seed = tf.constant(SEED, tf.int64)
    got = balls.random_in_ball([3, 2, 4], p, 0.25, seed, dtype=tf.float64).numpy()
    assert got.shape == (3, 2, 4) and got.dtype == np.float64
    want = _np_in_ball(p, 0.25, 3, 8, np.arange(3)).reshape(3, 2, 4)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
    positions = np.array([4, 0, 17])
    keyed = balls.random_in_ball([3, 8], p, 0.25, seed, positions=tf.constant(positions))
    want = _np_in_ball(p, 0.25, 3, 8, positions)
    np.testing.assert_allclose(keyed.numpy(), want, rtol=2e-5, atol=1e-7)


def test_random_signs_are_plus_or_minus_one():
    signs = balls.random_signs([50, 4], tf.constant([1, 2]), tf.float64).numpy()
    assert signs.dtype == np.float64
    assert set(np.unique(signs)) == {-1.0, 1.0}
    assert 0.3 < np.mean(signs > 0) < 0.7


@pytest.mark.parametrize("p", [math.inf, 2.0, 1.0])
def test_random_on_sphere_support(p):
    """L-inf: every coordinate is +-radius; L2 and L1: the p-norm is radius; both signs occur."""
    on = balls.random_on_sphere([40, 3, 2], p, 0.5, tf.constant([5, 6]), tf.float64).numpy()
    assert on.shape == (40, 3, 2) and on.dtype == np.float64
    flat = on.reshape(40, -1)
    if math.isinf(p):
        np.testing.assert_array_equal(np.abs(flat), 0.5)
    else:
        np.testing.assert_allclose(np.linalg.norm(flat, ord=p, axis=1), 0.5, rtol=1e-12)
        assert np.abs(flat).min() > 0 and np.abs(flat).max() < 0.5
    assert 0.3 < np.mean(flat > 0) < 0.7


@pytest.mark.parametrize("p", [math.inf, 2.0, 1.0])
def test_projection_of_image_batches_with_per_example_radius(p):
    """Rank-3 rows, one radius each (a zero row and a zero radius among them)."""
    rng = np.random.default_rng(4)
    v = rng.normal(size=(4, 3, 2))
    v[2] = 0.0
    radius = np.array([0.3, 0.0, 0.7, 50.0])
    got = balls.project_ball(tf.constant(v), p, tf.constant(radius)).numpy()
    assert got.shape == v.shape
    flat = v.reshape(4, -1)
    if math.isinf(p):
        want = np.clip(flat, -radius[:, None], radius[:, None])
    elif p == 2.0:
        norm = np.linalg.norm(flat, axis=1, keepdims=True)
        want = flat * np.minimum(1.0, radius[:, None] / np.maximum(norm, 1e-300))
    else:
        want = []
        for row, r in zip(flat, radius):
            if np.abs(row).sum() <= r:
                want.append(row)
                continue
            # The soft threshold theta with sum(max(|row| - theta, 0)) = r, by bisection.
            lo, hi = 0.0, np.abs(row).max()
            for _ in range(200):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if np.maximum(np.abs(row) - mid, 0).sum() > r else (lo, mid)
            want.append(np.sign(row) * np.maximum(np.abs(row) - hi, 0))
        want = np.stack(want)
    np.testing.assert_allclose(got.reshape(4, -1), want, atol=1e-12)


def test_ball_norm_accepts_only_exact_projections():
    assert balls.ball_norm("inf") == math.inf and balls.ball_norm(1) == 1.0
    assert balls.ball_norm(2) == 2.0
    with pytest.raises(ValueError, match=r"Received: p=3"):
        balls.ball_norm(3)


def test_l2_projection_gradient_is_finite_at_zero_and_the_closed_form_outside():
    """d/dv sum(P(v)): ones inside the ball (zero row too); sum(v)/||v|| outside, by hand."""
    v = tf.Variable([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0], [0.1, 0.2, 0.0]], dtype=tf.float64)
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(balls.project_l2(v, 1.0))
    grad = tape.gradient(total, v).numpy()
    # Outside: grad of sum(v) / ||v|| = 1/||v|| - sum(v) v / ||v||^3, ||v|| = 5, sum(v) = 7.
    outside = 0.2 - 7.0 * np.array([3.0, 4.0, 0.0]) / 125.0
    np.testing.assert_allclose(grad, [[1.0, 1.0, 1.0], outside, [1.0, 1.0, 1.0]], rtol=1e-12)


@pytest.mark.parametrize("p", [math.inf, 2.0, 1.0])
def test_random_on_sphere_follows_its_documented_recipe(p):
    """The seed split in two: signs from the first, magnitudes or directions from the second."""
    seed = tf.constant([5, 6])
    got = balls.random_on_sphere([6, 2, 2], p, 0.5, seed, tf.float64).numpy().reshape(6, 4)
    first, second = tf.random.experimental.stateless_split(seed, 2, alg="philox")
    bits = tf.random.stateless_uniform([6, 4], first, 0, 2, dtype=tf.int32, alg="philox")
    signs = 2.0 * bits.numpy() - 1.0
    if math.isinf(p):
        want = 0.5 * signs
    elif p == 2.0:
        normal = tf.random.stateless_normal([6, 4], second, dtype=tf.float64, alg="philox")
        want = 0.5 * normal.numpy() / np.linalg.norm(normal.numpy(), axis=1, keepdims=True)
    else:
        u = tf.random.stateless_uniform([6, 4], second, 1e-12, 1.0, tf.float64, alg="philox")
        magnitude = -np.log(u.numpy())
        want = 0.5 * signs * magnitude / magnitude.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("p", [math.inf, 2.0, 1.0])
def test_one_dimensional_sphere_is_two_points(p):
    """In one dimension every p-sphere of radius r is {-r, r}, however short the raw draw."""
    on = balls.random_on_sphere([40, 1], p, 0.5, tf.constant([8, 9]), tf.float64).numpy()
    np.testing.assert_allclose(np.abs(on), 0.5, rtol=1e-12)


def test_random_in_ball_in_one_dimension_equals_numpy():
    """L2 in one dimension: the direction is the normal draw's sign, short draws included."""
    seed = tf.constant(SEED, tf.int64)
    got = balls.random_in_ball([40, 1], 2.0, 0.25, seed, dtype=tf.float64).numpy()
    want = _np_in_ball(2.0, 0.25, 40, 1, np.arange(40))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)


def test_l1_sign_of_a_uniform_of_exactly_one_half_is_plus():
    """Sign -1 for u < 1/2: exactly half of the 2**24 values. Row 621155's column 57 is u = 0.5."""
    assert mref.uniform(SEED, [621155], 64, stream=1)[0, 57] == 0.5
    seed = tf.constant(SEED, tf.int64)
    got = balls.random_in_ball([1, 64], 1.0, 0.25, seed, tf.float64, tf.constant([621155]))
    want = _np_in_ball(1.0, 0.25, 1, 64, np.array([621155]))
    assert want[0, 57] > 0
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-5, atol=1e-7)
