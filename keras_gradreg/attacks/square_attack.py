"""The Square attack (Andriushchenko et al., ECCV 2020): random search that only queries outputs.

It minimises the margin z_y - max_{i != y} z_i by random square updates and
keeps a change only if the margin went down (or the example became
misclassified). It never asks the model for a gradient, so gradient masking
cannot stop it: when it breaks examples that gradient attacks missed, the
gradients were masked.

- L-inf: start from vertical stripes (each column of each channel +-eps);
  then, at each query, set a random s x s window of each channel to x +-eps.
- L2: start from a grid of (h // 5)-sized tiles of the paper's "squares"
  pattern; then move the perturbation's mass from a random second window
  into a random first one and add a new pattern there, keeping the L2 norm at
  eps (the authors' update).

The window side s = round(sqrt(p_i * h * w)) follows the published schedule:
p_i = p_init, halved at iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000
and 8000 of a 10000-query budget, rescaled to the budget used. Inputs are
images (batch, h, w, c) channels-last, (batch, h, w), or vectors (batch, d),
which are treated as one row: windows are then runs of round(p_i * d)
features.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import keras
import numpy as np
import tensorflow as tf

from keras_gradreg._checks import (
    Clip,
    check_bool,
    check_clip,
    check_count,
    check_fraction,
    check_nonnegative,
)
from keras_gradreg.attacks import scores
from keras_gradreg.attacks.auto_pgd import clean_scores, count_classes
from keras_gradreg.attacks.common import (
    AttackResult,
    RunOutcome,
    attack_result,
    bounds,
    box,
    check_inputs,
    compiled_kernel,
    deprecated_twin,
    keep_best_runs,
    loss_from_logits,
    seed_tensor,
)
from keras_gradreg.balls import ALG, ball_norm
from keras_gradreg.norms import PValue

SQUARE_NORMS = (2.0, math.inf)
# Iterations of one compiled call; examples broken by then leave the batch.
CHUNK = 250
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_fraction(iteration: int, queries: int, p_init: float, rescale: bool = True) -> float:
    """The published schedule: the share p_i of the image a window covers at `iteration`.

    p_init, halved after iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000
    and 8000 of a 10000-query budget; with `rescale`, those iterations are
    scaled to `queries` (as both reference implementations do).
    """
    it = int(iteration / queries * 10000) if rescale else iteration
    return p_init / 2 ** sum(it > threshold for threshold in _HALVINGS)


def image_layout(shape: tuple) -> tuple[int, int, int]:
    """(h, w, c) of one example of shape `shape`; vectors become one row (1, d, 1)."""
    if any(size is None for size in shape):
        raise ValueError(f"The Square attack needs a static input shape. Received: {shape}")
    if len(shape) == 1:
        return 1, shape[0], 1
    if len(shape) == 2:
        return shape[0], shape[1], 1
    if len(shape) == 3:
        return tuple(shape)
    raise ValueError(
        "The Square attack takes vectors, (h, w) or (h, w, c) images. "
        f"Received: an input of shape {tuple(shape)} per example"
    )


def window_sides(
    queries: int, p_init: float, layout: tuple[int, int, int], p: float, rescale: bool
) -> np.ndarray:
    """Window height and width at each iteration 0 .. queries - 2, shape (iterations, 2)."""
    h, w, _ = layout
    sides = []
    for iteration in range(queries - 1):
        fraction = square_fraction(iteration, queries, p_init, rescale)
        side = fraction * w if h == 1 else math.sqrt(fraction * h * w)
        side = int(round(side))
        if p == 2.0:
            side = max(side, 3)
            side += 1 - side % 2
        side = min(max(side, 1), w if h == 1 else min(h, w))
        sides.append((1 if h == 1 else side, side))
    return np.asarray(sides, np.int32).reshape(-1, 2)


def _rectangles(height: int, width: int) -> np.ndarray:
    """Concentric rectangles weighted 1 / (k + 1)^2, unit L2 norm (the paper's eta)."""
    delta = np.zeros((height, width))
    row, col = height // 2, width // 2
    for k in range(max(height // 2 + 1, width // 2 + 1)):
        rows = slice(max(row, 0), min(row + 2 * k + 1, height))
        cols = slice(max(col, 0), min(col + 2 * k + 1, width))
        delta[rows, cols] += 1.0 / (k + 1) ** 2
        row, col = row - 1, col - 1
    return delta / np.sqrt(np.sum(delta**2))


def square_pattern(height: int, width: int) -> np.ndarray:
    """The L2 update's pattern: +rectangles on the first half, -rectangles on the second.

    Halves split the rows of a square window, the columns of a one-row window.
    """
    if height == 1:
        half = width // 2
        delta = np.concatenate([_rectangles(1, half), -_rectangles(1, width - half)], axis=1)
    else:
        half = height // 2
        delta = np.concatenate([_rectangles(half, width), -_rectangles(height - half, width)])
    return delta / np.sqrt(np.sum(delta**2))


def _pattern_table(sides: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The patterns of each distinct side (and transposed), padded; index per iteration.

    The table is (distinct sides, 2, rows, columns): a one-row image's windows are
    (1, side), so its table is one row high, not side x side.
    """
    distinct = sorted({tuple(s) for s in sides.tolist()})
    if not distinct:
        return np.zeros((1, 2, 1, 1), np.float32), np.zeros(0, np.int32)
    # Each pattern's footprint, and its transpose's (a one-row pattern is not turned).
    footprints = distinct + [(w, h) for h, w in distinct if h > 1]
    height = max(h for h, _ in footprints)
    width = max(w for _, w in footprints)
    table = np.zeros((len(distinct), 2, height, width), np.float32)
    for index, (h, w) in enumerate(distinct):
        pattern = square_pattern(h, w)
        table[index, 0, :h, :w] = pattern
        if h > 1:
            table[index, 1, :w, :h] = pattern.T
        else:
            table[index, 1, :h, :w] = pattern
    lookup = {s: i for i, s in enumerate(distinct)}
    return table, np.asarray([lookup[tuple(s)] for s in sides.tolist()], np.int32)


class SquareState(NamedTuple):
    """Per example: the best point, its margin, and whether it is still classified correctly."""

    x_best: tf.Tensor
    margin: tf.Tensor
    correct: tf.Tensor


def _window_mask(corner, side, size):
    """(batch, size) bool: positions corner .. corner + side - 1."""
    position = tf.range(size)[None, :]
    return (position >= corner[:, None]) & (position < corner[:, None] + side)


def _uniform_int(seed, n, high):
    """Integers uniform in [0, high] per example, (n,)."""
    return tf.random.stateless_uniform([n], seed, 0, high + 1, dtype=tf.int32, alg=ALG)


def _signs(seed, shape):
    """Independent +-1 entries."""
    bits = tf.random.stateless_uniform(shape, seed, 0, 2, dtype=tf.int32, alg=ALG)
    return tf.cast(2 * bits - 1, tf.float32)


def _l2_norm(delta, axis=(1, 2, 3)):
    return tf.sqrt(tf.reduce_sum(tf.square(delta), axis=axis, keepdims=True))


def _accept(state: SquareState, x_new, margin, correct) -> SquareState:
    """Keep x_new where the margin went down or the example became misclassified."""
    better = state.correct & ((margin < state.margin) | ~correct)
    return SquareState(
        tf.where(tf.reshape(better, [-1, 1, 1, 1]), x_new, state.x_best),
        tf.where(better, margin, state.margin),
        tf.where(better, correct, state.correct),
    )


class _SquareLoop:
    """The Square attack's start and iterations for one batch, on (n, h, w, c) images."""

    def __init__(self, model_ref, from_logits, p, queries, p_init, rescale, shape):
        self.model_ref, self.from_logits, self.p, self.shape = model_ref, from_logits, p, shape
        self.h, self.w, self.c = layout = image_layout(shape)
        sides = window_sides(queries, p_init, layout, p, rescale)
        table, pattern_index = _pattern_table(sides if p == 2.0 else sides[:0])
        self.sides = tf.constant(sides if len(sides) else np.zeros((1, 2), np.int32))
        self.table = tf.constant(table)
        self.pattern_index = tf.constant(np.pad(pattern_index, (0, 1)))

    def query(self, images, label):
        """The margin and correctness of a batch of images (the only use of the model)."""
        outputs = self.model_ref()(tf.reshape(images, [-1, *self.shape]), training=False)
        z = scores.class_scores(outputs, self.from_logits)
        correct = tf.equal(tf.argmax(z, axis=1, output_type=tf.int32), label)
        return scores.margin(z, label), correct

    def init(self, x, label, epsilon, low, high, seed) -> SquareState:
        """Vertical stripes (L-inf) or the tiled pattern (L2), one query."""
        h, w, c = self.h, self.w, self.c
        images = tf.reshape(x, [-1, h, w, c])
        n = tf.shape(images)[0]
        if self.p == math.inf:
            delta = epsilon * _signs(seed, [n, 1, w, c])
        elif h == 1:
            delta = _signs(seed, [n, 1, w, c])
        else:
            delta = self.l2_tiles(seed, n)
        if self.p == 2.0:
            delta = epsilon * delta / (_l2_norm(delta) + 1e-12)
        x_best = box(images + delta, low, high)
        margin, correct = self.query(x_best, label)
        return SquareState(tf.reshape(x_best, tf.shape(x)), margin, correct)

    def l2_tiles(self, seed, n):
        """The L2 start: (h // 5)-sized tiles of the pattern, random orientation and signs."""
        h, w, c = self.h, self.w, self.c
        side = max(h // 5, 1)
        first = max((h - 5 * side) // 2, 0)
        starts_h = [first + i * side for i in range(h // side) if first + (i + 1) * side <= h]
        starts_w = [first + j * side for j in range(w // side) if first + (j + 1) * side <= w]
        pattern = tf.constant(square_pattern(side, side), tf.float32)
        upright, turned = pattern[None, :, :, None], tf.transpose(pattern)[None, :, :, None]
        seeds = tf.random.experimental.stateless_split(seed, len(starts_h) * len(starts_w) + 1)
        delta = tf.zeros([n, h, w, c])
        for index, (top, left) in enumerate((t, u) for t in starts_h for u in starts_w):
            tile_seed = tf.random.experimental.stateless_split(seeds[index], 2)
            tile = tf.where(_signs(tile_seed[0], [n, 1, 1, 1]) > 0, upright, turned)
            tile = tile * _signs(tile_seed[1], [n, 1, 1, c])
            paddings = [[0, 0], [top, h - top - side], [left, w - left - side], [0, 0]]
            delta += tf.pad(tile, paddings)
        return delta

    def window(self, seeds, n, side):
        """(n, h, w, 1) bool: a window of `side` at a random position per example."""
        rows = _window_mask(_uniform_int(seeds[0], n, self.h - side[0]), side[0], self.h)
        cols = _window_mask(_uniform_int(seeds[1], n, self.w - side[1]), side[1], self.w)
        return rows[:, :, None, None] & cols[:, None, :, None], rows, cols

    def propose_linf(self, images, x_best, epsilon, low, high, iteration_seed, side):
        """Each channel of a random window set to x +- eps."""
        n = tf.shape(images)[0]
        seeds = tf.random.experimental.stateless_split(iteration_seed, 3)
        window, _, _ = self.window(seeds, n, side)
        moved = images + epsilon * _signs(seeds[2], [n, 1, 1, self.c])
        return box(tf.where(window, moved, x_best), low, high)

    def placed_pattern(self, top, left, flip, iteration):
        """(n, h, w, 1): this iteration's pattern with its corner at (top, left)."""
        patterns = tf.gather(self.table[self.pattern_index[iteration]], tf.cast(flip, tf.int32))
        rows = tf.range(self.h)[None, :] - top[:, None]
        cols = tf.range(self.w)[None, :] - left[:, None]
        placed = tf.gather(
            patterns, tf.clip_by_value(rows, 0, self.table.shape[-2] - 1), batch_dims=1
        )
        placed = tf.gather(
            placed, tf.clip_by_value(cols, 0, self.table.shape[-1] - 1), axis=2, batch_dims=1
        )
        return placed[..., None]

    def propose_l2(self, images, x_best, epsilon, low, high, iteration_seed, side, iteration):
        """Move the mass of two random windows into the first, plus a new pattern there."""
        n = tf.shape(images)[0]
        seeds = tf.random.experimental.stateless_split(iteration_seed, 6)
        window1, rows1, cols1 = self.window(seeds[0:2], n, side)
        window2, _, _ = self.window(seeds[2:4], n, side)
        mask1 = tf.cast(window1, tf.float32)
        both = tf.cast(window1 | window2, tf.float32)
        delta = x_best - images
        norm_window1 = _l2_norm(delta * mask1, axis=(1, 2))
        norm_image = _l2_norm(delta)
        norm_windows = _l2_norm(delta * both, axis=(1, 2))  # per channel, as the authors' code
        top1 = tf.argmax(tf.cast(rows1, tf.int32), axis=1, output_type=tf.int32)
        left1 = tf.argmax(tf.cast(cols1, tf.int32), axis=1, output_type=tf.int32)
        flip = _signs(seeds[4], [n]) > 0
        fresh = self.placed_pattern(top1, left1, flip, iteration)
        # Zero outside window 1 (the placement repeats the pattern's edges there).
        fresh = fresh * mask1 * _signs(seeds[5], [n, 1, 1, self.c])
        update = fresh + delta * mask1 / (1e-12 + norm_window1)
        budget = tf.maximum(epsilon**2 - norm_image**2, 0.0) / self.c + norm_windows**2
        update = update / (1e-12 + _l2_norm(update, axis=(1, 2))) * tf.sqrt(budget)
        delta = delta * (1.0 - both) + update * mask1
        return box(images + epsilon * delta / (_l2_norm(delta) + 1e-12), low, high)

    def steps(self, x, label, state, epsilon, low, high, seed, start, stop) -> SquareState:
        """Iterations start .. stop - 1, or until every example is misclassified."""
        images = tf.reshape(x, [-1, self.h, self.w, self.c])
        state = SquareState(tf.reshape(state.x_best, tf.shape(images)), state.margin, state.correct)

        def body(i, state):
            iteration_seed = tf.random.experimental.stateless_fold_in(seed, i, alg=ALG)
            side = self.sides[i]
            if self.p == math.inf:
                x_new = self.propose_linf(
                    images, state.x_best, epsilon, low, high, iteration_seed, side
                )
            else:
                x_new = self.propose_l2(
                    images, state.x_best, epsilon, low, high, iteration_seed, side, i
                )
            return i + 1, _accept(state, x_new, *self.query(x_new, label))

        def cond(i, state):
            return (i < stop) & tf.reduce_any(state.correct)

        _, state = tf.while_loop(cond, body, (start, state))
        return SquareState(tf.reshape(state.x_best, tf.shape(x)), state.margin, state.correct)


class _SquareKernels(NamedTuple):
    init: Any
    steps: Any


def _square_init_builder(model_ref, loss_fn, from_logits, **static):
    del loss_fn
    return _SquareLoop(model_ref, from_logits, **static).init


def _square_steps_builder(model_ref, loss_fn, from_logits, **static):
    del loss_fn
    return _SquareLoop(model_ref, from_logits, **static).steps


def _kernels(model, from_logits, **static) -> _SquareKernels:
    return _SquareKernels(
        *(
            compiled_kernel(model, None, builder, resolve=False, from_logits=from_logits, **static)
            for builder in (_square_init_builder, _square_steps_builder)
        )
    )


def _check_square(epsilon, p, queries, p_init, restarts, clip):
    epsilon = check_nonnegative(epsilon, "epsilon")
    p = ball_norm(p)
    if p not in SQUARE_NORMS:
        raise ValueError(f"`p` must be 2 or inf for the Square attack. Received: p={p!r}")
    queries = check_count(queries, "queries")
    p_init = check_fraction(p_init, "p_init")
    restarts = check_count(restarts, "restarts")
    return epsilon, p, queries, p_init, restarts, check_clip(clip)


def _one_run(kernels, x, labels, active, epsilon, low, high, seed, queries, jit_compile):
    """One restart on the examples `active`, in chunks of `CHUNK` iterations."""
    x_run = tf.gather(x, active)
    labels_run = tf.gather(labels, active)
    state = kernels.init(x_run, labels_run, epsilon, low, high, seed, jit_compile=jit_compile)
    x_best, margin, correct = (np.array(t) for t in state)
    for start in range(0, queries - 1, CHUNK):
        still = np.flatnonzero(correct)
        if not len(still):
            break
        chunk = SquareState(*(tf.constant(a[still]) for a in (x_best, margin, correct)))
        stop = tf.constant(min(start + CHUNK, queries - 1))
        state = kernels.steps(
            tf.gather(x_run, still),
            tf.gather(labels_run, still),
            chunk,
            epsilon,
            low,
            high,
            seed,
            tf.constant(start),
            stop,
            jit_compile=jit_compile,
        )
        x_best[still], margin[still], correct[still] = (t.numpy() for t in state)
    return SquareState(x_best, margin, correct)


def square(
    model: keras.Model,
    x: Any,
    y: Any,
    epsilon: float,
    p: PValue = math.inf,
    queries: int = 5000,
    p_init: float = 0.8,
    restarts: int = 1,
    seed: Any = None,
    clip: Clip = (0.0, 1.0),
    *,
    rescale_schedule: bool = True,
    from_logits: bool | None = None,
    return_correct: bool = False,
    jit_compile: bool | None = None,
) -> tf.Tensor | AttackResult:
    """The Square attack (Andriushchenko et al. 2020): score-based random search.

    Minimises the margin loss with at most `queries` forward passes per
    example and restart (the first one at the initial stripes or tiles),
    stopping for each example as soon as it is misclassified (module
    docstring). Only the model's outputs are used, never its gradients.
    Examples misclassified at x are not attacked; each restart attacks only
    the examples no earlier restart broke.

    Args:
        model: A Keras classifier; outputs read as logits, or as probabilities
            (attacked through their logarithm) when `from_logits` is False.
        x: A batch of images (batch, h, w, c) channels-last or (batch, h, w),
            or of vectors (batch, d).
        y: Integer labels (batch,) or (batch, 1), or one-hot targets.
        epsilon: Radius of the p-ball, >= 0.
        p: 2 or `math.inf` ("inf").
        queries: Queries per example and restart, >= 1 (AutoAttack: 5000).
        p_init: The share of the image the first windows cover, in (0, 1].
        restarts: Runs from new random starts, >= 1.
        seed: Integer for reproducible runs; None draws a fresh seed.
        clip: The box (low, high) inputs live in, or None for no box.
        rescale_schedule: Scale the schedule's iterations to `queries` (the
            published attack). With False they are absolute, so a larger
            budget repeats a smaller one's queries and then goes on.
        from_logits: Whether the outputs are logits; None reads the compiled
            loss's `from_logits` (logits when there is none).
        return_correct: Also return whether the model still classifies each
            example correctly at its point.
        jit_compile: True/False to force XLA on or off; None uses XLA only
            for eager calls with a GPU visible.

    Returns:
        The adversarial batch, shaped like `x`: a misclassified point where
        one was found, else the point of lowest margin. With
        `return_correct`, `AttackResult(x_adv, correct)`.

    Raises:
        ValueError: On an invalid argument, before any work.
    """
    epsilon, p, queries, p_init, restarts, clip = _check_square(
        epsilon, p, queries, p_init, restarts, clip
    )
    return_correct = check_bool(return_correct, "return_correct")
    seed = seed_tensor(seed)
    x, y = check_inputs(x, y)
    shape = tuple(x.shape[1:])
    image_layout(shape)
    if from_logits is None:
        from_logits = loss_from_logits(model, None)
    classes = count_classes(model, x)
    clean = clean_scores(model, x, y, from_logits, classes, 0, jit_compile)
    kernels = _kernels(
        model,
        from_logits,
        p=p,
        queries=queries,
        p_init=p_init,
        rescale=bool(rescale_schedule),
        shape=shape,
    )
    low, high = bounds(clip, x)
    epsilon = tf.constant(epsilon, x.dtype)

    def run(active, target, restart, run_seed) -> RunOutcome:
        del target, restart
        result = _one_run(
            kernels, x, clean.labels, active, epsilon, low, high, run_seed, queries, jit_compile
        )
        # The lower the margin, the stronger the point.
        return RunOutcome(result.x_best, result.correct, -result.margin)

    x_adv, correct = keep_best_runs(x, clean.correct, seed, restarts, run)
    return attack_result(x_adv, correct, return_correct)


square_with_correct = deprecated_twin(square, "square_with_correct")
