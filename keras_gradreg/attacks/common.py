"""What every attack shares: argument checks, labels, the box, seeds, restarts and kernels.

A kernel is an attack's inner loop written as one Python function of tensors
and traced once per model, loss and static setting (`compiled_kernel`);
numbers that vary between calls (epsilon, the box, seeds) are tensor
arguments, so they never retrace.
"""

from __future__ import annotations

import json
import warnings
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import keras
import numpy as np
import tensorflow as tf

from keras_gradreg import _deprecated
from keras_gradreg._ascent import box  # noqa: F401  (the attacks' box, re-exported)
from keras_gradreg._checks import Clip, check_bool, check_count, check_seed
from keras_gradreg.balls import ALG
from keras_gradreg.gradients import LossLike, loss_from_logits, resolve_loss  # noqa: F401

# ---------------------------------------------------------------------- #
# Inputs, seeds and the box.
# ---------------------------------------------------------------------- #


def check_inputs(x: Any, y: Any) -> tuple[tf.Tensor, Any]:
    """`x` as a floating tensor batch and `y` as tensors; raises on missing labels."""
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


def seed_tensor(seed: Any) -> tf.Tensor:
    """A stateless seed of shape (2,): from an int, a tensor, or fresh if None."""
    if tf.is_tensor(seed):
        return tf.cast(seed, tf.int64)
    seed = check_seed(seed)
    if seed is None:
        return tf.random.uniform([2], 0, 2**31 - 1, dtype=tf.int64)
    return tf.constant([seed, 0], dtype=tf.int64)


def bounds(clip: Clip, x: tf.Tensor):
    """The box as tensors in the dtype of `x`, or (None, None)."""
    if clip is None:
        return None, None
    return tuple(tf.cast(tf.convert_to_tensor(bound), x.dtype) for bound in clip)


# ---------------------------------------------------------------------- #
# What an attack returns.
# ---------------------------------------------------------------------- #


class AttackResult(NamedTuple):
    """An attack's points and whether the model still gets each example right there.

    Attributes:
        x_adv: The adversarial batch, shaped like `x`.
        correct: Per example, whether the model classifies `x_adv` correctly
            (shape (batch,), bool).
    """

    x_adv: tf.Tensor
    correct: tf.Tensor


def attack_result(x_adv: Any, correct: Any, return_correct: bool) -> tf.Tensor | AttackResult:
    """`AttackResult(x_adv, correct)` with `return_correct`, else `x_adv` alone."""
    if return_correct:
        return AttackResult(tf.convert_to_tensor(x_adv), tf.convert_to_tensor(correct))
    return tf.convert_to_tensor(x_adv)


REMOVED_IN = _deprecated.REMOVED_IN


def deprecated_twin(attack: Callable, old_name: str) -> Callable[..., AttackResult]:
    """`old_name`, the former `*_with_correct` twin of `attack`: warns, then calls it.

    The twin takes the attack's arguments and returns what
    `attack(..., return_correct=True)` returns.
    """
    replacement = f"kgr.attacks.{attack.__name__}(..., return_correct=True)"

    def twin(*args: Any, **kwargs: Any) -> AttackResult:
        warnings.warn(
            f"`kgr.attacks.{old_name}` is deprecated and will be removed in keras_gradreg "
            f"{REMOVED_IN}: use `{replacement}`, which returns the same "
            "AttackResult(x_adv, correct).",
            DeprecationWarning,
            stacklevel=2,
        )
        return attack(*args, return_correct=True, **kwargs)

    twin.__name__ = twin.__qualname__ = old_name
    twin.__doc__ = f"Deprecated: use `{replacement}`."
    return twin


# ---------------------------------------------------------------------- #
# Restarts.
# ---------------------------------------------------------------------- #


def check_restarts(restarts: Any, random_start: Any = True) -> int:
    """`restarts` as an int >= 1; raises if there are several without a random start.

    Without a random start every run is the same, so restarts would only
    repeat it. `random_start` must be True or False.
    """
    restarts = check_count(restarts, "restarts")
    if not check_bool(random_start, "random_start") and restarts > 1:
        raise ValueError(
            "Restarts without a random start repeat the same attack: set "
            f"`random_start=True` or `restarts=1`. Received: restarts={restarts}, "
            f"random_start={random_start!r}"
        )
    return restarts


class RunOutcome(NamedTuple):
    """One run of an attack on the examples still classified correctly.

    Attributes:
        x_adv: The run's point for each of those examples.
        correct: Whether the model still classifies each correctly there.
        score: How strong each point is (higher is stronger): among points
            that leave an example correctly classified, the strongest is kept.
            None keeps only misclassified points.
    """

    x_adv: Any
    correct: Any
    score: Any = None


def keep_best_runs(
    x: tf.Tensor,
    correct: Any,
    seed: tf.Tensor,
    restarts: int,
    run: Callable[[np.ndarray, int, int, tf.Tensor], RunOutcome],
    targets: int | None = None,
) -> AttackResult:
    """Runs an attack per target and restart on the examples no earlier run broke.

    AutoAttack's protocol: an example misclassified by a run (or at x) is
    not attacked again. Per example, the point kept is the first
    misclassified one found, else the one of highest score.

    Args:
        x: The clean batch.
        correct: Whether each example is classified correctly at x.
        seed: The attack's stateless seed. Restart r of target t draws from
            `seed` folded with t, then r (without targets, with r alone), so
            more restarts or targets repeat the earlier runs exactly.
        restarts: Runs per target.
        run: `run(active, target, restart, run_seed) -> RunOutcome`, for the
            indices `active` of the examples still correct (`target` is 0
            without targets).
        targets: The number of targets, or None for untargeted seeds.

    Returns:
        `AttackResult(x_adv, correct)` over the whole batch.
    """
    x_adv = x.numpy().copy()
    correct = np.array(correct, dtype=bool)
    # float64 holds float32 and float64 scores exactly: runs compare at full precision.
    best = np.full(len(correct), -np.inf, np.float64)
    for target in range(1 if targets is None else targets):
        target_seed = seed if targets is None else _fold_in(seed, target)
        for restart in range(restarts):
            active = np.flatnonzero(correct)
            if not len(active):
                return AttackResult(tf.constant(x_adv), tf.constant(correct))
            outcome = run(active, target, restart, _fold_in(target_seed, restart))
            run_correct = np.asarray(outcome.correct, dtype=bool)
            update = ~run_correct
            if outcome.score is not None:
                score = np.asarray(outcome.score, np.float64)
                update |= score > best[active]
                best[active[update]] = score[update]
            x_adv[active[update]] = np.asarray(outcome.x_adv)[update]
            correct[active] = run_correct
    return AttackResult(tf.constant(x_adv), tf.constant(correct))


def _fold_in(seed: tf.Tensor, data: int) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(seed, data, alg=ALG)


# ---------------------------------------------------------------------- #
# How to read a classifier's outputs.
# ---------------------------------------------------------------------- #


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
# Compiled kernels, cached per model.
# ---------------------------------------------------------------------- #

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _loss_key(loss: LossLike) -> Any:
    if isinstance(loss, keras.losses.Loss):
        return (type(loss), json.dumps(loss.get_config(), sort_keys=True, default=str))
    return loss


def _batch_spec(value: Any, batch: int) -> Any:
    """A tensor's spec with dimension 0 unknown if it is `batch` long; other values as they are."""
    if not tf.is_tensor(value):
        return value
    shape = value.shape
    if shape.rank and shape[0] == batch:
        shape = tf.TensorShape([None]).concatenate(shape[1:])
    return tf.TensorSpec(shape, value.dtype)


class Kernel:
    """A Python attack function traced as a graph, with XLA where it helps.

    By default XLA is used only when a GPU is visible and the call is eager:
    on CPU it made the attack loops slower (bench/README.md). If the model
    does not compile with XLA, the kernel falls back to the plain graph once
    and for all, with a warning.
    """

    def __init__(self, fn: Callable):
        self._graph = tf.function(fn, reduce_retracing=True)
        self._xla = tf.function(fn, jit_compile=True, reduce_retracing=True)
        self._xla_works: bool | None = None
        self._traced: set = set()

    def _run(self, function, args):
        """Traces `function` for any batch size before its first call with these shapes.

        Without this, tf.function traces the first batch size it sees, then
        again for a generalised one (and TensorFlow warns about frequent
        retracing, counting every kernel of the same Python function). Here
        dimension 0 of every tensor as long as the batch is left unknown, so
        a kernel traces once per input shape, whatever the batch sizes.
        """
        if tf.executing_eagerly() and args and tf.is_tensor(args[0]) and args[0].shape.rank:
            batch = args[0].shape[0]
            specs = tf.nest.map_structure(lambda value: _batch_spec(value, batch), args)
            key = (id(function), repr(specs))
            if key not in self._traced:
                function.get_concrete_function(*specs)
                self._traced.add(key)
        return function(*args)

    def __call__(self, *args, jit_compile: bool | None = None):
        if jit_compile is None:
            jit_compile = (
                self._xla_works is not False
                and tf.executing_eagerly()
                and bool(tf.config.list_logical_devices("GPU"))
            )
            if not jit_compile:
                return self._run(self._graph, args)
            try:
                result = self._run(self._xla, args)
            except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as error:
                if self._xla_works:
                    raise
                self._xla_works = False
                warnings.warn(
                    f"The attack could not be compiled with XLA; running it without. ({error})",
                    stacklevel=3,
                )
                return self._run(self._graph, args)
            self._xla_works = True
            return result
        return self._run(self._xla, args) if jit_compile else self._run(self._graph, args)


_FROM_LOSS = "from the loss"


def compiled_kernel(
    model: keras.Model,
    loss: LossLike,
    builder: Callable,
    *,
    resolve: bool = True,
    from_logits: bool | None | str = _FROM_LOSS,
    **static,
) -> Kernel:
    """The cached `Kernel` of `builder(model_ref, loss_fn, from_logits, **static)`.

    One kernel per model, loss and static setting; numbers that vary between
    calls (epsilon, bounds, seeds) are tensor arguments and do not retrace.
    With `loss=None` the key is the model's current compiled loss, so a
    recompiled model gets a new kernel.

    Args:
        model: The attacked model (held by a weak reference).
        loss: A Keras loss, a callable, or None for the compiled loss.
        builder: Makes the Python function to trace.
        resolve: Whether the kernel needs a loss function; if False,
            `loss_fn` is None.
        from_logits: How to read the outputs; by default the loss's
            `from_logits` (`loss_from_logits`).
        **static: Settings fixed at trace time (part of the cache key).
    """
    effective_loss = loss if loss is not None else getattr(model, "loss", None)
    key = (
        builder,
        loss is None,
        _loss_key(effective_loss),
        from_logits,
        tuple(sorted(static.items())),
    )
    per_model = _CACHE.setdefault(model, {})
    if key not in per_model:
        loss_fn = resolve_loss(model, loss) if resolve else None
        if from_logits == _FROM_LOSS:
            from_logits = loss_from_logits(model, loss)
        per_model[key] = Kernel(builder(weakref.ref(model), loss_fn, from_logits, **static))
    return per_model[key]
