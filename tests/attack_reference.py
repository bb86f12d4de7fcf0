"""Independent NumPy references for the attack tests: linear and tanh models, and APGD.

The network's input gradient is derived by hand (no autodiff), and APGD is
written per example from the paper (Croce and Hein 2020, Algorithm 1 and
section 3.2), not from the library's vectorised kernel.
"""

from __future__ import annotations

import math
from fractions import Fraction

import keras
import numpy as np


class TanhNet:
    """logits = tanh(x W1 + b1) W2 + b2, in float64, with hand-derived gradients."""

    def __init__(self, inputs: int, hidden: int, classes: int, seed: int):
        rng = np.random.default_rng(seed)
        self.w1 = rng.normal(scale=0.7, size=(inputs, hidden))
        self.b1 = rng.normal(scale=0.1, size=hidden)
        self.w2 = rng.normal(scale=0.7, size=(hidden, classes))
        self.b2 = rng.normal(scale=0.1, size=classes)

    def keras_model(self) -> keras.Model:
        model = keras.Sequential(
            [
                keras.Input((self.w1.shape[0],), dtype="float64"),
                keras.layers.Dense(self.w1.shape[1], activation="tanh", dtype="float64"),
                keras.layers.Dense(self.w2.shape[1], dtype="float64"),
            ]
        )
        model.layers[0].set_weights([self.w1, self.b1])
        model.layers[1].set_weights([self.w2, self.b2])
        return model

    def logits(self, x):
        return np.tanh(x @ self.w1 + self.b1) @ self.w2 + self.b2

    def input_gradient(self, x, logit_gradient):
        """d loss / d x for one example, given d loss / d logits."""
        h = np.tanh(x @ self.w1 + self.b1)
        return ((logit_gradient @ self.w2.T) * (1.0 - h**2)) @ self.w1.T


def cross_entropy(z, y):
    """Loss and its gradient in z, for one example."""
    shifted = z - z.max()
    p = np.exp(shifted) / np.exp(shifted).sum()
    return -np.log(p[y]), p - np.eye(len(z))[y]


def dlr(z, y):
    """-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12) and its gradient in z."""
    order = np.argsort(-z)
    others = [i for i in order if i != y]
    m = others[0]
    num = z[y] - z[m]
    den = z[order[0]] - z[order[2]] + 1e-12
    grad = np.zeros_like(z)
    grad[y] -= 1.0 / den
    grad[m] += 1.0 / den
    grad[order[0]] += num / den**2
    grad[order[2]] -= num / den**2
    return -num / den, grad


def checkpoints(steps: int) -> list[int]:
    """w_j = ceil(p_j steps), p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), p_1 = 0.22."""
    p = [Fraction(0), Fraction(22, 100)]
    while p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100)) <= 1:
        p.append(p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100)))
    points = sorted({math.ceil(q * steps) for q in p[1:]})
    return [w for w in points if w >= 1]


def apgd(loss_and_gradient, x, x0, epsilon, p, steps, rho=0.75, clip=None):
    """APGD from x0 for one example; returns (best point, best loss, final step size)."""

    def project(z):
        d = z - x
        if math.isinf(p):
            d = np.clip(d, -epsilon, epsilon)
        else:
            norm = np.linalg.norm(d)
            d = d * min(1.0, epsilon / norm) if norm > 0 else d
        z = x + d
        return z if clip is None else np.clip(z, *clip)

    def direction(g):
        if math.isinf(p):
            return np.sign(g)
        norm = np.linalg.norm(g)
        return g / norm if norm > 0 else g

    marks = set(checkpoints(steps))
    eta = 2.0 * epsilon
    f, g = loss_and_gradient(x0)
    x_prev = x_cur = x0
    best = (x0, f, g)
    increases, halved_last, best_checked, last = 0, True, f, 0
    for k in range(steps):
        z = project(x_cur + eta * direction(g))
        a = 1.0 if k == 0 else 0.75
        x_new = project(x_cur + a * (z - x_cur) + (1 - a) * (x_cur - x_prev))
        f_new, g_new = loss_and_gradient(x_new)
        increases += f_new > f
        if f_new > best[1]:
            best = (x_new, f_new, g_new)
        x_prev, x_cur, f, g = x_cur, x_new, f_new, g_new
        if k + 1 in marks:
            stalled = not halved_last and best[1] <= best_checked
            halve = increases < rho * (k + 1 - last) or stalled
            if halve:
                eta /= 2.0
                x_cur, f, g = best
            halved_last, best_checked, increases, last = halve, best[1], 0, k + 1
    return best[0], best[1], eta


def two_live_classes(seed=0, n=300, d=12, image=None):
    """Logits x W + b with classes 2 and 3 held far below: a two-class problem that
    the (targeted) DLR loss, which needs 3 (4) classes, is defined on."""
    rng = np.random.default_rng(seed)
    weights = np.zeros((d, 4), "float32")
    weights[:, :2] = rng.normal(size=(d, 2))
    bias = np.array([0.0, 0.0, -100.0, -100.0], "float32")
    x = rng.normal(size=(n, d)).astype("float32")
    y = rng.integers(0, 2, size=n)
    shape = (d,) if image is None else image
    model = keras.Sequential([keras.Input(shape), keras.layers.Flatten(), keras.layers.Dense(4)])
    model.layers[-1].set_weights([weights, bias])
    return model, x.reshape((n, *shape)), y, weights, bias


def distances(x, y, weights, bias, p):
    """margin / ||w_y - w_other||_q (0 for misclassified examples)."""
    flat = x.reshape(len(x), -1).astype("float64")
    logits = flat @ weights + bias
    rows = np.arange(len(y))
    margin = logits[rows, y] - logits[rows, 1 - y]
    diff = (weights[:, y] - weights[:, 1 - y]).T.astype("float64")
    q = 1.0 if math.isinf(p) else 2.0
    return np.maximum(margin, 0.0) / np.linalg.norm(diff, ord=q, axis=1)


def small_conv_classifier(shape: tuple[int, ...], n: int = 40):
    """A random 10-class tanh convnet, inputs uniform in [0, 1] and its own predictions as
    labels (every example correct at x)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input(shape),
            keras.layers.Conv2D(4, 3, activation="tanh"),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    )
    x = np.random.default_rng(4).uniform(size=(n, *shape)).astype("float32")
    return model, x, np.argmax(model.predict(x, verbose=0), axis=1)
