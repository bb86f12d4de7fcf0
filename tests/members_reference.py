"""NumPy references for the multi-step members on a linear softmax model (float64).

The random starts come from `keras_gradreg.hashing`, reproduced here with
Python integers; the ascent and the parameter gradients are closed forms of
the linear softmax model (tests/linear_reference.py).
"""

from __future__ import annotations

import math

import linear_reference as ref
import numpy as np

# np.uint64 constants throughout: NumPy 1.x refuses uint64 & a Python int.
MASK = np.uint64(0xFFFFFFFF)
GOLDEN = 0x9E3779B9
COLUMN = 0x85EBCA77


def _u64(value) -> np.ndarray:
    return np.asarray(value, dtype=np.uint64)


def _mix(h: np.ndarray) -> np.ndarray:
    h = _u64(h) & MASK
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x85EBCA6B)) & MASK
    h ^= h >> np.uint64(13)
    h = (h * np.uint64(0xC2B2AE35)) & MASK
    return h ^ (h >> np.uint64(16))


def uniform(seed, positions, columns: int, stream: int = 0) -> np.ndarray:
    """`hashing.uniform` in NumPy: (rows, columns) in [0, 1), exactly."""
    s0, s1 = (_u64(int(v) & 0xFFFFFFFF) for v in seed)
    base = _mix(s0 ^ _mix((s1 + np.uint64(GOLDEN)) & MASK))
    base = (base + _u64((stream * GOLDEN) & 0xFFFFFFFF)) & MASK
    rows = _mix((_u64(positions) * np.uint64(GOLDEN) + base) & MASK)
    column = (np.arange(columns, dtype=np.uint64) * np.uint64(COLUMN)) & MASK
    keys = _mix((rows[:, None] + column[None, :]) & MASK)
    return (keys >> np.uint64(8)).astype(np.float64) * 2.0**-24


def normal(seed, positions, columns: int) -> np.ndarray:
    u = 1.0 - uniform(seed, positions, columns, 0)
    v = uniform(seed, positions, columns, 1)
    return np.sqrt(-2.0 * np.log(u)) * np.cos(2.0 * math.pi * v)


def ascent_step(x, x_adv, gradient, p, step_length, radius, clip):
    """One projected steepest-ascent step (p = 2 or inf), per example."""
    if clip is not None and not math.isinf(p):
        low, high = clip
        blocked = ((x_adv >= high) & (gradient > 0)) | ((x_adv <= low) & (gradient < 0))
        gradient = np.where(blocked, 0.0, gradient)
    if math.isinf(p):
        x_adv = x_adv + step_length * np.sign(gradient)
        delta = np.clip(x_adv - x, -radius, radius)
    else:
        norm = np.linalg.norm(gradient, axis=1, keepdims=True)
        x_adv = x_adv + step_length * gradient / np.where(norm > 0, norm, 1.0)
        delta = x_adv - x
        length = np.linalg.norm(delta, axis=1, keepdims=True)
        delta = delta * np.where(length > radius, radius / np.maximum(length, 1e-300), 1.0)
    x_adv = x + delta
    return x_adv if clip is None else np.clip(x_adv, *clip)


def adversarial_point(x, y, w, b, *, p, sigma, steps, step_size, random_start, clip, seed):
    """The last iterate of the "adversarial" ascent (positions 0..n-1)."""
    x_adv = x
    if random_start:
        assert math.isinf(p), "the reference draws L-inf starts only"
        x_adv = x + sigma * (2.0 * uniform(seed, np.arange(len(x)), x.shape[1]) - 1.0)
        x_adv = x_adv if clip is None else np.clip(x_adv, *clip)
    for _ in range(steps):
        gradient = ref.input_gradients(x_adv, y, w, b)
        x_adv = ascent_step(x, x_adv, gradient, p, step_size * sigma, sigma, clip)
    return x_adv


def adversarial_step(x, y, w, b, *, clean_weight, lr, weights=None, **ascent):
    """One SGD step of multi-step "adversarial": (new_w, new_b, logs)."""
    x_adv = adversarial_point(x, y, w, b, **ascent)
    data_loss = ref.mean(ref.per_example_loss(x, y, w, b), weights)
    moved = ref.mean(ref.per_example_loss(x_adv, y, w, b), weights)
    gw, gb = ref.loss_gradients(x, y, w, b, weights)
    aw, ab = ref.loss_gradients(x_adv, y, w, b, weights)
    grad_w = clean_weight * gw + (1 - clean_weight) * aw
    grad_b = clean_weight * gb + (1 - clean_weight) * ab
    loss = clean_weight * data_loss + (1 - clean_weight) * moved
    logs = {"loss": loss, "data_loss": data_loss, "penalty": moved}
    return w - lr * grad_w, b - lr * grad_b, logs


def trades_point(x, w, b, *, p, sigma, steps, step_size, clip, seed, positions=None):
    """TRADES's last iterate: ascent on KL(f(x) || f(x')) from x + 0.001 N(0, 1)."""
    x_adv, _ = trades_ascent(x, w, b, p=p, sigma=sigma, steps=steps, step_size=step_size,
                             clip=clip, seed=seed, positions=positions)
    return x_adv


def trades_ascent(x, w, b, *, p, sigma, steps, step_size, clip, seed, positions=None):
    """TRADES's last iterate and the ascent's conditioning.

    The conditioning is the smallest |gradient coordinate| / the row's largest
    over the sign steps (p = inf): float32 decides a sign only where it is
    well above float32's relative error of the KL's gradient near x (about
    1e-4: q' - p is a difference of nearly equal softmax outputs).
    """
    positions = np.arange(len(x)) if positions is None else positions
    clean = ref.softmax(x @ w + b)
    x_adv = x + 0.001 * normal(seed, positions, x.shape[1])
    conditioning = np.inf
    for _ in range(steps):
        gradient = (ref.softmax(x_adv @ w + b) - clean) @ w.T  # d KL / d x'
        ratio = np.abs(gradient) / np.abs(gradient).max(axis=1, keepdims=True)
        conditioning = min(conditioning, float(ratio.min()))
        x_adv = ascent_step(x, x_adv, gradient, p, step_size * sigma, sigma, clip)
    return x_adv, conditioning


def trades_term(x, x_adv, w, b, beta, weights=None):
    """beta * mean_i weights_i KL_i and its gradients with respect to (w, b)."""
    n = len(x)
    weights = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    log_p = np.log(ref.softmax(x @ w + b))
    log_q = np.log(ref.softmax(x_adv @ w + b))
    p, q = np.exp(log_p), np.exp(log_q)
    kl = (p * (log_p - log_q)).sum(axis=1)
    d_clean = p * ((log_p - log_q) - kl[:, None]) * weights[:, None]
    d_moved = (q - p) * weights[:, None]
    grad_w = beta * (x.T @ d_clean + x_adv.T @ d_moved) / n
    grad_b = beta * (d_clean.sum(axis=0) + d_moved.sum(axis=0)) / n
    return beta * float((weights * kl).sum() / n), grad_w, grad_b


def trades_step(x, y, w, b, *, beta, lr, weights=None, scale=1, rows=None, **ascent):
    """One SGD step of L(x) + scale * beta KL on `rows` (all if None): (new_w, new_b, logs)."""
    rows = np.arange(len(x)) if rows is None else np.asarray(rows)
    sub_weights = None if weights is None else np.asarray(weights)[rows]
    x_adv, conditioning = trades_ascent(x[rows], w, b, positions=rows, **ascent)
    penalty, tw, tb = trades_term(x[rows], x_adv, w, b, beta, sub_weights)
    data_loss = ref.mean(ref.per_example_loss(x, y, w, b), weights)
    gw, gb = ref.loss_gradients(x, y, w, b, weights)
    grad_w, grad_b = gw + scale * tw, gb + scale * tb
    logs = {"loss": data_loss + penalty, "data_loss": data_loss, "penalty": penalty}
    if p_is_inf(ascent["p"]):
        logs["conditioning"] = conditioning
    return w - lr * grad_w, b - lr * grad_b, logs


def p_is_inf(p) -> bool:
    return math.isinf(float(p))
