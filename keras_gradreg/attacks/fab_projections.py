"""FAB's projection step: the smallest move onto a hyperplane inside a box.

Given points t (rows of shape (n, d)), hyperplanes w . x = b and a box
[low, high], `project_hyperplane` returns per row the d of smallest p-norm
(p = 1, 2 or inf) with

    w . (t + d) = b    and    low <= t + d <= high,

or, when the box does not reach the hyperplane, the move to the corner of
the box closest to it (the box point maximising the progress w . d towards
the hyperplane, moving no coordinate whose weight is 0). The rows of t are
assumed to lie in the box.

All three norms reduce to one problem once the sign of w is flipped so that
c = b - w . t >= 0: each coordinate moves by at most its room u_i in the
direction sign(w_i) (u_i = high_i - t_i or t_i - low_i; +inf without a box).

- L-inf: d_i = sign(w_i) min(lam, u_i), with the smallest lam such that
  sum_i |w_i| min(lam, u_i) = c.
- L2: d_i = sign(w_i) min(lam |w_i|, u_i) (the KKT point), with
  sum_i w_i^2 min(lam, u_i / |w_i|) = c.
- L1: a fractional knapsack: fill the coordinates with the largest |w_i|
  first, each up to its room, until w . d = c.

The first two are a level search on a concave piecewise-linear function,
solved exactly by Newton's method (`_level`); the third sorts the weights.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

# Newton steps of the level search at most (it needs far fewer: `_level`).
_NEWTON_STEPS = 64


def _inf_like(x: tf.Tensor) -> tf.Tensor:
    return tf.fill(tf.shape(x), tf.constant(math.inf, x.dtype))


def _level(weight: tf.Tensor, breaks: tf.Tensor, target: tf.Tensor) -> tf.Tensor:
    """Per row the smallest lam >= 0 with g(lam) = sum_i weight_i min(lam, breaks_i) = target.

    g is concave, nondecreasing and piecewise linear, so Newton's method from
    lam = 0 never overshoots and passes at least one break point per step
    until it lands exactly on the root (the steps grow the segment it ends
    in quadratically, so it needs few: no sort, one pass over the row each).
    It stops where g is within a few rounding errors of the target, or
    after `_NEWTON_STEPS` steps.

    Args:
        weight: Nonnegative weights (n, d).
        breaks: Nonnegative break points (n, d), +inf allowed.
        target: Nonnegative right-hand sides (n,).

    Returns:
        lam (n,); +inf where even lam = +inf falls short of the target.
    """
    tolerance = 64.0 * np.finfo(target.dtype.as_numpy_dtype).eps * target

    def value_and_slope(lam):
        saturated = breaks <= lam[:, None]
        value = tf.reduce_sum(tf.where(saturated, weight * breaks, weight * lam[:, None]), axis=1)
        slope = tf.reduce_sum(tf.where(saturated, tf.zeros_like(weight), weight), axis=1)
        return value, slope

    def unfinished(value, slope):
        return (target - value > tolerance) & (slope > 0)

    def body(k, lam, value, slope):
        step = (target - value) / tf.where(slope > 0, slope, tf.ones_like(slope))
        lam = tf.where(unfinished(value, slope), lam + step, lam)
        return (k + 1, lam, *value_and_slope(lam))

    def cond(k, lam, value, slope):
        return (k < _NEWTON_STEPS) & tf.reduce_any(unfinished(value, slope))

    lam = tf.zeros_like(target)
    start = (tf.constant(0), lam, *value_and_slope(lam))
    _, lam, value, slope = tf.while_loop(cond, body, start)
    short = (target - value > tolerance) & (slope <= 0)
    return tf.where(short, _inf_like(lam), lam)


def _knapsack(weight: tf.Tensor, room: tf.Tensor, target: tf.Tensor) -> tf.Tensor:
    """Per row the amounts 0 <= m_i <= room_i of least sum with sum_i weight_i m_i = target.

    Largest weights first; all of the room where the target is out of reach.
    """
    order = tf.argsort(weight, axis=1, direction="DESCENDING", stable=True)
    a = tf.gather(weight, order, batch_dims=1)
    u = tf.gather(room, order, batch_dims=1)
    value = tf.where(a > 0, a * u, tf.zeros_like(a))
    before = tf.cumsum(value, axis=1, exclusive=True)
    # Full up to the first coordinate whose room reaches the target, partial there.
    partial = tf.where(a > 0, (target[:, None] - before) / tf.where(a > 0, a, 1.0), 0.0 * a)
    amount = tf.clip_by_value(partial, 0.0, u)
    amount = tf.where(before >= target[:, None], tf.zeros_like(amount), amount)
    amount = tf.where(a > 0, amount, tf.zeros_like(amount))
    inverse = tf.argsort(order, axis=1)
    return tf.gather(amount, inverse, batch_dims=1)


def project_hyperplane(
    t: tf.Tensor,
    w: tf.Tensor,
    b: tf.Tensor,
    p: float,
    low: tf.Tensor | None = None,
    high: tf.Tensor | None = None,
) -> tf.Tensor:
    """The smallest move d (module docstring) of rows t onto w . x = b within the box.

    Args:
        t: Points (n, d), inside the box.
        w: Hyperplane normals (n, d).
        b: Offsets (n,).
        p: 1, 2 or `math.inf`.
        low: Lower bounds broadcastable to (n, d), or None for no box.
        high: Upper bounds, or None (both or neither).

    Returns:
        d (n, d) in the dtype of t.
    """
    c = b - tf.reduce_sum(w * t, axis=1)
    flip = tf.where(c >= 0, tf.ones_like(c), -tf.ones_like(c))
    w = w * flip[:, None]
    c = c * flip
    direction = tf.sign(w)
    a = tf.abs(w)
    if low is None:
        room = _inf_like(t)
    else:
        room = tf.where(w > 0, high - t, t - low)
        room = tf.maximum(room, 0.0)
    room = tf.where(a > 0, room, tf.zeros_like(room))
    if p == 1:
        return direction * _knapsack(a, room, c)
    if p == math.inf:
        lam = _level(a, tf.where(a > 0, room, _inf_like(room)), c)
        return direction * tf.minimum(lam[:, None], room)
    breaks = tf.where(a > 0, room / tf.where(a > 0, a, 1.0), _inf_like(room))
    lam = _level(tf.square(a), breaks, c)
    step = tf.where(a > 0, a * tf.minimum(lam[:, None], breaks), tf.zeros_like(a))
    return direction * step
