"""NumPy float64 reference for a one-hidden-layer tanh MLP, z = tanh(x W1 + b1) W2 + b2.

Written from the definitions, independently of the library: the forward
pass and the backward pass (per-example input gradients and the loss's
parameter gradients) by hand, the dual norms and r* from docs/method.md's
table, and the gradient of the penalty with respect to the parameters by
central differences of its value.
"""

from __future__ import annotations

import math

import numpy as np

PARAMETERS = ("w1", "b1", "w2", "b2")


def init(inputs: int, hidden: int, classes: int, seed: int) -> dict[str, np.ndarray]:
    """Random parameters, float64."""
    rng = np.random.default_rng(seed)
    return {
        "w1": rng.normal(scale=0.8, size=(inputs, hidden)),
        "b1": rng.normal(scale=0.2, size=hidden),
        "w2": rng.normal(scale=0.8, size=(hidden, classes)),
        "b2": rng.normal(scale=0.2, size=classes),
    }


def forward(params, x):
    """(hidden activations h, logits z)."""
    h = np.tanh(x @ params["w1"] + params["b1"])
    return h, h @ params["w2"] + params["b2"]


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def per_example_loss(params, x, y) -> np.ndarray:
    """Cross-entropy of each example: logsumexp(z) - z_y."""
    _, z = forward(params, x)
    top = z.max(axis=1)
    lse = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
    return lse - z[np.arange(len(y)), y]


def logit_errors(params, x, y) -> np.ndarray:
    """d loss_i / d z_i = softmax(z_i) - onehot(y_i)."""
    _, z = forward(params, x)
    e = softmax(z)
    e[np.arange(len(y)), y] -= 1.0
    return e


def input_gradients(params, x, y) -> np.ndarray:
    """g_i = d loss_i / d x_i, by the chain rule through tanh (1 - h^2)."""
    h, _ = forward(params, x)
    e = logit_errors(params, x, y)
    return ((e @ params["w2"].T) * (1.0 - h**2)) @ params["w1"].T


def mean_loss(params, x, y, weights) -> float:
    """sum_i w_i loss_i / n (Keras's default reduction)."""
    return float(np.sum(weights * per_example_loss(params, x, y)) / len(y))


def loss_parameter_gradients(params, x, y, weights) -> dict[str, np.ndarray]:
    """Gradients of `mean_loss` in the parameters, by hand (backpropagation)."""
    n = len(y)
    h, _ = forward(params, x)
    e = logit_errors(params, x, y) * weights[:, None] / n
    da = (e @ params["w2"].T) * (1.0 - h**2)
    return {"w1": x.T @ da, "b1": da.sum(axis=0), "w2": h.T @ e, "b2": e.sum(axis=0)}


def dual_norm(g: np.ndarray, p: float) -> np.ndarray:
    """||g_i||_q per row, 1/p + 1/q = 1."""
    if p == 1.0:
        return np.abs(g).max(axis=1)
    if math.isinf(p):
        return np.abs(g).sum(axis=1)
    q = p / (p - 1.0)
    return (np.abs(g) ** q).sum(axis=1) ** (1.0 / q)


def worst_case_direction(g: np.ndarray, p: float) -> np.ndarray:
    """d = r* / sigma per row: unit p-norm, g . d = ||g||_q (docs/method.md's table)."""
    if math.isinf(p):
        return np.sign(g)
    if p == 1.0:
        d = np.zeros_like(g)
        rows = np.arange(len(g))
        j = np.abs(g).argmax(axis=1)
        d[rows, j] = np.sign(g[rows, j])
        return d
    if p == 2.0:
        return g / np.linalg.norm(g, axis=1, keepdims=True)
    q = p / (p - 1.0)
    norm = dual_norm(g, p)[:, None]
    return np.sign(g) * np.abs(g) ** (q - 1.0) / norm ** (q - 1.0)


def penalty(params, x, y, weights, p: float, sigma: float) -> float:
    """sigma * sum_i w_i ||g_i||_q / n."""
    return float(sigma * np.sum(weights * dual_norm(input_gradients(params, x, y), p)) / len(y))


def central_differences(fn, params, step: float = 1e-6) -> dict[str, np.ndarray]:
    """d fn / d params, one parameter at a time, (fn(+h) - fn(-h)) / 2h."""
    gradients = {}
    for name in PARAMETERS:
        gradient = np.zeros_like(params[name])
        for index in np.ndindex(params[name].shape):
            moved = {k: v.copy() for k, v in params.items()}
            moved[name][index] += step
            up = fn(moved)
            moved[name][index] -= 2.0 * step
            gradient[index] = (up - fn(moved)) / (2.0 * step)
        gradients[name] = gradient
    return gradients


def objective(params, x, y, weights, *, p, sigma, method, clean_weight=0.0, fd_step=0.01):
    """(total, data_loss, penalty log, parameter gradients of total) of one estimator.

    r* (and d) are held constant in the parameter gradients of "adversarial"
    and "finite_difference", as the estimators define them.
    """
    data_loss = mean_loss(params, x, y, weights)
    clean = loss_parameter_gradients(params, x, y, weights)
    if method == "penalty":
        value = penalty(params, x, y, weights, p, sigma)
        term = central_differences(lambda q: penalty(q, x, y, weights, p, sigma), params)
        gradients = {k: clean[k] + term[k] for k in PARAMETERS}
        return data_loss + value, data_loss, value, gradients
    d = worst_case_direction(input_gradients(params, x, y), p)
    if method == "adversarial":
        x_adv = x + sigma * d
        moved = mean_loss(params, x_adv, y, weights)
        moved_gradients = loss_parameter_gradients(params, x_adv, y, weights)
        total = clean_weight * data_loss + (1.0 - clean_weight) * moved
        gradients = {
            k: clean_weight * clean[k] + (1.0 - clean_weight) * moved_gradients[k]
            for k in PARAMETERS
        }
        return total, data_loss, moved, gradients
    if method == "finite_difference":
        # (sigma / h) sum_i |w_i (l_i(x + h d) - l_i(x))| / n: each difference weighted by its sign.
        x_h = x + fd_step * d
        parts = weights * (per_example_loss(params, x_h, y) - per_example_loss(params, x, y))
        value = float(sigma * np.sum(np.abs(parts)) / len(y) / fd_step)
        signed = weights * np.sign(parts)
        moved_gradients = loss_parameter_gradients(params, x_h, y, signed)
        signed_clean = loss_parameter_gradients(params, x, y, signed)
        gradients = {
            k: clean[k] + sigma * (moved_gradients[k] - signed_clean[k]) / fd_step
            for k in PARAMETERS
        }
        return data_loss + value, data_loss, value, gradients
    raise ValueError(method)
