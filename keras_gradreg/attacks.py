"""FGSM and PGD in the family's p-norms (ball geometry in `keras_gradreg.balls`).

FGSM takes one step of the closed-form worst-case perturbation r* (PAPER.md,
section 1), which is optimal for a linear model. PGD repeats steepest-ascent
steps of the same form and projects back onto the ball (exactly, the L1 ball
by the sort-based algorithm of Duchi et al. 2008) and then into the box.

Both attack each example through the gradient of its own loss, so results do
not depend on the batch or on the number of replicas. They are compiled with
`tf.function` (with XLA when called eagerly and the model compiles) and work
on a batch inside `tf.data.Dataset.map` or `strategy.run` too.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_gradreg.balls import (  # noqa: F401  (re-exported as kgr.attacks.*)
    _ALG,
    BALL_NORMS,
    ball_norm,
    project_ball,
    project_l1,
    project_l2,
    project_linf,
    random_in_ball,
    random_on_sphere,
    random_signs,
)
from keras_gradreg.gradients import LossLike, per_example_loss, resolve_loss
from keras_gradreg.norms import PValue, canonical_p, worst_case_perturbation

PGD_NORMS = BALL_NORMS
Clip = tuple[Any, Any] | None

# ---------------------------------------------------------------------- #
# Losses, labels and correctness.
# ---------------------------------------------------------------------- #


def loss_from_logits(model: keras.Model, loss: LossLike = None) -> bool | None:
    """Whether `loss` (the compiled loss if None) expects logits.

    Returns:
        True or False as read from the loss's `from_logits` (a Keras loss
        object, a loss name, a Keras loss function or a `functools.partial`
        of one), or None when the loss has no such setting.
    """
    if loss is None:
        loss = getattr(model, "loss", None)
    if isinstance(loss, str):
        try:
            loss = keras.losses.get(loss)
        except ValueError:
            return None
    if isinstance(loss, keras.losses.Loss):
        config = loss.get_config()
        return bool(config["from_logits"]) if "from_logits" in config else None
    if isinstance(loss, functools.partial):
        if "from_logits" in loss.keywords:
            return bool(loss.keywords["from_logits"])
        loss = loss.func
    if callable(loss):
        try:
            parameter = inspect.signature(loss).parameters.get("from_logits")
        except (TypeError, ValueError):
            return None
        if parameter is not None and parameter.default is not inspect.Parameter.empty:
            return bool(parameter.default)
    return None


def correct_predictions(y: Any, y_pred: tf.Tensor, from_logits: bool | None) -> tf.Tensor:
    """Per-example correctness of a classifier's outputs, shape (batch,) bool.

    Args:
        y: Integer labels (shape (batch,) or (batch, 1)) or one-hot /
            probability targets shaped like `y_pred`.
        y_pred: Scores of shape (batch, classes), or (batch,) / (batch, 1)
            for a binary classifier.
        from_logits: For a binary classifier, the decision threshold is 0 if
            True and 0.5 otherwise.
    """
    y_pred = tf.convert_to_tensor(y_pred)
    y = tf.convert_to_tensor(y)
    classes = y_pred.shape[-1] if y_pred.shape.rank >= 2 else 1
    if classes is not None and classes > 1:
        predicted = tf.argmax(y_pred, axis=-1, output_type=tf.int32)
        if y.shape.rank == y_pred.shape.rank and y.shape[-1] == classes:
            label = tf.argmax(y, axis=-1, output_type=tf.int32)
        else:
            label = tf.reshape(tf.cast(y, tf.int32), tf.shape(predicted))
        hit = tf.equal(predicted, label)
    else:
        threshold = 0.0 if from_logits else 0.5
        predicted = tf.cast(y_pred, tf.float32) > threshold
        label = tf.reshape(tf.cast(y, tf.float32), tf.shape(predicted)) > 0.5
        hit = tf.equal(predicted, label)
    hit = tf.reshape(hit, [tf.shape(hit)[0], -1])
    return tf.reduce_all(hit, axis=1)


# ---------------------------------------------------------------------- #
# Argument checks.
# ---------------------------------------------------------------------- #


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


def check_epsilon(epsilon: Any, name: str = "epsilon") -> float:
    """Validates a radius: a finite number >= 0."""
    if not _is_number(epsilon) or not math.isfinite(float(epsilon)) or float(epsilon) < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0. Received: {name}={epsilon!r}")
    return float(epsilon)


def _check_count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1. Received: {name}={value!r}")
    return int(value)


def check_clip(clip: Clip) -> Clip:
    """Validates `clip`: None or a pair (low, high) with low < high."""
    if clip is None:
        return None
    if not isinstance(clip, (tuple, list)) or len(clip) != 2:
        raise ValueError(f"`clip` must be None or a pair (low, high). Received: clip={clip!r}")
    try:
        low, high = (np.asarray(bound, dtype=np.float64) for bound in clip)
        ordered = bool(np.all(low < high))
    except (TypeError, ValueError):
        ordered = False
    if not ordered:
        raise ValueError(
            f"`clip` must be a pair (low, high) with low < high. Received: clip={clip!r}"
        )
    return (clip[0], clip[1])


def _check_inputs(x: Any, y: Any) -> tuple[tf.Tensor, Any]:
    if y is None:
        raise ValueError("The attacks need labels: `y` must not be None. Received: y=None")
    x = tf.convert_to_tensor(x)
    if not x.dtype.is_floating:
        x = tf.cast(x, tf.float32)
    if x.shape.rank is not None and x.shape.rank < 2:
        raise ValueError(
            f"`x` must be a batch (rank >= 2). Received: x with shape {tuple(x.shape)}"
        )
    return x, tf.nest.map_structure(tf.convert_to_tensor, y)


# ---------------------------------------------------------------------- #
# Compiled attack kernels, cached per model.
# ---------------------------------------------------------------------- #

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _loss_key(loss: LossLike) -> Any:
    if isinstance(loss, keras.losses.Loss):
        return (type(loss), json.dumps(loss.get_config(), sort_keys=True, default=str))
    return loss


class _Kernel:
    """A Python attack function traced as a graph, with XLA where it helps.

    On CPU, XLA made PGD about two times slower on small MLPs and convnets
    (measured with TF 2.21), so by default it is used only when a GPU is
    visible and the call is eager; if the model does not compile, the
    kernel falls back to the plain graph once and for all.
    """

    def __init__(self, fn: Callable):
        self._graph = tf.function(fn, reduce_retracing=True)
        self._xla = tf.function(fn, jit_compile=True, reduce_retracing=True)
        self._xla_works: bool | None = None

    def __call__(self, *args, jit_compile: bool | None = None):
        if jit_compile is None:
            jit_compile = (
                self._xla_works is not False
                and tf.executing_eagerly()
                and bool(tf.config.list_logical_devices("GPU"))
            )
            if not jit_compile:
                return self._graph(*args)
            try:
                result = self._xla(*args)
            except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as error:
                if self._xla_works:
                    raise
                self._xla_works = False
                warnings.warn(
                    f"The attack could not be compiled with XLA; running it without. ({error})",
                    stacklevel=3,
                )
                return self._graph(*args)
            self._xla_works = True
            return result
        return self._xla(*args) if jit_compile else self._graph(*args)


def compiled_kernel(model: keras.Model, loss: LossLike, builder: Callable, **static) -> _Kernel:
    """The cached `_Kernel` of `builder(model_ref, loss_fn, from_logits, **static)`.

    One kernel per model, loss and static setting; numbers that vary between
    calls (epsilon, bounds, seeds) are tensor arguments and do not retrace.
    With `loss=None` the key is the model's current compiled loss, so a
    recompiled model gets a new kernel.
    """
    effective_loss = loss if loss is not None else getattr(model, "loss", None)
    key = (builder, loss is None, _loss_key(effective_loss), tuple(sorted(static.items())))
    per_model = _CACHE.setdefault(model, {})
    if key not in per_model:
        loss_fn = resolve_loss(model, loss)
        from_logits = loss_from_logits(model, loss)
        per_model[key] = _Kernel(builder(weakref.ref(model), loss_fn, from_logits, **static))
    return per_model[key]


def loss_and_gradient(model, loss_fn, from_logits, x, y):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y_pred = model(x, training=False)
        losses = per_example_loss(loss_fn, y, y_pred)
        total = tf.reduce_sum(losses)
    gradient = tape.gradient(total, x)
    if gradient is None:
        gradient = tf.zeros_like(x)
    return losses, correct_predictions(y, y_pred, from_logits), gradient


def _box(x, low, high):
    return x if low is None else tf.clip_by_value(x, low, high)


def _fgsm_fn(model_ref, loss_fn, from_logits, p):
    def run(x, y, epsilon, low, high):
        model = model_ref()
        _, _, gradient = loss_and_gradient(model, loss_fn, from_logits, x, y)
        x_adv = _box(x + worst_case_perturbation(gradient, p, epsilon), low, high)
        y_pred = model(x_adv, training=False)
        return x_adv, correct_predictions(y, y_pred, from_logits)

    return run


def _pgd_fn(model_ref, loss_fn, from_logits, p, steps, restarts, random_start):
    def keep_best(best, x_adv, losses, correct):
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
        y_pred = model(x, training=False)
        best = (
            x,
            per_example_loss(loss_fn, y, y_pred),
            correct_predictions(y, y_pred, from_logits),
        )
        for restart in tf.range(restarts):
            if random_start:
                restart_seed = tf.random.experimental.stateless_fold_in(seed, restart, alg=_ALG)
                start = random_in_ball(tf.shape(x), p, epsilon, restart_seed, x.dtype)
                x_adv = _box(x + start, low, high)
            else:
                x_adv = x
            for _ in tf.range(steps):
                losses, correct, gradient = loss_and_gradient(model, loss_fn, from_logits, x_adv, y)
                best = keep_best(best, x_adv, losses, correct)
                if low is not None and not math.isinf(p):
                    # Only move along coordinates that can still move inside the box.
                    blocked = ((x_adv >= high) & (gradient > 0)) | ((x_adv <= low) & (gradient < 0))
                    gradient = tf.where(blocked, tf.zeros_like(gradient), gradient)
                x_adv = x_adv + worst_case_perturbation(gradient, p, step_size)
                x_adv = _box(x + project_ball(x_adv - x, p, epsilon), low, high)
            y_pred = model(x_adv, training=False)
            losses = per_example_loss(loss_fn, y, y_pred)
            best = keep_best(best, x_adv, losses, correct_predictions(y, y_pred, from_logits))
        return best[0], best[2]

    return run


def _bounds(clip: Clip, x: tf.Tensor):
    if clip is None:
        return None, None
    return tuple(tf.cast(tf.convert_to_tensor(bound), x.dtype) for bound in clip)


def _seed_tensor(seed: Any) -> tf.Tensor:
    if tf.is_tensor(seed):
        return tf.cast(seed, tf.int64)
    if seed is None:
        return tf.random.uniform([2], 0, 2**31 - 1, dtype=tf.int64)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"`seed` must be an integer or None. Received: seed={seed!r}")
    return tf.constant([int(seed), 0], dtype=tf.int64)


# ---------------------------------------------------------------------- #
# Public attacks.
# ---------------------------------------------------------------------- #


def fgsm_with_correct(model, x, y, epsilon, p=math.inf, loss=None, clip=(0.0, 1.0), **kw):
    """`fgsm` that also returns the per-example correctness at the result."""
    epsilon = check_epsilon(epsilon)
    p = canonical_p(p)
    clip = check_clip(clip)
    x, y = _check_inputs(x, y)
    low, high = _bounds(clip, x)
    kernel = compiled_kernel(model, loss, _fgsm_fn, p=p)
    return kernel(x, y, tf.constant(epsilon, x.dtype), low, high, **kw)


def fgsm(
    model: keras.Model,
    x: Any,
    y: Any,
    epsilon: float,
    p: PValue = math.inf,
    loss: LossLike = None,
    clip: Clip = (0.0, 1.0),
    *,
    jit_compile: bool | None = None,
) -> tf.Tensor:
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
        jit_compile: True/False to force XLA on or off; None uses XLA only
            for eager calls with a GPU visible (on CPU it was slower).

    Returns:
        The adversarial batch, shaped like `x`.
    """
    return fgsm_with_correct(model, x, y, epsilon, p, loss, clip, jit_compile=jit_compile)[0]


def pgd_with_correct(
    model,
    x,
    y,
    epsilon,
    p=math.inf,
    steps=40,
    step_size=None,
    random_start=True,
    restarts=1,
    loss=None,
    clip=(0.0, 1.0),
    seed=None,
    **kw,
):
    """`pgd` that also returns the per-example correctness at the result."""
    epsilon = check_epsilon(epsilon)
    p = ball_norm(p)
    steps = _check_count(steps, "steps")
    restarts = _check_count(restarts, "restarts")
    if step_size is None:
        step_size = 2.5 * epsilon / steps
    else:
        step_size = check_epsilon(step_size, "step_size")
    if restarts > 1 and not random_start:
        raise ValueError(
            "Restarts without a random start repeat the same attack: set "
            f"`random_start=True` or `restarts=1`. Received: restarts={restarts}"
        )
    clip = check_clip(clip)
    seed_tensor = _seed_tensor(seed)
    x, y = _check_inputs(x, y)
    low, high = _bounds(clip, x)
    kernel = compiled_kernel(
        model, loss, _pgd_fn, p=p, steps=steps, restarts=restarts, random_start=bool(random_start)
    )
    return kernel(
        x,
        y,
        tf.constant(epsilon, x.dtype),
        tf.constant(step_size, x.dtype),
        low,
        high,
        seed_tensor,
        **kw,
    )


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
    *,
    jit_compile: bool | None = None,
) -> tf.Tensor:
    """Projected steepest ascent on each example's loss in a p-ball and a box.

    Each step moves by `step_size` along the steepest-ascent direction of the
    p-norm (sign for inf, normalised gradient for 2, the largest coordinate
    for 1; coordinates pushing against the box are skipped for p = 1, 2),
    then projects exactly onto the p-ball around `x` and clips to the box.
    Per example, the strongest point over all steps and restarts is returned:
    misclassified if any was (the clean input counts), else the highest loss.

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
        jit_compile: True/False to force XLA on or off; None uses XLA only
            for eager calls with a GPU visible (on CPU it was slower).

    Returns:
        The adversarial batch, shaped like `x`.
    """
    return pgd_with_correct(
        model,
        x,
        y,
        epsilon,
        p,
        steps,
        step_size,
        random_start,
        restarts,
        loss,
        clip,
        seed,
        jit_compile=jit_compile,
    )[0]
