"""The regularised objective L + sigma * ||grad_x L||_q: when its term is computed.

The objective's one home. *What* the term is, each estimator's formula, is
`keras_gradreg._estimators`; this module chooses *when* it is computed.
`RegularizedModel.train_step` computes its loss from `objective_branches`
(the gradient taken inside the branch the step chooses); `regularized_loss`
is the same computation for any `keras.Model` and a loss function, to call
inside your own `tf.GradientTape` in a custom training loop:

```python
with tf.GradientTape() as tape:
    result = kgr.regularized_loss(model, x, y, loss_fn, regularizer)
gradients = tape.gradient(result.total, model.trainable_variables)
```

Each step chooses between the plain objective (sigma = 0, or a step that
`GradientRegularizer(every=k)` skips) and the regularised one, L + every * T,
with T on a random subset of rows for `fraction < 1` (docs/method.md,
section 4): at run time, or for `regularized_loss` partly when the step is
traced (its `fixed_settings`).

The input gradient is that of the *reduced* loss, so row i is
c_i * d l_i / d x_i with c_i the loss's weight of example i (sample weight
over batch size, and over the number of replicas under a `tf.distribute`
strategy): the sum of the rows' norms is the penalty reduced exactly like
the loss, and it does not change with the batch size or replica count.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import keras
import tensorflow as tf

from keras_gradreg import _checks, _internals
from keras_gradreg._estimators import (
    ESTIMATORS,
    Forward,
    Passes,
    RegularizedLossResult,
    Rows,
    times,
    trades_divergence,  # noqa: F401 (kept importable from here)
)
from keras_gradreg._randomness import SharedRandomness
from keras_gradreg._subsets import batch_size_of, gather_rows, scale_rows, subset_rows
from keras_gradreg.gradients import floating_inputs, get_loss
from keras_gradreg.regularizer import GradientRegularizer, as_regularizer

# Loss reductions under which the loss of a random subset, reduced over the
# subset, has the whole batch's reduced loss as its expectation.
SUBSET_REDUCTIONS = ("sum_over_batch_size", "mean")

# The name inside the library (`kgr.RegularizedLoss` is a deprecated alias until 0.3.0).
RegularizedLoss = RegularizedLossResult


def regularized_loss(
    model: keras.Model,
    x: Any,
    y: Any,
    loss_fn: str | keras.losses.Loss | Callable,
    regularizer: GradientRegularizer | dict | None = None,
    sample_weight: Any = None,
    training: bool = True,
    loss_scale: float | tf.Tensor | None = None,
    step: int | tf.Tensor | tf.Variable | None = None,
    fixed_settings: bool | None = None,
) -> RegularizedLoss:
    """The regularised loss of one batch, for a custom training loop.

    What `kgr.RegularizedModel.fit` minimises, for any Keras model: call it
    inside a `tf.GradientTape` and differentiate `total`. All forward passes
    share the step's dropout masks; the pass at x + r* leaves no trace in
    the model's state. Eager, `tf.function`, XLA, and under `strategy.run`.

    With `every > 1` (or `fraction < 1`) the term is computed when
    `step % every == 0` (pass the optimizer's `iterations`, as `fit` uses);
    the choice is made at run time by a `tf.cond` around the term's own
    passes (differentiated through; the clean pass is outside it), so a
    traced step serves every step and a skipped step runs what a plain step
    does.

    **Settings read at run time, their zeros when traced.** By default (a
    `GradientRegularizer` object, `fixed_settings=None`) `sigma` and
    `clean_weight` are read from the regularizer's variables at every step,
    so assigning them between steps (a schedule such as an epsilon ramp)
    needs no retracing, while their zeros choose the traced step's form, so
    that it costs what a hand-written step of the same objective does:
    traced at sigma = 0, the step is the plain objective alone; traced at
    sigma > 0, it computes the term and gives the plain objective's values
    if sigma is later 0 (at a regularised step's cost); "adversarial"
    traced at clean_weight 0 leaves the clean loss out of `total` (if sigma
    is later 0 it then minimises the loss at the ascent's point of radius
    0: L(x) for inputs inside `clip`). While a step traced at a zero sigma
    or clean_weight exists, the regularizer refuses another value for it
    (its work is not in that step): trace a new step, or pass
    `fixed_settings=False` to schedule it away from 0. With
    `fixed_settings=False` both are read at every step and nothing is
    decided when traced (a sigma = 0 step computes the term and selects the
    plain objective; clean_weight 0 still differentiates the clean loss,
    multiplied by 0). With `fixed_settings=True` (the default for a dict or
    None, whose settings nobody can assign) they are Python numbers read
    once, when the step is traced, like any Python number in a
    `tf.function`: assigning them later does not reach a step traced
    before; trace a new `tf.function`.

    With `every > 1` or `fraction < 1` under XLA on a CPU, the steps that
    compute the term are slow on a convolutional network (XLA runs the
    convolution gradients inside a conditional as naive loops), and the
    skipped steps write zeros for the term's intermediate values
    (bench/README.md): use `fit` there, or no XLA.

    Outputs not used are not computed inside a `tf.function`: when only
    `total` is differentiated and it does not depend on the clean pass (an
    ascent from a random start at a fixed clean_weight 0), the clean
    forward pass behind `data_loss` and `y_pred` is pruned.

    Args:
        model: The Keras model; called as `model(x, training=training)`.
        x: A batch: a tensor, array or nested structure. Every floating-point
            tensor is differentiated; the norm runs over all of them.
        y: Targets for `loss_fn`.
        loss_fn: A `keras.losses.Loss`, reduced by its own `reduction` (the
            default is the batch mean, divided by the number of replicas;
            "none" is refused); or a loss name or a function `(y_true,
            y_pred) -> per-example losses`, given the default reduction.
            `model.losses` are added, as `Model.compute_loss` adds them.
            With `fraction < 1` the reduction must be the batch mean.
        regularizer: A `kgr.GradientRegularizer`, a dict of its arguments,
            or None for the defaults.
        sample_weight: Optional per-example weights for the loss; each
            example's penalty is weighted the same way.
        training: Whether the forward passes run in training mode.
        loss_scale: Under mixed precision, the input gradient is taken of
            `loss_scale * loss` and divided by it, so that float16 does not
            underflow. With a `keras.optimizers.LossScaleOptimizer`, pass
            `optimizer.scale_loss(1.0)` (and differentiate
            `optimizer.scale_loss(result.total)`). None: no scaling.
        step: The training step's index (`optimizer.iterations`): needed
            when the regularizer's `every` is above 1, ignored otherwise.
        fixed_settings: Whether sigma and clean_weight are the regularizer's
            values when the step is traced (True), read from its variables
            at every step (False), or read at every step with their zeros
            choosing the traced step's form (None; for a dict or None
            `regularizer`, None means True).

    Returns:
        A `RegularizedLossResult(total, data_loss, penalty, y_pred)`.

    Raises:
        ValueError: On a bad argument, before any work; or if `x` has no
            floating-point tensor while sigma > 0.
    """
    _check_layer_and_training(model, training)
    if fixed_settings is not None and not isinstance(fixed_settings, bool):
        raise ValueError(
            "`fixed_settings` must be True, False or None. "
            f"Received: fixed_settings={fixed_settings!r}"
        )
    if fixed_settings is None and not isinstance(regularizer, GradientRegularizer):
        fixed_settings = True  # Nobody can assign a dict's settings.
    regularizer = _shared_regularizer(regularizer)
    reduced_loss = _reduced_loss(loss_fn)
    check_loss_reduction(reduced_loss, regularizer, "loss_fn")
    if loss_scale is not None and not tf.is_tensor(loss_scale):
        loss_scale = _checks.check_positive(loss_scale, "loss_scale")
    divergence = ESTIMATORS[regularizer.method].divergence(loss_fn, sample_weight, "loss_fn")
    x = tf.nest.map_structure(_as_tensor, x)

    def forward(inputs, rows=None, example_scale=None):
        targets, weights = gather_rows((y, sample_weight), rows)
        weights = scale_rows(weights, example_scale)
        y_pred = _internals.call_model(model, inputs, training)
        loss = _with_model_losses(model, reduced_loss(targets, y_pred, sample_weight=weights))
        return y_pred, loss

    passes = Passes(model, forward, loss_scale, divergence=divergence)
    return regularized_objective(passes, x, regularizer, step, fixed_settings)


_SHARED: dict[str, GradientRegularizer] = {}


def _shared_regularizer(regularizer: Any) -> GradientRegularizer:
    """`regularizer`, or for a dict or None one `GradientRegularizer` per distinct config.

    Reused across calls, so that every trace of a `tf.function` calling
    `regularized_loss` reads the same variables (a `tf.function` may create
    variables in its first trace only).
    """
    if isinstance(regularizer, GradientRegularizer):
        return regularizer
    converted = as_regularizer(regularizer)
    return _SHARED.setdefault(repr(sorted(converted.get_config().items())), converted)


def regularized_objective(
    passes: Passes,
    x: Any,
    regularizer: GradientRegularizer,
    step: int | tf.Tensor | tf.Variable | None = None,
    fixed_settings: bool | None = False,
) -> RegularizedLoss:
    """The regularised objective of one batch, by the regularizer's estimator.

    The choice between the plain and the regularised objective (a step that
    `every` skips, or sigma = 0) is made at run time by a `tf.cond` around
    the term's passes that the caller's tape differentiates through
    (`_plain_outside_branch`); with `every=1, fraction=1` there is no
    branch (`_unless_sigma`). With
    `fixed_settings`, sigma and clean_weight are the regularizer's Python
    values at trace time and their zeros are skipped when traced; with
    `fixed_settings=None` only their zeros are fixed when traced (their
    values are read at run time).

    Args:
        passes: The model, its forward pass, loss scale, extra state and divergence.
        x: The batch's model input (tensors).
        regularizer: The settings.
        step: The training step's index; needed when `regularizer.every > 1`.
        fixed_settings: Read sigma and clean_weight when traced, not from
            their variables (True); read them at run time (False); read them
            at run time with their zeros fixed when traced (None).

    Returns:
        A `RegularizedLoss`.
    """
    if fixed_settings is None:
        return _fixed_objective(passes, x, _TracedZeros(regularizer), step)
    if fixed_settings:
        return _fixed_objective(passes, x, _FixedSettings(regularizer), step)
    branches = objective_branches(passes, x, regularizer, step)
    if len(branches.functions) == 1:  # No floating-point input: the plain objective.
        return branches.functions[0]()
    if regularizer.every == 1 and regularizer.fraction == 1.0:
        return _unless_sigma(branches.functions[1](), regularizer)
    return _plain_outside_branch(passes, x, branches)


class _FixedSettings:
    """A regularizer whose sigma and clean_weight are constants: its values when traced."""

    def __init__(self, regularizer: GradientRegularizer):
        self._regularizer = regularizer
        self._sigma = tf.constant(regularizer.sigma, tf.float32)
        self._clean_weight = tf.constant(regularizer.clean_weight, tf.float32)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._regularizer, name)

    def sigma_tensor(self) -> tf.Tensor:
        return self._sigma

    def clean_weight_tensor(self) -> tf.Tensor:
        return self._clean_weight

    def leaves_out(self, setting: str) -> None:
        """Called when the traced step leaves out the work of `setting`, 0 when traced."""

    def unless_sigma(self, result: RegularizedLoss, total: bool = True) -> RegularizedLoss:
        """`result`, with the plain objective's values when sigma is 0 at run time."""
        del total
        return result  # sigma is a constant above 0 here.


class _TracedZeros(_FixedSettings):
    """A regularizer read at run time whose zeros choose the traced step's form.

    sigma = 0 when traced: the plain objective alone; sigma > 0: the term,
    with the plain objective's values selected if sigma is later 0.
    clean_weight 0 when traced: the clean loss left out of `total`. A
    setting whose work a traced step left out is refused another value by
    the regularizer while that step exists.
    """

    def __init__(self, regularizer: GradientRegularizer):  # noqa: D107 (no constants)
        self._regularizer = regularizer

    def sigma_tensor(self) -> tf.Tensor:
        return self._regularizer.sigma_tensor()

    def clean_weight_tensor(self) -> tf.Tensor:
        return self._regularizer.clean_weight_tensor()

    def leaves_out(self, setting: str) -> None:
        if not tf.executing_eagerly():  # An eager call reads the settings at every step.
            self._regularizer._note_left_out(setting)  # noqa: SLF001

    def unless_sigma(self, result: RegularizedLoss, total: bool = True) -> RegularizedLoss:
        return _unless_sigma(result, self, total)


def _fixed_objective(passes: Passes, x, regularizer: _FixedSettings, step) -> RegularizedLoss:
    """`regularized_objective` with the zeros of sigma and clean_weight known when traced.

    sigma = 0 is the plain objective, with no branch; with `every=1,
    fraction=1` the term is computed with no branch either, and at
    clean_weight 0 "adversarial" leaves the clean loss out of `total`.
    `every > 1` and `fraction < 1` choose at run time.
    """
    if regularizer.sigma == 0.0:
        regularizer.leaves_out("sigma")
        return plain_objective(passes.forward, x)
    if regularizer.every > 1 or regularizer.fraction < 1.0:
        branches = objective_branches(passes, x, regularizer, step)
        return _plain_outside_branch(passes, x, branches)
    if not floating_inputs(x):  # Raises the missing-input error.
        objective_branches(passes, x, regularizer, step)
    estimator = ESTIMATORS[regularizer.method]
    term = term_function(passes, x, regularizer)
    if estimator.skips_clean_gradient(regularizer) and regularizer.clean_weight == 0.0:
        regularizer.leaves_out("clean_weight")
        # At a run-time sigma = 0 the ascent's radius is 0: L(x) for x in `clip`.
        return regularizer.unless_sigma(term(clean_gradient=False), total=False)
    return regularizer.unless_sigma(term())


class Branches(NamedTuple):
    """The objectives one step chooses between at run time, and its choice.

    Attributes:
        index: Which of `functions` the step computes (int32 tensor, or a
            Python int when there is no choice).
        functions: Callables `() -> RegularizedLoss`: 0 is the plain
            objective; 1 the regularised one, the estimator's entry
            (`_estimators.ESTIMATORS[method].objective`, or
            `subset_objective` with `fraction < 1`: `term_function`); 2, for
            "adversarial" with `every=1, fraction=1` only, the same without
            the clean loss's gradient (chosen when clean_weight is 0, as it
            costs less).
        counted: Whether this step is one of the `every`-th steps (a bool
            tensor): the steps whose loss and penalty `fit` logs.
    """

    index: tf.Tensor | int
    functions: tuple[Callable[[], RegularizedLoss], ...]
    counted: tf.Tensor


def objective_branches(
    passes: Passes,
    x: Any,
    regularizer: GradientRegularizer,
    step: int | tf.Tensor | tf.Variable | None = None,
) -> Branches:
    """The objectives of `regularized_objective` and the run-time choice between them.

    `RegularizedModel` runs the chosen one with its gradient taken inside
    the branch, which costs less than differentiating through the choice.

    Args:
        passes: The model, its forward pass, loss scale, extra state and divergence.
        x: The batch's model input (tensors).
        regularizer: The settings.
        step: The training step's index; needed when `regularizer.every > 1`.
    """
    counted = counted_step(regularizer, step)
    plain = functools.partial(plain_objective, passes.forward, x)
    if not floating_inputs(x):
        if regularizer.sigma > 0.0:
            raise ValueError(
                "The gradient penalty needs at least one floating-point input to "
                "differentiate the loss by. Received: input dtypes="
                f"{[t.dtype.name for t in tf.nest.flatten(x) if t is not None]}"
            )
        # sigma is 0 now; were a schedule to raise it, the NaN loss says it cannot be done.
        return Branches(
            0, (functools.partial(_plain_unless_sigma, passes.forward, x, regularizer),), counted
        )
    estimator = ESTIMATORS[regularizer.method]
    if estimator.needs_divergence and passes.divergence is None:
        raise ValueError(
            'method="trades" needs the KL of the model\'s outputs: pass `Passes.divergence` '
            "(`_estimators.Trades.divergence`). Received: divergence=None"
        )
    term = term_function(passes, x, regularizer)
    regularize = tf.logical_and(counted, regularizer.sigma_tensor() > 0.0)
    index = tf.cast(regularize, tf.int32)
    functions = [plain, term]
    if estimator.skips_clean_gradient(regularizer):
        functions.append(functools.partial(term, clean_gradient=False))
        skip = tf.logical_and(regularize, tf.equal(regularizer.clean_weight_tensor(), 0.0))
        index = tf.where(skip, 2, index)
    return Branches(index, tuple(functions), counted)


def term_function(
    passes: Passes, x: Any, regularizer: GradientRegularizer
) -> Callable[..., RegularizedLoss]:
    """L + every * T as a function of no arguments: the estimator's entry, or on a subset.

    With `fraction` = 1 it is the entry's `objective` itself (which takes
    `clean_gradient=False` too); with `fraction < 1`, `subset_objective`.
    """
    estimator = ESTIMATORS[regularizer.method]
    if regularizer.fraction < 1.0:
        return functools.partial(subset_objective, passes, x, regularizer, estimator)
    return functools.partial(estimator.objective, passes, x, regularizer, regularizer.every)


def counted_step(regularizer: GradientRegularizer, step: Any) -> tf.Tensor:
    """Whether `step` is one of the steps that compute the term: step % every == 0 (bool tensor)."""
    if regularizer.every == 1:
        return tf.constant(True)
    if step is None:
        raise ValueError(
            f"With every={regularizer.every} the regularised term is computed on every "
            f"{regularizer.every}-th step: pass the step's index (the optimizer's "
            "`iterations`) as `step`. Received: step=None"
        )
    value = tf.convert_to_tensor(step)
    if not value.dtype.is_integer or value.shape.rank != 0:
        raise ValueError(f"`step` must be an integer scalar. Received: step={step!r}")
    return tf.equal(tf.math.floormod(tf.cast(value, tf.int64), regularizer.every), 0)


def logged_objective(
    loss: RegularizedLoss, regularizer: GradientRegularizer, computed
) -> tf.Tensor:
    """The objective's value L + T that `fit` logs as `loss` (not multiplied by `every`).

    Args:
        loss: A step's `RegularizedLoss`.
        regularizer: Its settings.
        computed: Whether the step computed the term (a bool tensor).
    """
    return ESTIMATORS[regularizer.method].logged(loss, regularizer, computed)


def plain_objective(forward: Forward, x: Any) -> RegularizedLoss:
    """sigma = 0, or a step that skips the term: the clean loss alone (penalty 0)."""
    y_pred, loss = forward(x)
    return RegularizedLoss(loss, loss, tf.zeros_like(loss), y_pred)


def subset_objective(
    passes: Passes, x: Any, regularizer: GradientRegularizer, estimator
) -> RegularizedLoss:
    """L(x) on the whole batch + `every` * T on a random subset of rows (`fraction < 1`).

    The subset's passes draw the step's seeds again (they are samples of the
    same network, with masks of the subset's shape) and leave no trace in
    the model's state: the state after the step is that of a plain step.
    T is the estimator's `on_rows`.
    """
    forward = passes.forward
    with SharedRandomness(passes.model, passes.extra_state) as shared:
        y_pred, loss = forward(x)
        seed = regularizer.subset_seed_generator().next()
        indices = subset_rows(seed, batch_size_of(x), regularizer.fraction)
        rows = Rows(indices, gather_rows(x, indices), x)

        def forward_rows(inputs, subset=None, example_scale=None):
            del subset  # The rows of `rows.x` are those of `indices`.
            return forward(inputs, indices, example_scale)

        shared.keep_state()
        shared.replay()
        passes_rows = passes._replace(forward=forward_rows)
        penalty, term, overflow = estimator.on_rows(passes_rows, rows, regularizer, loss)
    total = loss + times(regularizer.every, term) + overflow
    return RegularizedLoss(total, loss, penalty, y_pred)


def check_loss_reduction(loss: Any, regularizer: GradientRegularizer, name: str) -> None:
    """Raises ValueError if a `keras.losses.Loss` in `loss` reduces unlike `regularizer` needs.

    With `fraction < 1`, a random subset's loss reduced over the subset
    estimates the batch's without bias only for the mean
    ("sum_over_batch_size", Keras's default, or "mean"); strings and
    functions get the default. "finite_difference" reads each example's part
    of the loss as its derivative with respect to the example's weight, which
    is that part only for a reduction linear in the weights: every Keras
    reduction but "mean_with_sample_weight".
    """
    for item in tf.nest.flatten(loss):
        if not isinstance(item, keras.losses.Loss):
            continue
        reduction = item.reduction
        if regularizer.fraction < 1.0 and reduction not in SUBSET_REDUCTIONS:
            raise ValueError(
                "With `fraction` < 1 the term is computed on a subset of each batch and "
                f"must be reduced by the batch mean, one of {SUBSET_REDUCTIONS}. Received: "
                f"{name} with reduction={reduction!r}"
            )
        if regularizer.method == "finite_difference" and reduction == "mean_with_sample_weight":
            raise ValueError(
                'method="finite_difference" weighs each example\'s loss separately, which '
                '"mean_with_sample_weight" (divided by the sum of the weights) does not '
                f"allow: use the batch mean or the sum. Received: {name} with "
                f"reduction={reduction!r}"
            )


def _plain_unless_sigma(forward: Forward, x: Any, regularizer: GradientRegularizer):
    """The plain objective, NaN if sigma > 0 (no floating-point input to differentiate)."""
    result = plain_objective(forward, x)
    nan = tf.cast(tf.where(regularizer.sigma_tensor() > 0.0, math.nan, 0.0), result.total.dtype)
    return result._replace(total=result.total + nan, penalty=result.penalty + nan)


def _plain_outside_branch(passes: Passes, x: Any, branches: Branches) -> RegularizedLoss:
    """L(x) outside any branch, plus the term's part, `total - data_loss`, in a `tf.cond`.

    `regularized_objective`'s form for a run-time choice (`every`, `fraction`)
    that the caller's tape differentiates through. Only the term's own passes
    are in the conditional, so a step that skips it runs the plain forward
    and backward passes as a plain step does (an untaken `tf.cond` costs
    nothing measurable without XLA, where a differentiated `tf.cond` holding
    the plain objective cost 1.5x: bench/README.md). The term's passes start
    from the state before the clean pass (seeds, BatchNorm statistics), so
    they draw its dropout masks and the step updates the state once.
    """
    shared = SharedRandomness(passes.model, passes.extra_state)
    shared.keep_state()
    y_pred, loss = passes.forward(x)

    def regularized():
        shared.rewind()
        term = branches.functions[1]()
        return term.total - term.data_loss, tf.cast(term.penalty, loss.dtype)

    def plain():
        return tf.zeros_like(loss), tf.zeros_like(loss)

    extra, penalty = tf.cond(tf.greater(branches.index, 0), regularized, plain)
    return RegularizedLoss(loss + extra, loss, penalty, y_pred)


def _unless_sigma(result: RegularizedLoss, regularizer, total: bool = True) -> RegularizedLoss:
    """The regularised objective's `result`, with the plain objective's values at sigma = 0.

    `regularized_objective`'s form when only sigma (and clean_weight) choose
    (`every=1, fraction=1`): a run-time branch that the caller's tape
    differentiates through costs more than the term it may skip. XLA's CPU
    backend runs the convolutions of a conditional's branch as naive loops
    (76x a plain step on a small CNN); without XLA the differentiated
    `tf.cond` cost 1.5x the same objective without it (bench/README.md). A
    sigma = 0 step costs a regularised step here; `fit` skips the term.
    With `total=False` only the penalty is selected (`total` left out the
    clean loss, whose gradient selecting it would cost).
    """
    regularize = regularizer.sigma_tensor() > 0.0
    if total:
        result = result._replace(total=tf.where(regularize, result.total, result.data_loss))
    return result._replace(
        penalty=tf.where(regularize, result.penalty, tf.zeros_like(result.penalty))
    )


def _check_layer_and_training(model: Any, training: Any) -> None:
    if not isinstance(model, keras.layers.Layer):
        raise ValueError(f"`model` must be a Keras model or layer. Received: model={model!r}")
    if not isinstance(training, bool):
        raise ValueError(f"`training` must be True or False. Received: training={training!r}")


def _as_tensor(value: Any) -> Any:
    return value if value is None or tf.is_tensor(value) else tf.convert_to_tensor(value)


def _reduced_loss(loss_fn: Any) -> keras.losses.Loss:
    """`loss_fn` as a Keras `Loss` that reduces to a scalar."""
    loss_fn = get_loss(loss_fn, name="loss_fn")
    if isinstance(loss_fn, keras.losses.Loss):
        if loss_fn.reduction in (None, "none"):
            raise ValueError(
                "`loss_fn` must reduce the batch to a scalar (the penalty is reduced "
                f"like it). Received: loss_fn with reduction={loss_fn.reduction!r}"
            )
        return loss_fn
    return _PerExampleLoss(loss_fn)


class _PerExampleLoss(keras.losses.Loss):
    """A function `(y_true, y_pred) -> per-example losses` with Keras's default reduction."""

    def __init__(self, fn: Callable):
        super().__init__(name="loss_fn")
        self.fn = fn

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred)


def _scale_for_replicas(value: tf.Tensor) -> tf.Tensor:
    """`value` / replicas in sync, as Keras scales losses under a tf.distribute strategy."""
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return value if replicas == 1 else value * tf.cast(1.0 / replicas, value.dtype)


def unscale_for_replicas(value: tf.Tensor) -> tf.Tensor:
    """`value` * replicas in sync: a per-replica loss back on the global scale."""
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return value if replicas == 1 else value * tf.cast(replicas, value.dtype)


def _with_model_losses(model: keras.layers.Layer, loss: tf.Tensor) -> tf.Tensor:
    """`loss` plus `model.losses`, each summed and scaled for replicas as Keras does."""
    if loss.shape.rank != 0:
        raise ValueError(
            "`loss_fn` must reduce the batch to a scalar. Received: a loss of "
            f"shape {tuple(loss.shape)}"
        )
    losses = [loss]
    for extra in model.losses:
        if not extra.dtype.is_floating:
            extra = tf.cast(extra, keras.backend.floatx())
        losses.append(_scale_for_replicas(tf.reduce_sum(extra)))
    return losses[0] if len(losses) == 1 else keras.ops.sum(losses)
