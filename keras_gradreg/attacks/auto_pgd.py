"""Auto-PGD (Croce and Hein, ICML 2020): PGD with momentum and a step size it adapts itself.

For a budget of N iterations, APGD starts with step size eta = 2 * eps and
momentum alpha = 0.75:

    z       = P(x_k + eta * s(grad f(x_k)))
    x_{k+1} = P(x_k + alpha (z - x_k) + (1 - alpha) (x_k - x_{k-1}))

(the first step, from x_0, without momentum), where P projects onto the
p-ball around x and into the box and s is the steepest-ascent direction
(sign(g) for L-inf, g / ||g||_2 for L2). At the checkpoints w_j = ceil(p_j N),
p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), eta is
halved and the iterate restarts from the best point found when either

1. f rose in fewer than rho = 0.75 of the steps since w_{j-1}, or
2. eta was not halved at w_{j-1} and the best loss did not improve since.

(At w_1 only condition 1 applies, as in the authors' code.) The loss f is
the cross-entropy or the difference of logits ratio (DLR), targeted or not
(`keras_gradreg.attacks.scores`). Per example, the point returned is a
misclassified one if any iterate, restart or target found one, else the
point of highest loss.
"""

from __future__ import annotations

import math
from fractions import Fraction
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
from keras_gradreg.attacks.common import (
    AttackResult,
    RunOutcome,
    attack_result,
    bounds,
    box,
    check_inputs,
    check_restarts,
    compiled_kernel,
    deprecated_twin,
    keep_best_runs,
    loss_from_logits,
    seed_tensor,
)
from keras_gradreg.balls import ALG, ball_norm, project_ball, random_on_sphere
from keras_gradreg.gradients import differentiate_inputs
from keras_gradreg.norms import PValue

APGD_NORMS = (2.0, math.inf)
MOMENTUM = 0.75


def checkpoints(steps: int) -> list[int]:
    """The iterations w_j = ceil(p_j * steps) at which APGD may halve its step.

    p_0 = 0, p_1 = 0.22 and p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06),
    computed in exact fractions; repeated values (short budgets) are dropped.

    Returns:
        The increasing checkpoints w_1, w_2, ... that are <= `steps`.
    """
    steps = check_count(steps, "steps")
    previous, current = Fraction(0), Fraction(22, 100)
    found: list[int] = []
    while current <= 1:
        point = math.ceil(current * steps)
        if point >= 1 and (not found or point > found[-1]):
            found.append(point)
        previous, current = (
            current,
            current + max(current - previous - Fraction(3, 100), Fraction(6, 100)),
        )
    return found


class ApgdResult(NamedTuple):
    """One APGD run on a batch (all tensors have the batch on axis 0).

    Attributes:
        x_adv: A misclassified point where one was found, else the best point.
        correct: Whether every iterate was classified correctly.
        best_loss: The highest loss reached.
        step_size: Each example's step size at the end of the run.
    """

    x_adv: tf.Tensor
    correct: tf.Tensor
    best_loss: tf.Tensor
    step_size: tf.Tensor


def random_start_point(shape, p: float, epsilon, seed, dtype=tf.float32) -> tf.Tensor:
    """A random perturbation on the boundary of the p-ball, as AutoAttack draws it.

    L-inf: uniform noise in [-1, 1] scaled so its largest entry is +-epsilon;
    L2: a uniformly random direction of length epsilon.
    """
    if p == 2.0:
        return random_on_sphere(shape, p, epsilon, seed, dtype)
    noise = tf.random.stateless_uniform(shape, seed, -1.0, 1.0, dtype=dtype, alg=ALG)
    flat = tf.reshape(noise, [shape[0], -1])
    largest = tf.reduce_max(tf.abs(flat), axis=1, keepdims=True)
    flat = tf.cast(epsilon, dtype) * flat / tf.maximum(largest, 1e-12)
    return tf.reshape(flat, shape)


def _unit_l2(gradient: tf.Tensor) -> tf.Tensor:
    """g / ||g||_2 per example (0 where g = 0)."""
    flat = tf.reshape(gradient, [tf.shape(gradient)[0], -1])
    norm = tf.norm(flat, axis=1, keepdims=True)
    unit = flat / tf.where(norm > 0, norm, tf.ones_like(norm))
    return tf.reshape(unit, tf.shape(gradient))


def _where(mask: tf.Tensor, a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """Per example: rows of `a` where `mask`, else rows of `b`."""
    return tf.where(tf.reshape(mask, [-1] + [1] * (a.shape.rank - 1)), a, b)


def _record(s: dict, x_new, loss_new, correct_new, grad_new) -> dict:
    """The state after evaluating x_new: adversarial and best points, rises of the loss."""
    s = dict(s)
    s["x_adv"] = _where(s["correct"] & ~correct_new, x_new, s["x_adv"])
    s["correct"] = s["correct"] & correct_new
    s["increases"] += tf.cast(loss_new > s["loss"], tf.int32)
    better = loss_new > s["loss_best"]
    s["x_best"] = _where(better, x_new, s["x_best"])
    s["grad_best"] = _where(better, grad_new, s["grad_best"])
    s["loss_best"] = tf.where(better, loss_new, s["loss_best"])
    s["x_prev"], s["x"], s["grad"], s["loss"] = s["x"], x_new, grad_new, loss_new
    return s


def _at_checkpoint(s: dict, k: tf.Tensor, rho: float) -> dict:
    """Halve the step and restart from the best point where either condition holds."""
    s = dict(s)
    interval = tf.cast(k + 1 - s["last_checkpoint"], tf.float32)
    few_increases = tf.cast(s["increases"], tf.float32) < rho * interval
    stalled = ~s["halved_last"] & (s["loss_best"] <= s["loss_best_checked"])
    halve = few_increases | stalled
    s["step"] = tf.where(halve, 0.5 * s["step"], s["step"])
    s["x"] = _where(halve, s["x_best"], s["x"])
    s["grad"] = _where(halve, s["grad_best"], s["grad"])
    s["loss"] = tf.where(halve, s["loss_best"], s["loss"])
    s["halved_last"] = halve
    s["loss_best_checked"] = s["loss_best"]
    s["increases"] = tf.zeros_like(s["increases"])
    s["last_checkpoint"] = k + 1
    return s


def _initial_state(start, loss0, correct0, grad0, epsilon) -> dict:
    n = tf.shape(start)[0]
    return dict(
        x=start,
        x_prev=start,
        grad=grad0,
        loss=loss0,
        x_best=start,
        grad_best=grad0,
        loss_best=loss0,
        x_adv=start,
        correct=correct0,
        step=tf.fill([n], 2.0 * epsilon),
        increases=tf.zeros([n], tf.int32),
        loss_best_checked=loss0,
        halved_last=tf.ones([n], tf.bool),
        last_checkpoint=tf.constant(0),
    )


class _ApgdLoop:
    """The APGD loop for one batch (module docstring), as a kernel's Python function."""

    def __init__(self, model_ref, from_logits, p, steps, objective_name, targeted, rho, start):
        self.model_ref, self.from_logits, self.p, self.steps = model_ref, from_logits, p, steps
        self.objective_name, self.targeted, self.rho = objective_name, targeted, rho
        self.random_start = start
        is_checkpoint = np.zeros(steps + 1, bool)
        is_checkpoint[checkpoints(steps)] = True
        self.is_checkpoint = tf.constant(is_checkpoint)

    def objective(self, x, label, target):
        """Per-example loss, correctness and input gradient at x."""

        def summed_loss(point):
            z = scores.class_scores(self.model_ref()(point, training=False), self.from_logits)
            losses = scores.attack_loss(self.objective_name, self.targeted, z, label, target)
            return tf.reduce_sum(losses), (losses, z)

        (gradient,), (losses, z) = differentiate_inputs(summed_loss, x)
        correct = tf.equal(tf.argmax(z, axis=1, output_type=tf.int32), label)
        return losses, correct, gradient

    def move(self, x, feasible, s, alpha, epsilon, low, high):
        """x_{k+1} from x_k: a steepest-ascent step, then momentum, projected.

        x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_{k-1}) is computed as
        alpha z + (1 - alpha)(2 x_k - x_{k-1}): fewer passes over the batch.
        For L-inf the ball and the box meet in a box (`feasible`): one clip.
        """
        point, previous = s["x"], s["x_prev"]
        step = tf.reshape(s["step"], [-1] + [1] * (x.shape.rank - 1))
        if self.p == math.inf:
            z = tf.clip_by_value(point + step * tf.sign(s["grad"]), *feasible)
            return tf.clip_by_value(alpha * z + (1.0 - alpha) * (2.0 * point - previous), *feasible)

        def project(candidate):
            return box(x + project_ball(candidate - x, self.p, epsilon), low, high)

        z = project(point + step * _unit_l2(s["grad"]))
        return project(alpha * z + (1.0 - alpha) * (2.0 * point - previous))

    def run(self, x, label, target, epsilon, low, high, seed) -> ApgdResult:
        epsilon = tf.cast(epsilon, x.dtype)
        start = x
        if self.random_start:
            noise = random_start_point(tf.shape(x), self.p, epsilon, seed, x.dtype)
            start = box(x + noise, low, high)
        state = _initial_state(start, *self.objective(start, label, target), epsilon)
        feasible = None
        if self.p == math.inf:
            feasible = (x - epsilon, x + epsilon)
            if low is not None:
                feasible = (tf.maximum(feasible[0], low), tf.minimum(feasible[1], high))
        momentum = tf.constant(MOMENTUM, x.dtype)

        def body(k, s):
            alpha = tf.where(k > 0, momentum, tf.ones_like(momentum))
            x_new = self.move(x, feasible, s, alpha, epsilon, low, high)
            s = _record(s, x_new, *self.objective(x_new, label, target))
            checkpoint = self.is_checkpoint[k + 1]
            s = tf.cond(checkpoint, lambda: _at_checkpoint(s, k, self.rho), lambda: s)
            return k + 1, s

        def cond(k, s):
            return (k < self.steps) & tf.reduce_any(s["correct"])

        _, state = tf.while_loop(cond, body, (tf.constant(0), state))
        x_adv = _where(state["correct"], state["x_best"], state["x_adv"])
        return ApgdResult(x_adv, state["correct"], state["loss_best"], state["step"])


def _apgd_fn(
    model_ref, loss_fn, from_logits, p, steps, objective_name, targeted, rho, random_start
):
    """Kernel builder: the APGD loop for one batch."""
    del loss_fn
    loop = _ApgdLoop(model_ref, from_logits, p, steps, objective_name, targeted, rho, random_start)
    return loop.run


class _Scores(NamedTuple):
    labels: tf.Tensor
    correct: tf.Tensor
    ranking: tf.Tensor | None


def _scores_fn(model_ref, loss_fn, from_logits, rank):
    del loss_fn

    def run(x, y_labels):
        z = scores.class_scores(model_ref()(x, training=False), from_logits)
        correct = tf.equal(tf.argmax(z, axis=1, output_type=tf.int32), y_labels)
        ranking = scores.target_ranking(z, y_labels, rank) if rank else None
        return correct, ranking

    return run


def count_classes(model: keras.Model, x: tf.Tensor) -> int:
    """The number of classes of `model`'s scores (one forward pass of one example)."""
    return scores.num_classes(tf.convert_to_tensor(model(x[:1], training=False)).shape)


def clean_scores(model, x, y, from_logits, classes: int, rank: int = 0, jit_compile=None):
    """Labels, clean correctness and (with `rank` > 0) the top-`rank` target classes."""
    labels = scores.class_labels(y, classes)
    kernel = compiled_kernel(
        model, None, _scores_fn, resolve=False, from_logits=from_logits, rank=rank
    )
    correct, ranking = kernel(x, labels, jit_compile=jit_compile)
    return _Scores(labels, correct, ranking)


def check_classes(classes: int, loss: str, targeted: bool) -> None:
    """Raises ValueError if `classes` is too few for the loss."""
    needed = scores.min_classes(loss, targeted)
    if classes < needed:
        raise ValueError(
            f"The {'targeted ' if targeted else ''}{loss.upper()} loss needs at least "
            f"{needed} classes; the model has {classes}. Received: loss={loss!r}, "
            f"targeted={targeted}"
        )


def _check_apgd(
    epsilon, p, loss, targeted, target_classes, steps, restarts, random_start, rho, clip
):
    epsilon = check_nonnegative(epsilon, "epsilon")
    p = ball_norm(p)
    if p not in APGD_NORMS:
        raise ValueError(f"`p` must be 2 or inf for APGD. Received: p={p!r}")
    if loss not in scores.LOSSES:
        raise ValueError(f"`loss` must be one of {scores.LOSSES}. Received: loss={loss!r}")
    if not isinstance(targeted, bool):
        raise ValueError(f"`targeted` must be True or False. Received: targeted={targeted!r}")
    target_classes = check_count(target_classes, "target_classes")
    steps = check_count(steps, "steps")
    restarts = check_restarts(restarts, random_start)
    rho = check_fraction(rho, "rho")
    return epsilon, p, target_classes, steps, restarts, rho, check_clip(clip)


def apgd(
    model: keras.Model,
    x: Any,
    y: Any,
    epsilon: float,
    p: PValue = math.inf,
    loss: str = "ce",
    targeted: bool = False,
    target_classes: int = 9,
    steps: int = 100,
    restarts: int = 1,
    seed: Any = None,
    clip: Clip = (0.0, 1.0),
    *,
    rho: float = 0.75,
    random_start: bool = True,
    from_logits: bool | None = None,
    return_correct: bool = False,
    jit_compile: bool | None = None,
) -> tf.Tensor | AttackResult:
    """Auto-PGD (Croce and Hein 2020) on a batch of a classifier's inputs.

    Each run starts at a random point of the sphere of radius `epsilon`
    around x (clipped to the box) and takes `steps` APGD iterations (module
    docstring). Runs are repeated for each restart and, with `targeted`,
    for each of the `target_classes` classes other than the label with the
    highest clean scores; every run attacks only the examples no earlier
    run misclassified (AutoAttack's protocol). Examples misclassified at x
    are not attacked.

    Args:
        model: A Keras classifier. Its outputs are read as logits, or as
            probabilities (attacked through their logarithm) when
            `from_logits` is False.
        x: A batch of inputs (a single floating tensor).
        y: Integer labels (batch,) or (batch, 1), or one-hot targets.
        epsilon: Radius of the p-ball, >= 0.
        p: 2 or `math.inf` ("inf").
        loss: "ce" (cross-entropy) or "dlr" (difference of logits ratio; needs
            3 classes, 4 when targeted).
        targeted: Maximise the targeted loss towards each target class in
            turn (AutoAttack's APGD-T is `loss="dlr", targeted=True`).
        target_classes: How many target classes (at most classes - 1).
        steps: Iterations per run, >= 1 (AutoAttack: 100).
        restarts: Runs per target, >= 1, each from a new random start.
        seed: Integer for reproducible starts; None draws a fresh seed. Run
            r of target t draws from `seed` folded with t, then r, so more
            restarts or targets repeat the earlier runs exactly.
        clip: The box (low, high) inputs live in, or None for no box.
        rho: The share of rising steps below which the step size is halved.
        random_start: Start at a random point of the sphere; False starts at x.
        from_logits: Whether the outputs are logits; None reads the compiled
            loss's `from_logits` (logits when there is none).
        return_correct: Also return whether the model still classifies each
            example correctly at its point.
        jit_compile: True/False to force XLA on or off; None uses XLA only
            for eager calls with a GPU visible.

    Returns:
        The adversarial batch, shaped like `x`: per example a misclassified
        point if one was found, else the point of highest loss. With
        `return_correct`, `AttackResult(x_adv, correct)`.

    Raises:
        ValueError: On an invalid argument (before any work), or if the model
            has too few classes for the loss.
    """
    epsilon, p, target_classes, steps, restarts, rho, clip = _check_apgd(
        epsilon, p, loss, targeted, target_classes, steps, restarts, random_start, rho, clip
    )
    return_correct = check_bool(return_correct, "return_correct")
    seed = seed_tensor(seed)
    x, y = check_inputs(x, y)
    if from_logits is None:
        from_logits = loss_from_logits(model, None)
    classes = count_classes(model, x)
    check_classes(classes, loss, targeted)
    rank = min(target_classes, classes - 1) if targeted else 0
    clean = clean_scores(model, x, y, from_logits, classes, rank, jit_compile)
    kernel = compiled_kernel(
        model,
        None,
        _apgd_fn,
        resolve=False,
        from_logits=from_logits,
        p=p,
        steps=steps,
        objective_name=loss,
        targeted=targeted,
        rho=rho,
        random_start=random_start,
    )
    low, high = bounds(clip, x)
    epsilon = tf.constant(epsilon, x.dtype)

    def run(active, target, restart, run_seed) -> RunOutcome:
        del restart
        labels = tf.gather(clean.labels, active)
        targets = tf.gather(clean.ranking[:, target], active) if rank else labels
        result = kernel(
            tf.gather(x, active),
            labels,
            targets,
            epsilon,
            low,
            high,
            run_seed,
            jit_compile=jit_compile,
        )
        return RunOutcome(result.x_adv, result.correct, result.best_loss)

    x_adv, correct = keep_best_runs(x, clean.correct, seed, restarts, run, max(rank, 1))
    return attack_result(x_adv, correct, return_correct)


apgd_with_correct = deprecated_twin(apgd, "apgd_with_correct")
