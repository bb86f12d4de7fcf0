"""NumPy references for single steps of the attacks: targeted DLR, APGD's protocol, Square.

Written from the papers (Croce and Hein 2020; Andriushchenko et al. 2020),
per example and in float64. The random numbers are TensorFlow's stateless draws, taken from
TensorFlow with the same seeds, shapes and algorithms the attacks use (so
both sides see the same draws); everything done with them is NumPy.
"""

from __future__ import annotations

import math

import attack_reference as ref
import numpy as np
import tensorflow as tf

ALG = "philox"


# ---------------------------------------------------------------------- #
# Losses.
# ---------------------------------------------------------------------- #


def targeted_dlr(z, y, t):
    """-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12) and its gradient in z, one example."""
    order = np.argsort(-z, kind="stable")
    num = z[y] - z[t]
    den = z[order[0]] - 0.5 * (z[order[2]] + z[order[3]]) + 1e-12
    grad = np.zeros_like(z)
    grad[y] -= 1.0 / den
    grad[t] += 1.0 / den
    grad[order[0]] += num / den**2
    grad[order[2]] -= 0.5 * num / den**2
    grad[order[3]] -= 0.5 * num / den**2
    return -num / den, grad


def margin(z, y):
    """z_y - max_{i != y} z_i per row."""
    others = np.where(np.eye(z.shape[1], dtype=bool)[y], -np.inf, z)
    return z[np.arange(len(y)), y] - others.max(axis=1)


# ---------------------------------------------------------------------- #
# APGD with its start, its box and AutoAttack's restart protocol.
# ---------------------------------------------------------------------- #


def fold_in(seed, value):
    return tf.random.experimental.stateless_fold_in(seed, value, alg=ALG)


def apgd_start_noise(n, d, p, epsilon, seed, dtype=tf.float64) -> np.ndarray:
    """The random start's perturbation, (n, d), from TensorFlow's draws.

    L-inf: uniform in [-1, 1], scaled so the largest entry is +-eps (AutoAttack's
    `t / t.abs().max() * eps`); L2: a normal direction scaled to length eps.
    """
    if math.isinf(p):
        noise = tf.random.stateless_uniform([n, d], seed, -1.0, 1.0, dtype=dtype, alg=ALG).numpy()
        return epsilon * noise / np.abs(noise).max(axis=1, keepdims=True)
    seeds = tf.random.experimental.stateless_split(seed, 2, alg=ALG)
    normal = tf.random.stateless_normal([n, d], seeds[1], dtype=dtype, alg=ALG).numpy()
    return epsilon * normal / np.linalg.norm(normal, axis=1, keepdims=True)


def apgd_run(loss_and_gradient, is_correct, x, x0, epsilon, p, steps, rho=0.75, clip=None):
    """One APGD run from x0 for one example (attack_reference.apgd, with the first
    misclassified iterate kept). Returns (x_adv, correct, best_loss)."""
    points = []

    def recording(point):
        points.append(point)
        return loss_and_gradient(point)

    best_x, best_loss, _ = ref.apgd(recording, x, x0, epsilon, p, steps, rho=rho, clip=clip)
    for point in points:
        if not is_correct(point):
            return point, False, best_loss
    return best_x, True, best_loss


def apgd_protocol(net, x, y, epsilon, p, steps, restarts, seed, clip, loss="ce", targets=0):
    """AutoAttack's runs: for each target (or none) and restart, APGD from a fresh random
    start on the examples no earlier run broke; per example the first misclassified
    point, else the point of highest loss over the runs. Returns (x_adv, correct)."""
    logits = net.logits(x)
    correct = np.argmax(logits, axis=1) == y
    ranking = np.argsort(-np.where(np.eye(logits.shape[1], dtype=bool)[y], -np.inf, logits))
    x_adv = x.copy()
    best = np.full(len(x), -np.inf)
    base = tf.constant([seed, 0], tf.int64)
    for rank in range(max(targets, 1)):
        for restart in range(restarts):
            active = np.flatnonzero(correct)
            if not len(active):
                return x_adv, correct
            run_seed = fold_in(fold_in(base, rank), restart)
            noise = apgd_start_noise(len(active), x.shape[1], p, epsilon, run_seed)
            for row, i in enumerate(active):
                target = ranking[i, rank] if targets else y[i]
                start = x[i] + noise[row]
                if clip is not None:
                    start = np.clip(start, *clip)

                def loss_and_gradient(point, i=i, target=target):
                    z = net.logits(point)
                    if loss == "ce":
                        value, dz = ref.cross_entropy(z, y[i])
                    elif targets:
                        value, dz = targeted_dlr(z, y[i], target)
                    else:
                        value, dz = ref.dlr(z, y[i])
                    return value, net.input_gradient(point, dz)

                def is_correct(point, i=i):
                    return np.argmax(net.logits(point)) == y[i]

                point, still, value = apgd_run(
                    loss_and_gradient, is_correct, x[i], start, epsilon, p, steps, clip=clip
                )
                if not still or value > best[i]:
                    x_adv[i], best[i] = point, value
                correct[i] = still
    return x_adv, correct


# ---------------------------------------------------------------------- #
# Square, L-inf.
# ---------------------------------------------------------------------- #

HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_side(iteration, queries, p_init, h, w):
    """round(sqrt(p_i h w)), at least 1, at most the image; p_i halved after the
    published iterations of a 10000-query budget, rescaled to `queries`."""
    scaled = int(iteration / queries * 10000)
    fraction = p_init * 0.5 ** sum(scaled > t for t in HALVINGS)
    return min(max(int(round(math.sqrt(fraction * h * w))), 1), min(h, w))


def square_init(x, epsilon, seed, clip):
    """Vertical stripes: one sign per column and channel, from TensorFlow's draws."""
    n, _, w, c = x.shape
    bits = tf.random.stateless_uniform([n, 1, w, c], seed, 0, 2, dtype=tf.int32, alg=ALG)
    return np.clip(x + epsilon * (2.0 * bits.numpy() - 1.0), *clip)


def square_draws(seed, iteration, n, h, w, c, side):
    """(top, left, signs) of one iteration, from TensorFlow's draws."""
    seeds = tf.random.experimental.stateless_split(fold_in(seed, iteration), 3)
    top = tf.random.stateless_uniform([n], seeds[0], 0, h - side + 1, dtype=tf.int32, alg=ALG)
    left = tf.random.stateless_uniform([n], seeds[1], 0, w - side + 1, dtype=tf.int32, alg=ALG)
    bits = tf.random.stateless_uniform([n, 1, 1, c], seeds[2], 0, 2, dtype=tf.int32, alg=ALG)
    return top.numpy(), left.numpy(), 2.0 * bits.numpy()[:, 0, 0, :] - 1.0


def square_step(x, x_best, best_margin, correct, margin_fn, epsilon, side, draws, clip):
    """One iteration: per example, a side x side window of each channel set to x +- eps
    (one sign per channel), clipped to the box; kept if the margin went down or the
    example became misclassified. Returns (x_best, margin, correct)."""
    top, left, signs = draws
    proposal = x_best.copy()
    for i in range(len(x)):
        window = (slice(top[i], top[i] + side), slice(left[i], left[i] + side))
        proposal[i][window] = np.clip(x[i][window] + epsilon * signs[i], *clip)
    new_margin = margin_fn(proposal)
    better = correct & ((new_margin < best_margin) | (new_margin < 0))
    x_best = np.where(better[:, None, None, None], proposal, x_best)
    best_margin = np.where(better, new_margin, best_margin)
    correct = np.where(better, new_margin >= 0, correct)
    return x_best, best_margin, correct


# ---------------------------------------------------------------------- #
# Square, L2 (the authors' update, per channel).
# ---------------------------------------------------------------------- #


def square_side_l2(iteration, queries, p_init, h, w):
    """The L-inf side, at least 3 and made odd, at most the image."""
    side = max(square_side(iteration, queries, p_init, h, w), 3)
    side += 1 - side % 2
    return min(side, min(h, w))


def _rectangles(height, width):
    """Concentric rectangles around the centre, the k-th weighted 1 / (k + 1)^2, unit norm."""
    delta = np.zeros((height, width))
    row, col = height // 2, width // 2
    for k in range(max(height // 2, width // 2) + 1):
        delta[max(row, 0) : row + 2 * k + 1, max(col, 0) : col + 2 * k + 1] += 1.0 / (k + 1) ** 2
        row, col = row - 1, col - 1
    return delta / np.linalg.norm(delta)


def l2_pattern(side):
    """The paper's square pattern: rectangles on the top half, negated ones below."""
    half = side // 2
    delta = np.concatenate([_rectangles(half, side), -_rectangles(side - half, side)])
    return delta / np.linalg.norm(delta)


def square_l2_draws(seed, iteration, n, h, w, c, side):
    """(top1, left1, top2, left2, transposed, signs) of one iteration, from TensorFlow's draws."""
    seeds = tf.random.experimental.stateless_split(fold_in(seed, iteration), 6)

    def corner(s, size):
        return tf.random.stateless_uniform([n], s, 0, size - side + 1, tf.int32, alg=ALG).numpy()

    bits = tf.random.stateless_uniform([n], seeds[4], 0, 2, tf.int32, alg=ALG).numpy()
    signs = tf.random.stateless_uniform([n, c], seeds[5], 0, 2, tf.int32, alg=ALG).numpy()
    return (
        corner(seeds[0], h),
        corner(seeds[1], w),
        corner(seeds[2], h),
        corner(seeds[3], w),
        bits == 1,
        2.0 * signs - 1.0,
    )


def square_l2_step(x, x_best, best_margin, correct, margin_fn, epsilon, side, draws, clip):
    """One L2 iteration as the authors' code does it, per example and per channel:
    the new window 1 is a fresh signed pattern plus window 1's old perturbation
    (normalised), scaled so that it takes window 1's and window 2's mass (per
    channel) and a 1/c share of the budget left in the ball; window 2 is emptied;
    the whole perturbation is rescaled to norm eps and clipped to the box."""
    top1, left1, top2, left2, transposed, signs = draws
    c = x.shape[-1]
    proposal = x_best.copy()
    for i in range(len(x)):
        delta = x_best[i] - x[i]
        w1 = (slice(top1[i], top1[i] + side), slice(left1[i], left1[i] + side))
        w2 = (slice(top2[i], top2[i] + side), slice(left2[i], left2[i] + side))
        both = np.zeros(delta.shape[:2], bool)
        both[w1] = both[w2] = True
        pattern = l2_pattern(side).T if transposed[i] else l2_pattern(side)
        image_norm = np.linalg.norm(delta)
        new = np.empty((side, side, c))
        for ch in range(c):
            old = delta[w1][:, :, ch]
            fresh = signs[i, ch] * pattern + old / (1e-12 + np.linalg.norm(old))
            windows = np.linalg.norm(delta[:, :, ch][both])
            budget = max(epsilon**2 - image_norm**2, 0.0) / c + windows**2
            new[:, :, ch] = fresh / np.linalg.norm(fresh) * np.sqrt(budget)
        delta[w2] = 0.0
        delta[w1] = new
        proposal[i] = np.clip(x[i] + epsilon * delta / np.linalg.norm(delta), *clip)
    new_margin = margin_fn(proposal)
    better = correct & ((new_margin < best_margin) | (new_margin < 0))
    x_best = np.where(better[:, None, None, None], proposal, x_best)
    best_margin = np.where(better, new_margin, best_margin)
    correct = np.where(better, new_margin >= 0, correct)
    return x_best, best_margin, correct
