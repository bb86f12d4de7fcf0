"""Geometry of p-balls: exact projections and random points (per example).

Axis 0 is the batch everywhere. The L1 projection is the exact sort-based
algorithm of Duchi et al. (2008). Random draws are stateless, from a seed of
shape (2,); points in the ball come from an integer hash (`keras_gradreg._hashing`),
so they are the same eagerly, in graphs and under XLA.
"""

from __future__ import annotations

import math

import tensorflow as tf

from keras_gradreg import _hashing as hashing
from keras_gradreg.norms import PValue, canonical_p

BALL_NORMS = (1.0, 2.0, math.inf)
# One fixed generator ("auto_select" may differ between devices). XLA's Philox
# stream still differs from the graph kernel's: a seed reproduces per mode.
ALG = "philox"


def ball_norm(p: PValue) -> float:
    """Validates p for the balls with an exact projection: 1, 2 or inf."""
    value = canonical_p(p)
    if value not in BALL_NORMS:
        raise ValueError(
            f"`p` must be 1, 2 or inf (the norms with an exact projection). Received: p={p!r}"
        )
    return value


# ---------------------------------------------------------------------- #


def _radius_like(radius, flat: tf.Tensor) -> tf.Tensor:
    """`radius` as a (batch, 1) column in the dtype of `flat`."""
    radius = tf.cast(radius, flat.dtype)
    if radius.shape.rank == 0:
        return tf.fill([tf.shape(flat)[0], 1], radius)
    return tf.reshape(radius, [-1, 1])


def _flat(delta: tf.Tensor) -> tf.Tensor:
    return tf.reshape(delta, [tf.shape(delta)[0], -1])


def project_linf(delta: tf.Tensor, radius) -> tf.Tensor:
    """Projects each example of `delta` onto the L-inf ball of `radius`.

    Args:
        delta: Perturbations, batch on axis 0.
        radius: A scalar or one radius per example, shape (batch,).

    Returns:
        The Euclidean projection, shaped like `delta`.
    """
    delta = tf.convert_to_tensor(delta)
    flat = _flat(delta)
    r = _radius_like(radius, flat)
    return tf.reshape(tf.clip_by_value(flat, -r, r), tf.shape(delta))


def project_l2(delta: tf.Tensor, radius) -> tf.Tensor:
    """Projects each example of `delta` onto the L2 ball of `radius`."""
    delta = tf.convert_to_tensor(delta)
    flat = _flat(delta)
    r = _radius_like(radius, flat)
    norm = tf.norm(flat, axis=1, keepdims=True)
    factor = tf.where(norm > r, r / tf.where(norm > 0, norm, tf.ones_like(norm)), 1.0)
    return tf.reshape(flat * factor, tf.shape(delta))


def project_l1(delta: tf.Tensor, radius) -> tf.Tensor:
    """Projects each example of `delta` onto the L1 ball of `radius`.

    The exact sort-based algorithm of Duchi et al. (2008): soft-threshold by
    the theta that brings the L1 norm down to the radius; rows already inside
    the ball are returned unchanged.
    """
    delta = tf.convert_to_tensor(delta)
    flat = _flat(delta)
    r = _radius_like(radius, flat)
    magnitude = tf.abs(flat)
    inside = tf.reduce_sum(magnitude, axis=1, keepdims=True) <= r
    ordered = tf.sort(magnitude, axis=1, direction="DESCENDING")
    cumulative = tf.cumsum(ordered, axis=1)
    index = tf.cast(tf.range(1, tf.shape(flat)[1] + 1), flat.dtype)[None, :]
    support = ordered * index > cumulative - r
    count = tf.reduce_sum(tf.cast(support, tf.int32), axis=1, keepdims=True)
    count = tf.maximum(count, 1)
    total = tf.gather(cumulative, count - 1, batch_dims=1)
    theta = (total - r) / tf.cast(count, flat.dtype)
    shrunk = tf.sign(flat) * tf.nn.relu(magnitude - theta)
    return tf.reshape(tf.where(inside, flat, shrunk), tf.shape(delta))


def project_ball(delta: tf.Tensor, p: PValue, radius) -> tf.Tensor:
    """Projects each example of `delta` onto the p-ball, p in {1, 2, inf}."""
    p = ball_norm(p)
    if math.isinf(p):
        return project_linf(delta, radius)
    return project_l2(delta, radius) if p == 2.0 else project_l1(delta, radius)


def random_in_ball(shape, p: PValue, radius, seed, dtype=tf.float32, positions=None) -> tf.Tensor:
    """Points drawn uniformly from the p-ball of `radius`, the same in every mode.

    The numbers come from `keras_gradreg._hashing`, keyed by each row's
    position: eager, graph and XLA calls give the same points, and a row's
    point does not depend on the rest of the batch.

    Args:
        shape: Shape of the batch of points (batch on axis 0).
        p: 1, 2 or inf.
        radius: Scalar radius.
        seed: Two integers.
        dtype: Floating dtype of the result.
        positions: Each row's key, shape (batch,); None: 0, 1, ..., batch - 1.
    """
    p = ball_norm(p)
    shape = tf.convert_to_tensor(shape)
    size = tf.reduce_prod(shape[1:])
    if positions is None:
        positions = tf.range(shape[0])
    radius = tf.cast(radius, tf.float32)
    if math.isinf(p):
        flat = radius * (2.0 * hashing.uniform(seed, positions, size) - 1.0)
    elif p == 2.0:
        direction = hashing.normal(seed, positions, size)
        direction /= tf.maximum(tf.norm(direction, axis=1, keepdims=True), 1e-12)
        u = hashing.uniform(seed, positions, 1, stream=2)
        flat = radius * tf.pow(u, 1.0 / tf.cast(size, tf.float32)) * direction
    else:
        # Uniform on the L1 ball: d + 1 exponentials normalised, the last dropped.
        exponential = -tf.math.log(1.0 - hashing.uniform(seed, positions, size + 1))
        point = exponential[:, :-1] / tf.reduce_sum(exponential, axis=1, keepdims=True)
        signs = tf.where(hashing.uniform(seed, positions, size, stream=1) < 0.5, -1.0, 1.0)
        flat = radius * signs * point
    return tf.cast(tf.reshape(flat, shape), dtype)


def random_on_sphere(shape, p: PValue, radius, seed, dtype=tf.float32) -> tf.Tensor:
    """Random points of p-norm exactly `radius` (stateless).

    For p = inf every coordinate is +-radius (a random corner of the cube);
    for p = 2 the direction is uniform; for p = 1 the magnitudes are
    exponential, normalised.
    """
    p = ball_norm(p)
    shape = tf.convert_to_tensor(shape)
    flat_shape = tf.stack([shape[0], tf.reduce_prod(shape[1:])])
    radius = tf.cast(radius, dtype)
    seeds = tf.random.experimental.stateless_split(seed, 2, alg=ALG)
    signs = random_signs(flat_shape, seeds[0], dtype)
    if math.isinf(p):
        return tf.reshape(radius * signs, shape)
    if p == 2.0:
        direction = tf.random.stateless_normal(flat_shape, seeds[1], dtype=dtype, alg=ALG)
        norm = tf.norm(direction, axis=1, keepdims=True)
    else:
        u = tf.random.stateless_uniform(flat_shape, seeds[1], 1e-12, 1.0, dtype=dtype, alg=ALG)
        direction = -tf.math.log(u) * signs
        norm = tf.reduce_sum(tf.abs(direction), axis=1, keepdims=True)
    return tf.reshape(radius * direction / tf.maximum(norm, 1e-12), shape)


def random_signs(shape, seed, dtype=tf.float32) -> tf.Tensor:
    """Independent +-1 entries (stateless)."""
    bits = tf.random.stateless_uniform(shape, seed, 0, 2, dtype=tf.int32, alg=ALG)
    return tf.cast(2 * bits - 1, dtype)
