"""docs/method.md identities of the dual norm and the worst-case perturbation."""

from __future__ import annotations

import math

import linear_reference as ref
import numpy as np
import pytest
import tensorflow as tf

import keras_gradreg as kgr

P_VALUES = [1.0, 1.5, 2.0, 3.0, math.inf]


def p_norm(r: np.ndarray, p: float) -> np.ndarray:
    r = r.reshape(len(r), -1)
    if math.isinf(p):
        return np.abs(r).max(axis=1)
    return (np.abs(r) ** p).sum(axis=1) ** (1 / p)


@pytest.mark.parametrize("p", P_VALUES)
def test_perturbation_identities(p):
    """||r*||_p = sigma and g . r* = sigma * ||g||_q, on rank-4 gradients."""
    g = np.random.default_rng(1).normal(size=(5, 4, 3, 2))
    sigma = 0.7
    r = kgr.worst_case_perturbation(tf.constant(g), p, sigma).numpy()
    assert r.shape == g.shape
    np.testing.assert_allclose(p_norm(r, p), sigma, rtol=1e-9)
    q_norm = kgr.dual_norm(tf.constant(g), p).numpy()
    np.testing.assert_allclose((g * r).reshape(5, -1).sum(axis=1), sigma * q_norm, rtol=1e-9)
    np.testing.assert_allclose(q_norm, ref.dual_norm(g, p), rtol=1e-9)


@pytest.mark.parametrize("p", P_VALUES)
def test_zero_gradient_gives_zero_perturbation_and_finite_gradients(p):
    g = tf.Variable(np.zeros((3, 4), "float32"))
    with tf.GradientTape() as tape:
        norm = tf.reduce_sum(kgr.dual_norm(g, p))
    grad = tape.gradient(norm, g)
    assert float(norm) == 0.0
    assert np.all(np.isfinite(grad.numpy()))
    np.testing.assert_array_equal(kgr.worst_case_perturbation(g, p, 0.5).numpy(), 0.0)


@pytest.mark.parametrize("p", [2.0, 3.0])
def test_norm_does_not_underflow(p):
    """Tiny float32 gradients keep an exact norm (the rows are rescaled first)."""
    g = np.array([[3e-30, 4e-30]], "float32")
    got = kgr.dual_norm(tf.constant(g), p).numpy()
    np.testing.assert_allclose(got, ref.dual_norm(g.astype("float64"), p), rtol=1e-6)


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("p", P_VALUES)
def test_non_finite_rows_give_nan_and_leave_other_rows_exact(p, jit_compile):
    """An overflowed gradient row is not hidden as 0 (in eager and under XLA)."""
    g = np.random.default_rng(3).normal(size=(4, 5)).astype("float32")
    g[1, 2], g[2, 0] = np.nan, np.inf
    g[3] = 0.0
    norm = tf.function(lambda t: kgr.dual_norm(t, p), jit_compile=jit_compile)
    perturb = tf.function(lambda t: kgr.worst_case_perturbation(t, p, 0.5), jit_compile=jit_compile)
    got, r = norm(tf.constant(g)).numpy(), perturb(tf.constant(g)).numpy()
    assert np.isnan(got[1]) and np.isnan(got[2]) and got[3] == 0.0
    np.testing.assert_allclose(got[0], ref.dual_norm(g[:1].astype("float64"), p)[0], rtol=1e-6)
    assert np.isnan(r[1]).all() and np.isnan(r[2]).all() and not np.isnan(r[[0, 3]]).any()


def test_per_example_sigma():
    g = np.random.default_rng(2).normal(size=(3, 5))
    sigma = np.array([0.1, 1.0, 2.0])
    r = kgr.worst_case_perturbation(tf.constant(g), 2, tf.constant(sigma)).numpy()
    np.testing.assert_allclose(p_norm(r, 2), sigma, rtol=1e-12)


def test_dual_exponents():
    assert kgr.dual_exponent(1) == math.inf
    assert kgr.dual_exponent("inf") == 1.0
    assert kgr.dual_exponent(2) == 2.0
    assert kgr.dual_exponent(3) == 1.5


@pytest.mark.parametrize("bad", [0.5, float("nan"), -1, "two", None, True])
def test_bad_p_is_rejected(bad):
    with pytest.raises(ValueError, match=r"Received: p="):
        kgr.dual_norm(tf.zeros((1, 2)), bad)


# ---------------------------------------------------------------------- #
# Cases added to kill mutants (docs/testing.md, "Mutation testing").
# ---------------------------------------------------------------------- #


@pytest.mark.parametrize("p", P_VALUES)
def test_one_example_keeps_its_batch_axis(p):
    """A batch of one gives norms of shape (1,) and r* of g's shape, as NumPy's row norms."""
    g = np.array([[3.0, -4.0, 1.0]])
    norm = kgr.dual_norm(tf.constant(g), p).numpy()
    assert norm.shape == (1,)
    np.testing.assert_allclose(norm, ref.dual_norm(g, p), rtol=1e-12)
    r = kgr.worst_case_perturbation(tf.constant(g), p, 0.5).numpy()
    assert r.shape == (1, 3)
    np.testing.assert_allclose(p_norm(r, p), [0.5], rtol=1e-12)


@pytest.mark.parametrize("p", [1.5, 2.0, 3.0])
@pytest.mark.parametrize("magnitude", [1e-30, 1e30])
def test_perturbation_of_tiny_and_huge_float32_gradients(p, magnitude):
    """r* depends only on g's direction: rows near float32's limits give NumPy's r* exactly."""
    g = np.array([[3.0, -4.0], [1.0, 2.0]], "float32") * np.float32(magnitude)
    r = kgr.worst_case_perturbation(tf.constant(g), p, 0.5).numpy()
    unit = np.array([[3.0, -4.0], [1.0, 2.0]])
    np.testing.assert_allclose(r, 0.5 * ref.direction(unit, p), rtol=1e-5)


def test_per_example_sigma_of_another_dtype_and_in_a_graph():
    """A float64 sigma tensor with float32 gradients, eagerly and traced: ||r*||_2 = sigma."""
    g = np.random.default_rng(5).normal(size=(3, 5)).astype("float32")
    sigma = tf.constant([0.1, 1.0, 2.0], tf.float64)
    r = kgr.worst_case_perturbation(tf.constant(g), 2, sigma)
    assert r.dtype == tf.float32
    np.testing.assert_allclose(p_norm(r.numpy(), 2), sigma.numpy(), rtol=1e-6)
    traced = tf.function(lambda t, s: kgr.worst_case_perturbation(t, 2, s))
    np.testing.assert_allclose(p_norm(traced(g, sigma).numpy(), 2), sigma.numpy(), rtol=1e-6)
