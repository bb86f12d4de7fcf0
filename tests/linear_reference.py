"""NumPy reference for a linear softmax model, logits = x W + b.

The per-example input gradient of the cross-entropy is (softmax - onehot) W^T
and everything the regulariser computes has a closed form on top of it.
"""

from __future__ import annotations

import math

import numpy as np


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def per_example_loss(x, y, w, b) -> np.ndarray:
    s = softmax(x @ w + b)
    return -np.log(s[np.arange(len(y)), y])


def errors(x, y, w, b) -> np.ndarray:
    """softmax - onehot, shape (n, k): d loss_i / d logits_i."""
    s = softmax(x @ w + b)
    s[np.arange(len(y)), y] -= 1.0
    return s


def input_gradients(x, y, w, b) -> np.ndarray:
    return errors(x, y, w, b) @ w.T


def dual_norm(g: np.ndarray, p: float) -> np.ndarray:
    g = g.reshape(len(g), -1)
    if p == 1:
        return np.abs(g).max(axis=1)
    if math.isinf(p):
        return np.abs(g).sum(axis=1)
    q = p / (p - 1)
    return (np.abs(g) ** q).sum(axis=1) ** (1 / q)


def direction(g: np.ndarray, p: float) -> np.ndarray:
    """Unit-p-norm maximiser d of g . d (r* / sigma), also d||g||_q / dg."""
    if math.isinf(p):
        return np.sign(g)
    if p == 1:
        d = np.zeros_like(g)
        j = np.abs(g).argmax(axis=1)
        d[np.arange(len(g)), j] = np.sign(g[np.arange(len(g)), j])
        return d
    q = p / (p - 1)
    norm = dual_norm(g, p)[:, None]
    return np.sign(g) * (np.abs(g) / norm) ** (q - 1)


def loss_gradients(x, y, w, b, weights=None):
    """Gradients of mean_i weights_i * loss_i with respect to (w, b)."""
    n = len(y)
    weights = np.ones(n) if weights is None else weights
    e = errors(x, y, w, b) * weights[:, None]
    return x.T @ e / n, e.sum(axis=0) / n


def penalty_gradients(x, y, w, b, p, weights=None):
    """Gradients of mean_i weights_i * ||g_i||_q with respect to (w, b)."""
    n = len(y)
    weights = np.ones(n) if weights is None else weights
    s = softmax(x @ w + b)
    e = errors(x, y, w, b)
    u = direction(e @ w.T, p)  # d ||g_i||_q / d g_i
    grad_w = np.zeros_like(w)
    grad_b = np.zeros_like(b)
    for i in range(n):
        jacobian = np.diag(s[i]) - np.outer(s[i], s[i])
        v = jacobian @ (w.T @ u[i])
        grad_w += weights[i] * (np.outer(u[i], e[i]) + np.outer(x[i], v))
        grad_b += weights[i] * v
    return grad_w / n, grad_b / n


def mean(values, weights=None):
    weights = np.ones(len(values)) if weights is None else weights
    return float((weights * values).sum() / len(values))


def one_step(x, y, w, b, *, p, sigma, method, clean_weight=0.0, fd_step=0.01, lr=0.1, weights=None):
    """One SGD step on the full batch. Returns (new_w, new_b, logs)."""
    g = input_gradients(x, y, w, b)
    d = direction(g, p)
    data_loss = mean(per_example_loss(x, y, w, b), weights)
    gw, gb = loss_gradients(x, y, w, b, weights)
    if method == "penalty":
        penalty = sigma * mean(dual_norm(g, p), weights)
        pw, pb = penalty_gradients(x, y, w, b, p, weights)
        grad_w, grad_b = gw + sigma * pw, gb + sigma * pb
        total = data_loss + penalty
    elif method == "adversarial":
        x_adv = x + sigma * d
        penalty = mean(per_example_loss(x_adv, y, w, b), weights)
        aw, ab = loss_gradients(x_adv, y, w, b, weights)
        grad_w = clean_weight * gw + (1 - clean_weight) * aw
        grad_b = clean_weight * gb + (1 - clean_weight) * ab
        total = clean_weight * data_loss + (1 - clean_weight) * penalty
    elif method == "finite_difference":
        # (sigma / h) mean_i |w_i (l_i(x + h d) - l_i(x))|: each difference weighted by its sign.
        x_h = x + fd_step * d
        weights_or_ones = np.ones(len(y)) if weights is None else np.asarray(weights)
        parts = weights_or_ones * (per_example_loss(x_h, y, w, b) - per_example_loss(x, y, w, b))
        penalty = sigma * mean(np.abs(parts)) / fd_step
        signed = weights_or_ones * np.sign(parts)
        hw, hb = loss_gradients(x_h, y, w, b, signed)
        cw, cb = loss_gradients(x, y, w, b, signed)
        grad_w = gw + sigma * (hw - cw) / fd_step
        grad_b = gb + sigma * (hb - cb) / fd_step
        total = data_loss + penalty
    else:
        raise ValueError(method)
    logs = {"loss": total, "data_loss": data_loss, "penalty": penalty}
    return w - lr * grad_w, b - lr * grad_b, logs


def objective_gradients(x, y, w, b, weights=None, **settings):
    """Gradients of the whole objective L + T with respect to (w, b), and its logs."""
    new_w, new_b, logs = one_step(x, y, w, b, lr=1.0, weights=weights, **settings)
    return w - new_w, b - new_b, logs


def scaled_term_gradients(x, y, w, b, *, scale, weights=None, term_rows=None, **settings):
    """Gradients of L(x) + scale * T, T on the rows `term_rows` (all if None).

    T = objective - L, each reduced by the mean over its own rows with the
    rows' weights (what Keras's default reduction does on a subset).
    Returns (grad_w, grad_b, logs) with the term's logs (`penalty`) and the
    whole batch's `data_loss`.
    """
    rows = np.arange(len(y)) if term_rows is None else np.asarray(term_rows)
    weights = np.ones(len(y)) if weights is None else np.asarray(weights, np.float64)
    gw, gb = loss_gradients(x, y, w, b, weights)
    sub = (x[rows], y[rows], w, b)
    ow, ob, logs = objective_gradients(*sub, weights=weights[rows], **settings)
    lw, lb = loss_gradients(*sub, weights[rows])
    logs = {**logs, "data_loss": mean(per_example_loss(x, y, w, b), weights)}
    return gw + scale * (ow - lw), gb + scale * (ob - lb), logs


# The subset hash of keras_gradreg/_subsets.py, in NumPy: an independent check of its rows.
_MASK = 0xFFFFFFFF


def _mix(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK
    return h ^ (h >> 16)


def subset_rows(seed, batch_size: int, fraction: float) -> np.ndarray:
    """Rows ceil(fraction * batch_size) with the largest hash keys, ascending."""
    s0, s1 = (int(v) & _MASK for v in seed)
    base = _mix(s0 ^ _mix((s1 + 0x9E3779B9) & _MASK))
    keys = [_mix((i * 0x9E3779B9 + base) & _MASK) >> 8 for i in range(batch_size)]
    m = max(1, math.ceil(fraction * batch_size - 1e-6))
    order = sorted(range(batch_size), key=lambda i: (-keys[i], i))
    return np.sort(order[:m])
