"""Independent NumPy references for FAB's tests: the projection step and FAB on linear models.

The projection is solved per row in float64 by bisection on the multiplier
of each norm's optimality condition (L-inf: d = clip(s q sign(w)), L2:
d = clip(mu w)), and for L1 by a greedy loop over coordinates, not by the
library's sort-and-cumulative-sum formulas. FAB itself is written per
example from the paper (Croce and Hein 2020, Algorithm 1 and section 3.1)
for any model with a hand-derived input gradient (a linear model, whose
boundary linearisation is exact, or attack_reference.TanhNet).
"""

from __future__ import annotations

import math

import numpy as np


def _bisect(progress, c: float, upper: float, iterations: int = 200) -> float:
    """The smallest s in [0, upper] with progress(s) >= c, progress nondecreasing."""
    lo, hi = 0.0, upper
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if progress(mid) >= c:
            hi = mid
        else:
            lo = mid
    return hi


def project_row(t, w, b, p, low=-np.inf, high=np.inf) -> np.ndarray:
    """The smallest p-norm d with w . (t + d) = b and low <= t + d <= high (one row).

    Where the box cannot reach the hyperplane: the box corner closest to it,
    coordinates with w_i = 0 unmoved.
    """
    t, w = np.asarray(t, np.float64), np.asarray(w, np.float64)
    lo = np.broadcast_to(np.asarray(low, np.float64), t.shape) - t
    hi = np.broadcast_to(np.asarray(high, np.float64), t.shape) - t
    c = float(b - w @ t)
    q = 1.0 if c >= 0 else -1.0
    direction = q * np.sign(w)
    corner = np.where(direction > 0, hi, np.where(direction < 0, lo, 0.0))
    if q * (w @ corner) <= abs(c):
        return corner
    if np.all(np.isinf(lo)) and np.all(np.isinf(hi)) and p != 1:
        # Textbook closed forms without a box: Hoelder's inequality is tight.
        if p == math.inf:
            return abs(c) / np.sum(np.abs(w)) * direction
        return c / (w @ w) * w
    if p == 1:
        d = np.zeros_like(t)
        remaining = abs(c)
        for i in np.argsort(-np.abs(w), kind="stable"):
            if remaining <= 0 or w[i] == 0:
                break
            amount = min(abs(corner[i]), remaining / abs(w[i]))
            d[i] = direction[i] * amount
            remaining -= abs(w[i]) * amount
        return d
    if p == math.inf:

        def move(s):
            return np.clip(s * direction, lo, hi)

    else:

        def move(s):
            return np.clip(s * q * w, lo, hi)

    upper = 1.0
    while q * (w @ move(upper)) < abs(c):
        upper *= 2.0
    return move(_bisect(lambda s: q * (w @ move(s)), abs(c), upper))


def project_rows(t, w, b, p, low=-np.inf, high=np.inf) -> np.ndarray:
    """`project_row` for each row."""
    return np.stack([project_row(t[i], w[i], b[i], p, low, high) for i in range(len(t))])


def _norm(v, p):
    return float(np.linalg.norm(v, ord=p))


def fab_run(
    logits, input_gradient, x, label, target, p, steps=100, low=-np.inf, high=np.inf,
    alpha_max=0.1, eta=1.05, beta=0.9,
):  # fmt: skip
    """FAB-T from x towards `target`, one example: (closest misclassified point, its distance).

    Args:
        logits: x -> scores (classes,).
        input_gradient: (x, d loss / d scores) -> d loss / d x.
        x, label, target: The example, its label and the target class.
        p: 1, 2 or inf.
        steps: Iterations.
        low, high: The box.

    Returns:
        (point, distance); (x, inf) if no iterate was misclassified.
    """
    x0 = np.asarray(x, np.float64)
    point, best, best_point = x0.copy(), math.inf, x0.copy()
    seed = np.zeros(len(logits(x0)))
    seed[target], seed[label] = 1.0, -1.0
    for _ in range(steps):
        f = logits(point) @ seed  # z_t - z_y, linearised: f + g . (x - point) = 0
        g = input_gradient(point, seed)
        offset = g @ point - f
        move_k = project_row(point, g, offset, p, low, high)
        move_0 = project_row(x0, g, offset, p, low, high)
        size_k, size_0 = max(_norm(move_k, p), 1e-8), max(_norm(move_0, p), 1e-8)
        alpha = min(size_k / (size_k + size_0), alpha_max)
        point = (1 - alpha) * (point + eta * move_k) + alpha * (x0 + eta * move_0)
        point = np.clip(point, low, high)
        if np.argmax(logits(point)) != label:
            distance = _norm(point - x0, p)
            if distance < best:
                best, best_point = distance, point.copy()
            point = x0 + beta * (point - x0)
    return best_point, best


def fab_linear(
    weights, bias, x, label, target, p, steps=100, alpha_max=0.1, eta=1.05, beta=0.9
) -> float:
    """The smallest distance FAB-T finds on logits = x W + b, no box, one example."""
    weights, bias = np.asarray(weights, np.float64), np.asarray(bias, np.float64)
    return fab_run(
        lambda v: v @ weights + bias, lambda v, s: weights @ s, x, label, target, p, steps,
        alpha_max=alpha_max, eta=eta, beta=beta,
    )[1]  # fmt: skip


def minimal_distances(weights, bias, x, y, p) -> np.ndarray:
    """Per example and class j the exact distance to the boundary z_y = z_j, (n, classes).

    (z_y - z_j) / ||w_y - w_j||_q with q the dual norm of p; +inf for j = y.
    """
    weights, bias = np.asarray(weights, np.float64), np.asarray(bias, np.float64)
    z = np.asarray(x, np.float64) @ weights + bias
    n, classes = z.shape
    dual = {math.inf: 1, 2: 2, 1: math.inf}[p]
    out = np.full((n, classes), np.inf)
    for i in range(n):
        for j in range(classes):
            if j != y[i]:
                gap = z[i, y[i]] - z[i, j]
                out[i, j] = gap / np.linalg.norm(weights[:, y[i]] - weights[:, j], ord=dual)
    return out
