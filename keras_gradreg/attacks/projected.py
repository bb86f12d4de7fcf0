"""FGSM and PGD in the family's p-norms (ball geometry in `keras_gradreg.balls`).

FGSM takes one step of the closed-form worst-case perturbation r* (docs/method.md,
section 1), which is optimal for a linear model. PGD repeats steepest-ascent
steps of the same form and projects back onto the ball (exactly, the L1 ball
by the sort-based algorithm of Duchi et al. 2008) and then into the box.

Both attack each example through the gradient of its own loss, so results do
not depend on the batch or on the number of replicas. They are compiled with
`tf.function` (with XLA when called eagerly with a GPU) and work on a batch
inside `tf.data.Dataset.map` or `strategy.run` too.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import tensorflow as tf

from keras_gradreg import _hashing as hashing
from keras_gradreg._ascent import ascent_step
from keras_gradreg._checks import (
    Clip,
    check_bool,
    check_choice,
    check_clip,
    check_count,
    check_nonnegative,
)
from keras_gradreg.attacks.common import (
    AttackResult,
    attack_result,
    bounds,
    box,
    check_inputs,
    check_restarts,
    compiled_kernel,
    correct_predictions,
    deprecated_twin,
    seed_tensor,
)
from keras_gradreg.balls import ball_norm, random_in_ball
from keras_gradreg.gradients import LossLike, loss_and_input_gradient, per_example_loss
from keras_gradreg.norms import PValue, canonical_p, worst_case_perturbation


def loss_and_gradient(model, loss_fn, from_logits, x, y):
    """Per-example losses, correctness and input gradients at x."""
    losses, y_pred, gradient = loss_and_input_gradient(model, x, y, loss_fn)
    return losses, correct_predictions(y, y_pred, from_logits), gradient


def _fgsm_fn(model_ref, loss_fn, from_logits, p):
    def run(x, y, epsilon, low, high):
        model = model_ref()
        _, _, gradient = loss_and_gradient(model, loss_fn, from_logits, x, y)
        x_adv = box(x + worst_case_perturbation(gradient, p, epsilon), low, high)
        y_pred = model(x_adv, training=False)
        return x_adv, correct_predictions(y, y_pred, from_logits)

    return run


def _pgd_fn(model_ref, loss_fn, from_logits, p, steps, restarts, random_start, keep):
    def keep_best(best, x_adv, losses, correct):
        """Per example: a misclassified point beats a correct one, then the higher loss."""
        best_x, best_loss, best_correct = best
        wrong, best_wrong = ~correct, ~best_correct
        better = (wrong & best_correct) | ((wrong == best_wrong) & (losses > best_loss))
        mask = tf.reshape(better, [-1] + [1] * (x_adv.shape.rank - 1))
        return (
            tf.where(mask, x_adv, best_x),
            tf.where(better, losses, best_loss),
            tf.where(better, correct, best_correct),
        )

    def run(x, y, epsilon, step_size, low, high, seed):
        model = model_ref()
        epsilon = tf.cast(epsilon, x.dtype)
        step_size = tf.cast(step_size, x.dtype)

        def start_point(restart):
            if not random_start:
                return x
            start = random_in_ball(tf.shape(x), p, epsilon, hashing.fold_in(seed, restart), x.dtype)
            return box(x + start, low, high)

        if keep == "last":
            x_adv = start_point(0)
            for _ in tf.range(steps):
                _, _, gradient = loss_and_gradient(model, loss_fn, from_logits, x_adv, y)
                x_adv = ascent_step(x, x_adv, gradient, p, step_size, epsilon, low, high)
            return x_adv, correct_predictions(y, model(x_adv, training=False), from_logits)

        y_pred = model(x, training=False)
        best = (
            x,
            per_example_loss(loss_fn, y, y_pred),
            correct_predictions(y, y_pred, from_logits),
        )
        for restart in tf.range(restarts):
            x_adv = start_point(restart)
            for _ in tf.range(steps):
                losses, correct, gradient = loss_and_gradient(model, loss_fn, from_logits, x_adv, y)
                best = keep_best(best, x_adv, losses, correct)
                x_adv = ascent_step(x, x_adv, gradient, p, step_size, epsilon, low, high)
            y_pred = model(x_adv, training=False)
            losses = per_example_loss(loss_fn, y, y_pred)
            best = keep_best(best, x_adv, losses, correct_predictions(y, y_pred, from_logits))
        return best[0], best[2]

    return run


# ---------------------------------------------------------------------- #
# Public attacks.
# ---------------------------------------------------------------------- #


def fgsm(
    model: keras.Model,
    x: Any,
    y: Any,
    epsilon: float,
    p: PValue = math.inf,
    loss: LossLike = None,
    clip: Clip = (0.0, 1.0),
    *,
    return_correct: bool = False,
    jit_compile: bool | None = None,
) -> tf.Tensor | AttackResult:
    """One step of the family's worst-case perturbation, clipped to the box.

    x_adv = clip(x + r*) with r* = argmax over ||r||_p <= epsilon of g . r and
    g the gradient of each example's loss (sign step for p = inf).

    Args:
        model: A Keras classifier (logits or probabilities).
        x: A batch of inputs (a single floating tensor).
        y: Labels for `loss`.
        epsilon: Radius of the p-ball, >= 0.
        p: Any p >= 1, `math.inf` or "inf".
        loss: A Keras loss or callable `(y_true, y_pred)`; None for the
            model's compiled loss. Its `from_logits` says how to read outputs.
        clip: The box (low, high) inputs live in, or None for no box.
        return_correct: Also return whether the model still classifies each
            example correctly at its point.
        jit_compile: True/False to force XLA on or off; None uses XLA only
            for eager calls with a GPU visible (on CPU it was slower).

    Returns:
        The adversarial batch, shaped like `x`; with `return_correct`,
        `AttackResult(x_adv, correct)`.
    """
    epsilon = check_nonnegative(epsilon, "epsilon")
    p = canonical_p(p)
    clip = check_clip(clip)
    return_correct = check_bool(return_correct, "return_correct")
    x, y = check_inputs(x, y)
    low, high = bounds(clip, x)
    kernel = compiled_kernel(model, loss, _fgsm_fn, p=p)
    x_adv, correct = kernel(x, y, tf.constant(epsilon, x.dtype), low, high, jit_compile=jit_compile)
    return attack_result(x_adv, correct, return_correct)


fgsm_with_correct = deprecated_twin(fgsm, "fgsm_with_correct")


def pgd(
    model: keras.Model,
    x: Any,
    y: Any,
    epsilon: float,
    p: PValue = math.inf,
    steps: int = 40,
    step_size: float | None = None,
    random_start: bool = True,
    restarts: int = 1,
    loss: LossLike = None,
    clip: Clip = (0.0, 1.0),
    seed: int | None = None,
    keep: str = "best",
    *,
    return_correct: bool = False,
    jit_compile: bool | None = None,
) -> tf.Tensor | AttackResult:
    """Projected steepest ascent on each example's loss in a p-ball and a box.

    Each step moves by `step_size` along the steepest-ascent direction of the
    p-norm (sign for inf, normalised gradient for 2, the largest coordinate
    for 1; coordinates pushing against the box are skipped for p = 1, 2),
    then projects exactly onto the p-ball around `x` and clips to the box.
    Per example, the strongest point over all steps and restarts is returned:
    misclassified if any was (the clean input counts), else the highest loss
    (`keep="last"`: the last iterate, as the multi-step members of the family
    train on). The step and the random start are those of the family's
    multi-step members (`keras_gradreg._ascent`).

    Args:
        model: A Keras classifier (logits or probabilities).
        x: A batch of inputs (a single floating tensor).
        y: Labels for `loss`.
        epsilon: Radius of the p-ball, >= 0.
        p: 1, 2, `math.inf` or "inf".
        steps: Ascent steps per restart, >= 1.
        step_size: Length of each step in the p-norm; None for
            2.5 * epsilon / steps (Madry et al. 2018).
        random_start: Start each restart at a uniform point of the ball.
        restarts: Number of random starts, >= 1.
        loss: A Keras loss or callable; None for the model's compiled loss.
        clip: The box (low, high) inputs live in, or None for no box.
        seed: Integer for reproducible random starts; None draws a fresh seed.
            The same seed gives the same starts eagerly, in graphs and under XLA.
        keep: "best" (the strongest point) or "last" (the last iterate; one restart).
        return_correct: Also return whether the model still classifies each
            example correctly at its point.
        jit_compile: True/False to force XLA on or off; None uses XLA only
            for eager calls with a GPU visible (on CPU it was slower).

    Returns:
        The adversarial batch, shaped like `x`; with `return_correct`,
        `AttackResult(x_adv, correct)`.
    """
    epsilon = check_nonnegative(epsilon, "epsilon")
    p = ball_norm(p)
    steps = check_count(steps, "steps")
    restarts = check_restarts(restarts, random_start)
    if step_size is None:
        step_size = 2.5 * epsilon / steps
    else:
        step_size = check_nonnegative(step_size, "step_size")
    keep = check_choice(keep, "keep", ("best", "last"))
    if keep == "last" and restarts > 1:
        raise ValueError(
            "`keep='last'` returns one run's last iterate: it takes `restarts=1`. "
            f"Received: restarts={restarts}"
        )
    clip = check_clip(clip)
    return_correct = check_bool(return_correct, "return_correct")
    seed = seed_tensor(seed)
    x, y = check_inputs(x, y)
    low, high = bounds(clip, x)
    kernel = compiled_kernel(
        model,
        loss,
        _pgd_fn,
        p=p,
        steps=steps,
        restarts=restarts,
        random_start=bool(random_start),
        keep=keep,
    )
    x_adv, correct = kernel(
        x,
        y,
        tf.constant(epsilon, x.dtype),
        tf.constant(step_size, x.dtype),
        low,
        high,
        seed,
        jit_compile=jit_compile,
    )
    return attack_result(x_adv, correct, return_correct)


pgd_with_correct = deprecated_twin(pgd, "pgd_with_correct")
