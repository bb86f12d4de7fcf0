"""The family's math: dual norms and closed-form worst-case perturbations.

For a perturbation ball of radius sigma in the p-norm, the linearised loss
rises by at most sigma * ||g||_q with 1/p + 1/q = 1, and r* attains it
(docs/method.md, section 1). Every function here works per example: axis 0 is the
batch and the norm runs over all remaining axes.
"""

from __future__ import annotations

import math

import tensorflow as tf

from keras_gradreg._checks import is_number

PValue = float | int | str


def canonical_p(p: PValue, name: str = "p") -> float:
    """Validates a norm exponent and returns it as a float (math.inf for inf).

    Args:
        p: A number >= 1, `math.inf`, or the string `"inf"`.
        name: The argument name used in error messages.

    Returns:
        `p` as a Python float.

    Raises:
        ValueError: If `p` is not a number >= 1 or infinity.
    """
    if isinstance(p, str):
        if p.strip().lower() in ("inf", "infinity"):
            return math.inf
        try:
            value = float(p)
        except ValueError:
            raise ValueError(
                f"`{name}` must be a number >= 1 or 'inf'. Received: {name}={p!r}"
            ) from None
    elif not is_number(p):
        raise ValueError(f"`{name}` must be a number >= 1 or 'inf'. Received: {name}={p!r}")
    else:
        value = float(p)
    if math.isnan(value) or value < 1.0:
        raise ValueError(f"`{name}` must be a number >= 1 or 'inf'. Received: {name}={p!r}")
    return value


def dual_exponent(p: PValue) -> float:
    """Returns q with 1/p + 1/q = 1 (q = inf for p = 1, q = 1 for p = inf)."""
    p = canonical_p(p)
    if p == 1.0:
        return math.inf
    if math.isinf(p):
        return 1.0
    return p / (p - 1.0)


def _flatten(g: tf.Tensor) -> tf.Tensor:
    g = tf.convert_to_tensor(g)
    return tf.reshape(g, [tf.shape(g)[0], -1])


def _abs_max(flat: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-example max |g| (no gradient) and a copy safe to divide by."""
    largest = tf.stop_gradient(tf.reduce_max(tf.abs(flat), axis=1, keepdims=True))
    nonzero = largest > 0
    return nonzero, tf.where(nonzero, largest, tf.ones_like(largest))


def _nan_where_not_finite(values: tf.Tensor, flat: tf.Tensor) -> tf.Tensor:
    """NaN in the rows of `values` whose row of `flat` holds an inf or a NaN.

    Keeps an overflowed gradient visible (a loss-scale optimizer then skips
    the step): the safe-at-zero arithmetic would otherwise turn NaN rows into
    0, and XLA's max does not propagate NaN.
    """
    finite = tf.reduce_all(tf.math.is_finite(flat), axis=1)
    finite = tf.reshape(finite, [-1] + [1] * (values.shape.rank - 1))
    return tf.where(finite, values, tf.constant(math.nan, values.dtype))


def _lp_norm(flat: tf.Tensor, q: float) -> tf.Tensor:
    """||flat||_q per row for 1 < q < inf, safe at zero and against underflow.

    The rows are divided by their largest magnitude first (the norm is
    positively homogeneous, so this is exact) and the root is only taken of
    strictly positive sums, which keeps the gradient finite (zero) at g = 0.
    """
    nonzero, scale = _abs_max(flat)
    scaled = flat / scale
    if q == 2.0:
        total = tf.reduce_sum(tf.square(scaled), axis=1, keepdims=True)
    else:
        total = tf.reduce_sum(tf.pow(tf.abs(scaled), q), axis=1, keepdims=True)
    safe_total = tf.where(nonzero, total, tf.ones_like(total))
    root = tf.sqrt(safe_total) if q == 2.0 else tf.pow(safe_total, 1.0 / q)
    return tf.squeeze(tf.where(nonzero, root * scale, tf.zeros_like(root)), axis=1)


def dual_norm(g: tf.Tensor, p: PValue) -> tf.Tensor:
    """Per-example dual norm ||g||_q of a batch of gradients.

    Args:
        g: Gradients with the batch on axis 0, any rank >= 1.
        p: The perturbation norm; the dual exponent q = p / (p - 1) is used.

    Returns:
        A tensor of shape `(batch,)` in the dtype of `g`. Its gradient is
        finite wherever g is, including at g = 0; a row of g holding an inf
        or a NaN gives NaN.
    """
    q = dual_exponent(p)
    flat = _flatten(g)
    if math.isinf(q):
        norm = tf.reduce_max(tf.abs(flat), axis=1)
    elif q == 1.0:
        norm = tf.reduce_sum(tf.abs(flat), axis=1)
    else:
        norm = _lp_norm(flat, q)
    return _nan_where_not_finite(norm, flat)


def worst_case_perturbation(g: tf.Tensor, p: PValue, sigma) -> tf.Tensor:
    """Closed-form maximiser r* of g . r over the ball ||r||_p <= sigma.

    Args:
        g: Gradients with the batch on axis 0.
        p: The perturbation norm (>= 1 or inf).
        sigma: The radius: a scalar, or one value per example (shape `(batch,)`).

    Returns:
        r* with the shape and dtype of `g`: ||r*||_p = sigma and
        g . r* = sigma * ||g||_q per example, and r* = 0 where g = 0; NaN
        in the rows of g that hold an inf or a NaN.
    """
    p = canonical_p(p)
    g = tf.convert_to_tensor(g)
    flat = _flatten(g)
    if math.isinf(p):
        direction = tf.sign(flat)
    elif p == 1.0:
        index = tf.argmax(tf.abs(flat), axis=1, output_type=tf.int32)
        mask = tf.one_hot(index, tf.shape(flat)[1], dtype=flat.dtype)
        direction = tf.sign(flat) * mask
    else:
        q = p / (p - 1.0)
        nonzero, scale = _abs_max(flat)
        scaled = flat / scale
        norm = _lp_norm(scaled, q)[:, None]
        safe_norm = tf.where(nonzero, norm, tf.ones_like(norm))
        if q == 2.0:
            direction = scaled / safe_norm
        else:
            direction = tf.sign(scaled) * tf.pow(tf.abs(scaled) / safe_norm, q - 1.0)
        direction = tf.where(nonzero, direction, tf.zeros_like(direction))
    direction = _nan_where_not_finite(direction, flat)
    sigma = tf.cast(sigma, g.dtype) if tf.is_tensor(sigma) else tf.constant(sigma, g.dtype)
    if sigma.shape.rank == 1:
        sigma = tf.reshape(sigma, [-1] + [1] * (g.shape.rank - 1))
    return sigma * tf.reshape(direction, tf.shape(g))
