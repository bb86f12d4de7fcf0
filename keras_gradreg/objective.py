"""The regularised objective L + sigma * ||grad_x L||_q and its three estimators.

The objective's one home. `RegularizedModel.train_step` computes its loss
from `objective_branches` (the gradient taken inside the branch the step
chooses); `regularized_loss` is the same computation for any `keras.Model`
and a loss function, to call inside your own `tf.GradientTape` in a custom
training loop:

```python
with tf.GradientTape() as tape:
    result = kgr.regularized_loss(model, x, y, loss_fn, regularizer)
gradients = tape.gradient(result.total, model.trainable_variables)
```

Each step chooses at run time between the plain objective (sigma = 0, or a
step that `GradientRegularizer(every=k)` skips) and the regularised one,
L + every * T, with T on a random subset of rows for `fraction < 1`
(docs/method.md, section 4).

The input gradient is that of the *reduced* loss, so row i is
c_i * d l_i / d x_i with c_i the loss's weight of example i (sample weight
over batch size, and over the number of replicas under a `tf.distribute`
strategy): the sum of the rows' norms is the penalty reduced exactly like
the loss, and it does not change with the batch size or replica count.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import keras
import tensorflow as tf

from keras_gradreg import _checks, _internals
from keras_gradreg import _hashing as hashing
from keras_gradreg import _randomness as randomness
from keras_gradreg._ascent import ascent_step, box
from keras_gradreg._kl import KLDivergence
from keras_gradreg._subsets import batch_size_of, gather_rows, subset_rows
from keras_gradreg.balls import random_in_ball
from keras_gradreg.gradients import (
    concat_per_example,
    differentiate_inputs,
    floating_inputs,
    get_loss,
    loss_from_logits,
    replace_floating_inputs,
    split_per_example,
)
from keras_gradreg.norms import dual_norm, worst_case_perturbation
from keras_gradreg.regularizer import GradientRegularizer, as_regularizer

Forward = Callable[..., tuple[Any, tf.Tensor]]
"""One forward pass: `forward(x, rows=None) -> (predictions, reduced scalar loss)`.

With `GradientRegularizer(fraction < 1)` it is also called with `rows`, the
int32 indices of a subset of the batch: `x` is then those rows' input, and
the loss is that of those rows (of the targets and sample weights), reduced
over them.
"""

# Loss reductions under which the loss of a random subset, reduced over the
# subset, has the whole batch's reduced loss as its expectation.
SUBSET_REDUCTIONS = ("sum_over_batch_size", "mean")


class RegularizedLossResult(NamedTuple):
    """The regularised objective of one batch and its parts.

    Losses are scalars reduced as the loss function reduces them (under a
    `tf.distribute` strategy, Keras's default reduction also divides by the
    number of replicas).

    Attributes:
        total: The objective to differentiate: `data_loss + penalty` for
            "penalty" and "finite_difference", `clean_weight * data_loss +
            (1 - clean_weight) * penalty` for "adversarial", `data_loss` when
            sigma is 0. With `every` or `fraction` (see
            `kgr.GradientRegularizer`), `data_loss + every * T_S` on the steps
            that compute the term T and `data_loss` on the others. Under loss
            scaling, when the input gradient overflowed, it is NaN and so are
            its parameter gradients (a `LossScaleOptimizer` then skips the step).
        data_loss: The clean loss L(x) of the whole batch.
        penalty: sigma * ||g||_q ("penalty"), its finite-difference estimate
            ("finite_difference"), the loss at x + r* ("adversarial"), each
            on the step's subset with `fraction < 1` (an unbiased estimate of
            the whole batch's) and not multiplied by `every`; 0 when sigma is
            0 and on the steps that skip the term.
        y_pred: The model's output on the clean x (for metrics).
    """

    total: tf.Tensor
    data_loss: tf.Tensor
    penalty: tf.Tensor
    y_pred: Any


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

    **Settings read at run time or fixed when traced.** By default (a
    `GradientRegularizer` object) `sigma` and `clean_weight` are read from
    the regularizer's variables at every step, so assigning them between
    steps (a schedule) needs no retracing. The step then cannot know at
    trace time that either is 0: with `every=1, fraction=1` a sigma = 0
    step computes the term and selects the plain objective's values and
    gradients (the cost of a regularised step), and "adversarial" at
    clean_weight 0 still differentiates its clean loss (multiplied by 0).
    With `fixed_settings=True` (the default for a dict or None, whose
    settings nobody can assign) they are Python numbers read once, when
    the step is traced, like any Python number in a `tf.function`: sigma = 0
    traces the plain objective alone, clean_weight = 0 leaves the clean
    loss out of `total`, and a step costs what a hand-written step of the
    same constant objective does. Assigning them later does not reach a
    step traced before: trace a new `tf.function`.

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
            values when the step is traced (True) or read from its variables
            at every step (False). None: True for a dict or None
            `regularizer`, False for a `GradientRegularizer`.

    Returns:
        A `RegularizedLossResult(total, data_loss, penalty, y_pred)`.

    Raises:
        ValueError: On a bad argument, before any work; or if `x` has no
            floating-point tensor while sigma > 0.
    """
    _check_layer_and_training(model, training)
    if fixed_settings is None:
        fixed_settings = not isinstance(regularizer, GradientRegularizer)
    elif not isinstance(fixed_settings, bool):
        raise ValueError(
            "`fixed_settings` must be True, False or None. "
            f"Received: fixed_settings={fixed_settings!r}"
        )
    regularizer = _shared_regularizer(regularizer)
    reduced_loss = _reduced_loss(loss_fn)
    if regularizer.fraction < 1.0:
        check_subset_reduction(reduced_loss, "loss_fn")
    if loss_scale is not None and not tf.is_tensor(loss_scale):
        loss_scale = _checks.check_positive(loss_scale, "loss_scale")
    divergence = None
    if regularizer.method == "trades":
        divergence = trades_divergence(loss_fn, sample_weight, "loss_fn")
    x = tf.nest.map_structure(_as_tensor, x)

    def forward(inputs, rows=None):
        targets, weights = gather_rows((y, sample_weight), rows)
        y_pred = _internals.call_model(model, inputs, training)
        loss = _with_model_losses(model, reduced_loss(targets, y_pred, sample_weight=weights))
        return y_pred, loss

    return regularized_objective(
        model,
        forward,
        x,
        regularizer,
        loss_scale=loss_scale,
        step=step,
        divergence=divergence,
        fixed_settings=fixed_settings,
    )


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
    model: keras.layers.Layer,
    forward: Forward,
    x: Any,
    regularizer: GradientRegularizer,
    loss_scale: float | tf.Tensor | None = None,
    extra_state: list | tuple = (),
    step: int | tf.Tensor | tf.Variable | None = None,
    divergence: KLDivergence | None = None,
    fixed_settings: bool = False,
) -> RegularizedLoss:
    """The regularised objective of one batch, by the regularizer's estimator.

    The choice between the plain and the regularised objective (a step that
    `every` skips, or sigma = 0) is made at run time by a `tf.cond` around
    the term's passes that the caller's tape differentiates through
    (`_plain_outside_branch`); with `every=1, fraction=1` there is no
    branch (`_term_unless_sigma`). With
    `fixed_settings`, sigma and clean_weight are the regularizer's Python
    values at trace time and their zeros are skipped when traced.

    Args:
        model: The model `forward` calls (its seed generators and
            non-trainable variables are the state the passes share or restore).
        forward: The forward pass (see `Forward`).
        x: The batch's model input (tensors).
        regularizer: The settings.
        loss_scale: The mixed-precision loss scale for the input gradient, or None.
        extra_state: More variables a forward pass changes that a probing
            pass must leave untouched (e.g. per-output loss trackers).
        step: The training step's index; needed when `regularizer.every > 1`.
        divergence: The KL of "trades" (`trades_divergence`); None otherwise.
        fixed_settings: Read sigma and clean_weight when traced, not from
            their variables.

    Returns:
        A `RegularizedLoss`.
    """
    if fixed_settings:
        return _fixed_objective(
            model,
            forward,
            x,
            _FixedSettings(regularizer),
            loss_scale,
            extra_state,
            step,
            divergence,
        )
    branches = objective_branches(
        model, forward, x, regularizer, loss_scale, extra_state, step, divergence
    )
    if len(branches.functions) == 1:
        return branches.run()
    if regularizer.every == 1 and regularizer.fraction == 1.0:
        return _term_unless_sigma(branches.functions[1], regularizer)
    return _plain_outside_branch(model, forward, x, branches, extra_state)


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


def _fixed_objective(
    model, forward, x, regularizer: _FixedSettings, loss_scale, extra_state, step, divergence
) -> RegularizedLoss:
    """`regularized_objective` with sigma and clean_weight known when traced.

    sigma = 0 is the plain objective, with no branch; with `every=1,
    fraction=1` the term is computed with no branch either, and at
    clean_weight 0 "adversarial" leaves the clean loss out of `total`.
    Only `every > 1` and `fraction < 1` still choose at run time.
    """
    if regularizer.sigma == 0.0:
        return plain_objective(forward, x)
    if regularizer.every > 1 or regularizer.fraction < 1.0:
        branches = objective_branches(
            model, forward, x, regularizer, loss_scale, extra_state, step, divergence
        )
        return _plain_outside_branch(model, forward, x, branches, extra_state)
    if not floating_inputs(x):  # Raises the missing-input error.
        objective_branches(model, forward, x, regularizer, loss_scale, extra_state, step)
    skip_clean = _clean_gradient_can_be_skipped(regularizer) and regularizer.clean_weight == 0.0
    return term_objective(
        model,
        forward,
        x,
        regularizer,
        loss_scale,
        extra_state,
        clean_gradient=not skip_clean,
        divergence=divergence,
    )


class Branches(NamedTuple):
    """The objectives one step chooses between at run time, and its choice.

    Attributes:
        index: Which of `functions` the step computes (int32 tensor, or a
            Python int when there is no choice).
        functions: Callables `() -> RegularizedLoss`: 0 is the plain
            objective; 1 the regularised one; 2, for "adversarial" with
            `every=1, fraction=1` only, the same without the clean loss's
            gradient (chosen when clean_weight is 0, as it costs less).
        counted: Whether this step is one of the `every`-th steps (a bool
            tensor): the steps whose loss and penalty `fit` logs.
    """

    index: tf.Tensor | int
    functions: tuple[Callable[[], RegularizedLoss], ...]
    counted: tf.Tensor

    def run(self, wrap: Callable[[Callable], Callable] | None = None) -> Any:
        """Runs the chosen function, each wrapped by `wrap` (e.g. to take gradients inside)."""
        functions = [f if wrap is None else wrap(f) for f in self.functions]
        if len(functions) == 1:
            return functions[0]()
        return tf.switch_case(self.index, functions)


def objective_branches(
    model: keras.layers.Layer,
    forward: Forward,
    x: Any,
    regularizer: GradientRegularizer,
    loss_scale: float | tf.Tensor | None = None,
    extra_state: list | tuple = (),
    step: int | tf.Tensor | tf.Variable | None = None,
    divergence: KLDivergence | None = None,
) -> Branches:
    """The objectives of `regularized_objective` and the run-time choice between them.

    `RegularizedModel` runs the chosen one with its gradient taken inside
    the branch, which costs less than differentiating through the choice.
    """
    counted = counted_step(regularizer, step)
    plain = functools.partial(plain_objective, forward, x)
    if not floating_inputs(x):
        if regularizer.sigma > 0.0:
            raise ValueError(
                "The gradient penalty needs at least one floating-point input to "
                "differentiate the loss by. Received: input dtypes="
                f"{[t.dtype.name for t in tf.nest.flatten(x) if t is not None]}"
            )
        # sigma is 0 now; were a schedule to raise it, the NaN loss says it cannot be done.
        return Branches(
            0, (functools.partial(_plain_unless_sigma, forward, x, regularizer),), counted
        )
    if regularizer.method == "trades" and divergence is None:
        raise ValueError(
            'method="trades" needs the KL of the model\'s outputs: pass `divergence` '
            "(kgr.objective.trades_divergence). Received: divergence=None"
        )
    term = functools.partial(
        term_objective,
        model,
        forward,
        x,
        regularizer,
        loss_scale,
        extra_state,
        divergence=divergence,
    )
    regularize = tf.logical_and(counted, regularizer.sigma_tensor() > 0.0)
    index = tf.cast(regularize, tf.int32)
    functions = [plain, term]
    if _clean_gradient_can_be_skipped(regularizer):
        functions.append(functools.partial(term, clean_gradient=False))
        skip = tf.logical_and(regularize, tf.equal(regularizer.clean_weight_tensor(), 0.0))
        index = tf.where(skip, 2, index)
    return Branches(index, tuple(functions), counted)


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
    if regularizer.method != "adversarial":
        return loss.data_loss + loss.penalty
    weight = tf.cast(regularizer.clean_weight_tensor(), loss.data_loss.dtype)
    mixed = weight * loss.data_loss + (1.0 - weight) * loss.penalty
    return tf.where(computed, mixed, loss.data_loss)


def plain_objective(forward: Forward, x: Any) -> RegularizedLoss:
    """sigma = 0, or a step that skips the term: the clean loss alone (penalty 0)."""
    y_pred, loss = forward(x)
    return RegularizedLoss(loss, loss, tf.zeros_like(loss), y_pred)


def term_objective(
    model: keras.layers.Layer,
    forward: Forward,
    x: Any,
    regularizer: GradientRegularizer,
    loss_scale: float | tf.Tensor | None = None,
    extra_state: list | tuple = (),
    clean_gradient: bool = True,
    divergence: KLDivergence | None = None,
) -> RegularizedLoss:
    """The regularised objective with the term multiplied by `every`, on the batch or a subset."""
    if regularizer.fraction < 1.0:
        return subset_objective(model, forward, x, regularizer, loss_scale, extra_state, divergence)
    if regularizer.method == "penalty":
        return penalty_objective(forward, x, regularizer, loss_scale, scale=regularizer.every)
    return perturbed_objective(
        model,
        forward,
        x,
        regularizer,
        loss_scale,
        extra_state,
        scale=regularizer.every,
        clean_gradient=clean_gradient,
        divergence=divergence,
    )


def penalty_objective(
    forward: Forward,
    x: Any,
    regularizer: GradientRegularizer,
    loss_scale: float | tf.Tensor | None = None,
    scale: int = 1,
) -> RegularizedLoss:
    """L(x) + scale * sigma * ||g||_q, exact, by double backpropagation.

    The input gradient g comes from an inner tape; differentiating `total`
    with an outer tape around this call differentiates through it.
    """
    y_pred, loss, rows = _clean_pass_and_input_gradient(forward, x, loss_scale)
    penalty = _penalty(rows, regularizer, loss.dtype)
    total = loss + _times(scale, penalty) + _nan_gradient_unless_finite(penalty, loss)
    return RegularizedLoss(total, loss, penalty, y_pred)


def perturbed_objective(
    model: keras.layers.Layer,
    forward: Forward,
    x: Any,
    regularizer: GradientRegularizer,
    loss_scale: float | tf.Tensor | None = None,
    extra_state: list | tuple = (),
    scale: int = 1,
    clean_gradient: bool = True,
    divergence: KLDivergence | None = None,
) -> RegularizedLoss:
    """The "adversarial", "finite_difference" and "trades" estimators: a second pass at x + r.

    r is r*(g) with radius sigma ("adversarial") or `fd_step`
    ("finite_difference"), or the last iterate of the ascent (multi-step
    "adversarial", "trades"), held constant. The second pass draws the clean
    pass's dropout masks and leaves no trace in the model's state. The term
    is multiplied by `scale`; `clean_gradient=False` leaves the clean loss
    out of `total` (so that it is not differentiated, and inside a
    `tf.function` not computed unless `data_loss` or `y_pred` is used), valid
    only where its weight is 0 ("adversarial", clean_weight 0, scale 1).
    """
    clean, moved = _clean_and_moved_passes(
        model, forward, x, regularizer, loss_scale, extra_state, divergence
    )
    (y_pred, loss), (moved_pred, moved_loss) = clean, moved
    if regularizer.method == "adversarial":
        clean_weight, moved_weight = _adversarial_weights(regularizer, scale, loss.dtype)
        total = moved_weight * moved_loss
        if clean_gradient:
            total = clean_weight * loss + total
        return RegularizedLoss(total, loss, moved_loss, y_pred)
    if regularizer.method == "trades":
        penalty = _trades_term(regularizer, divergence, y_pred, moved_pred, loss.dtype)
    else:
        penalty = _finite_difference(regularizer, moved_loss, loss)
    return RegularizedLoss(loss + _times(scale, penalty), loss, penalty, y_pred)


def subset_objective(
    model: keras.layers.Layer,
    forward: Forward,
    x: Any,
    regularizer: GradientRegularizer,
    loss_scale: float | tf.Tensor | None = None,
    extra_state: list | tuple = (),
    divergence: KLDivergence | None = None,
) -> RegularizedLoss:
    """L(x) on the whole batch + `every` * T on a random subset of rows (`fraction < 1`).

    The subset's passes draw the step's seeds again (they are samples of the
    same network, with masks of the subset's shape) and leave no trace in
    the model's state: the state after the step is that of a plain step.
    """
    seed_states = [generator.state for generator in randomness.seed_generators(model)]
    step_randomness = randomness.snapshot(seed_states)
    y_pred, loss = forward(x)
    seed = regularizer.subset_seed_generator().next()
    rows = subset_rows(seed, batch_size_of(x), regularizer.fraction)
    x_rows = gather_rows(x, rows)

    def forward_rows(inputs, subset=None):
        del subset  # The rows of `x_rows` are those of `rows`.
        return forward(inputs, rows)

    side_state = _state_outside(model, seed_states, extra_state)
    kept_state = randomness.snapshot(side_state)
    randomness.restore(seed_states, step_randomness)
    if regularizer.method == "penalty":
        _, _, gradient_rows = _clean_pass_and_input_gradient(forward_rows, x_rows, loss_scale)
        penalty = _penalty(gradient_rows, regularizer, loss.dtype)
        term, overflow = penalty, _nan_gradient_unless_finite(penalty, loss)
    else:
        (rows_pred, rows_loss), (moved_pred, moved_loss) = _clean_and_moved_passes(
            model,
            forward_rows,
            x_rows,
            regularizer,
            loss_scale,
            extra_state,
            divergence,
            positions=global_positions(batch_size_of(x), rows),
        )
        if regularizer.method == "adversarial":
            weight = 1.0 - tf.cast(regularizer.clean_weight_tensor(), loss.dtype)
            penalty, term = moved_loss, weight * (moved_loss - rows_loss)
        elif regularizer.method == "trades":
            penalty = _trades_term(regularizer, divergence, rows_pred, moved_pred, loss.dtype, rows)
            term = penalty
        else:
            penalty = _finite_difference(regularizer, moved_loss, rows_loss)
            term = penalty
        overflow = tf.zeros_like(loss)
    randomness.restore(side_state, kept_state)
    total = loss + _times(regularizer.every, term) + overflow
    return RegularizedLoss(total, loss, penalty, y_pred)


def check_subset_reduction(loss: Any, name: str) -> None:
    """Raises ValueError unless every `keras.losses.Loss` in `loss` reduces by the batch mean.

    A random subset's loss reduced over the subset estimates the batch's
    without bias only for the mean ("sum_over_batch_size", Keras's default,
    or "mean"); strings and functions get the default.
    """
    for item in tf.nest.flatten(loss):
        reduction = getattr(item, "reduction", SUBSET_REDUCTIONS[0])
        if isinstance(item, keras.losses.Loss) and reduction not in SUBSET_REDUCTIONS:
            raise ValueError(
                "With `fraction` < 1 the term is computed on a subset of each batch and "
                f"must be reduced by the batch mean, one of {SUBSET_REDUCTIONS}. Received: "
                f"{name} with reduction={reduction!r}"
            )


# ---------------------------------------------------------------------- #
# Pieces.
# ---------------------------------------------------------------------- #


def _clean_pass_and_input_gradient(forward: Forward, x: Any, loss_scale):
    """The clean pass and the per-example gradient of its reduced loss, float32.

    Returns `(y_pred, loss, rows)`: row i of `rows` is the gradient of the
    reduced loss with respect to example i's floating inputs, flattened and
    concatenated, unscaled.
    """

    def scaled_loss(inputs):
        y_pred, loss = forward(inputs)
        target = loss if loss_scale is None else loss * tf.cast(loss_scale, loss.dtype)
        return target, (y_pred, loss)

    gradients, (y_pred, loss) = differentiate_inputs(scaled_loss, x)
    rows = concat_per_example(gradients)
    if loss_scale is not None:
        rows = rows / tf.cast(loss_scale, rows.dtype)
    return y_pred, loss, rows


def _clean_and_moved_passes(
    model,
    forward: Forward,
    x: Any,
    regularizer,
    loss_scale,
    extra_state,
    divergence=None,
    positions=None,
):
    """The clean pass and the pass at x + r, same masks, no trace: ((y_pred, loss), moved).

    `moved` is the pair (predictions, loss) at x + r. Every pass after the
    clean one (the ascent's and the moved one) redraws the clean pass's
    dropout masks, and they leave no trace in the model's state (BatchNorm
    statistics) or in `extra_state`. A NaN r (overflowed input gradient)
    makes the moved loss, hence the parameter gradients, NaN.

    Args:
        positions: The rows' positions in the global batch (random starts
            are keyed by them); None: this replica's rows of the batch.
    """
    seed_states = [generator.state for generator in randomness.seed_generators(model)]
    step_randomness = randomness.snapshot(seed_states)
    if regularizer.draws_starts:  # The ascent does not start at x: no gradient needed there.
        (y_pred, loss), rows = forward(x), None
    else:
        y_pred, loss, rows = _clean_pass_and_input_gradient(forward, x, loss_scale)
    side_state = _state_outside(model, seed_states, extra_state)
    kept_state = randomness.snapshot(side_state)

    def replay(inputs):
        randomness.restore(seed_states, step_randomness)
        return forward(inputs)

    inputs = floating_inputs(x)
    if regularizer.ascends:
        if positions is None:
            positions = global_positions(batch_size_of(x))
        ascent = _Ascent(replay, x, regularizer, loss_scale, divergence, y_pred)
        r = ascent.run(rows, positions)
    else:
        r = _closed_form_perturbation(rows, inputs, regularizer)
    steps = split_per_example(tf.stop_gradient(r), inputs)
    x_moved = replace_floating_inputs(x, [t + step for t, step in zip(inputs, steps)])
    moved = replay(x_moved)
    randomness.restore(side_state, kept_state)
    return (y_pred, loss), moved


def _closed_form_perturbation(rows, inputs, regularizer) -> tf.Tensor:
    """r* of radius sigma ("adversarial") or `fd_step`, then into the box (flat rows)."""
    adversarial = regularizer.method == "adversarial"
    radius = regularizer.sigma_tensor() if adversarial else regularizer.fd_step
    r = worst_case_perturbation(rows, regularizer.p, radius)
    if regularizer.clip is None:
        return r
    x_flat = concat_per_example(inputs)
    low, high = _clip_bounds(regularizer)
    return box(x_flat + r, low, high) - x_flat


class _Ascent:
    """The ascent of multi-step "adversarial" and "trades" on flat per-example rows.

    Args:
        replay: A forward pass with the step's masks.
        x: The clean batch.
        regularizer: The settings.
        loss_scale: Scales the ascent's objective (mixed precision).
        divergence: The KL, for "trades".
        clean_pred: f(x), the KL's fixed first argument.
    """

    def __init__(self, replay, x, regularizer, loss_scale, divergence, clean_pred):
        self.replay, self.x, self.regularizer = replay, x, regularizer
        self.loss_scale, self.divergence = loss_scale, divergence
        self.clean_pred = tf.nest.map_structure(tf.stop_gradient, clean_pred)
        self.inputs = floating_inputs(x)

    def run(self, first_gradient, positions) -> tf.Tensor:
        """r: the last iterate minus x, float32, shape (batch, input size)."""
        regularizer = self.regularizer
        x_flat = concat_per_example(self.inputs)
        sigma = regularizer.sigma_tensor()
        low, high = _clip_bounds(regularizer)
        x_adv, gradient = x_flat, first_gradient
        if regularizer.draws_starts:
            seed = regularizer.start_seed_generator().next()
            x_adv, gradient = self._start(seed, x_flat, positions, sigma, low, high), None
        step_length = regularizer.step_size * sigma
        for _ in range(regularizer.steps):
            if gradient is None:
                gradient = self._gradient(x_adv)
            x_adv = ascent_step(
                x_flat, x_adv, gradient, regularizer.p, step_length, sigma, low, high
            )
            gradient = None
        return x_adv - x_flat

    def _start(self, seed, x_flat, positions, sigma, low, high) -> tf.Tensor:
        size = tf.shape(x_flat)[1]
        if self.regularizer.method == "trades":
            # The reference code's start: x + 0.001 N(0, 1), not projected.
            return x_flat + TRADES_START_SCALE * hashing.normal(seed, positions, size)
        p = self.regularizer.p
        start = random_in_ball(tf.shape(x_flat), p, sigma, seed, positions=positions)
        return box(x_flat + start, low, high)

    def _gradient(self, x_adv: tf.Tensor) -> tf.Tensor:
        """The gradient of the ascent's objective at `x_adv` (flat rows, float32)."""
        point = replace_floating_inputs(self.x, split_per_example(x_adv, self.inputs))

        def objective(inputs):
            y_pred, loss = self.replay(inputs)
            if self.divergence is not None and self.regularizer.method == "trades":
                value = tf.reduce_sum(self.divergence.per_example(self.clean_pred, y_pred))
            else:
                value = tf.cast(loss, tf.float32)
            if self.loss_scale is not None:
                value = value * tf.cast(self.loss_scale, value.dtype)
            return value, None

        gradients, _ = differentiate_inputs(objective, point)
        return concat_per_example(gradients)


# The scale of TRADES's Gaussian start (Zhang et al.'s code).
TRADES_START_SCALE = 0.001


def global_positions(batch_size, rows: tf.Tensor | None = None) -> tf.Tensor:
    """Each row's position in the global batch (int32): replica index * batch + row.

    Random starts are keyed by it, so 1 replica and 2 draw the same numbers
    (a strategy splits the global batch into equal consecutive parts).

    Args:
        batch_size: This replica's batch size.
        rows: The rows of this replica's batch to place; None: all of them.
    """
    context = tf.distribute.get_replica_context()
    replica = 0 if context is None else context.replica_id_in_sync_group
    offset = tf.cast(replica, tf.int32) * tf.cast(batch_size, tf.int32)
    local = tf.range(batch_size) if rows is None else tf.cast(rows, tf.int32)
    return offset + local


def _clip_bounds(regularizer):
    """The ascent's box as float32 tensors, or (None, None)."""
    if regularizer.clip is None:
        return None, None
    return tuple(tf.constant(bound, tf.float32) for bound in regularizer.clip)


def _trades_term(regularizer, divergence, clean_pred, moved_pred, dtype, rows=None):
    """beta * KL(f(x) || f(x + r)), reduced like the loss, in `dtype`."""
    kl = divergence.reduced(clean_pred, moved_pred, rows)
    return tf.cast(regularizer.beta * kl, dtype)


def trades_divergence(loss: Any, sample_weight: Any, name: str = "loss") -> KLDivergence:
    """The KL of "trades" for a model trained with `loss` (which says whether outputs are logits).

    Raises:
        ValueError: If `loss` does not say whether it takes logits.
    """
    return KLDivergence(trades_from_logits(loss, name), sample_weight)


def trades_from_logits(loss: Any, name: str) -> bool:
    """Whether `loss` takes logits, read from its `from_logits`; raises if it does not say."""
    from_logits = loss_from_logits(None, loss)
    if from_logits is None:
        raise ValueError(
            'method="trades" needs to know whether the model outputs logits or '
            "probabilities: use a loss with a `from_logits` setting (e.g. "
            "keras.losses.SparseCategoricalCrossentropy(from_logits=True)). "
            f"Received: {name}={loss!r}"
        )
    return from_logits


def _penalty(rows: tf.Tensor, regularizer: GradientRegularizer, dtype) -> tf.Tensor:
    """sigma * the sum of the rows' dual norms (each row already weighted by the loss)."""
    norms = dual_norm(rows, regularizer.p)
    return tf.cast(regularizer.sigma_tensor() * tf.reduce_sum(norms), dtype)


def _finite_difference(regularizer: GradientRegularizer, moved_loss, loss) -> tf.Tensor:
    sigma = tf.cast(regularizer.sigma_tensor(), loss.dtype)
    return sigma * (moved_loss - loss) / regularizer.fd_step


def _adversarial_weights(regularizer: GradientRegularizer, scale: int, dtype):
    """Weights of L(x) and L(x + r*): (clean_weight, 1 - clean_weight), moved one times `scale`.

    The clean weight makes the two sum to 1, so that the step minimises
    L(x) + scale * (1 - clean_weight) * (L(x + r*) - L(x)).
    """
    clean_weight = tf.cast(regularizer.clean_weight_tensor(), dtype)
    if scale == 1:
        return clean_weight, 1.0 - clean_weight
    moved_weight = scale * (1.0 - clean_weight)
    return 1.0 - moved_weight, moved_weight


def _clean_gradient_can_be_skipped(regularizer: GradientRegularizer) -> bool:
    """Whether clean_weight = 0 leaves the clean loss out of the differentiated total."""
    return (
        regularizer.method == "adversarial"
        and regularizer.every == 1
        and regularizer.fraction == 1.0
    )


def _times(scale: int, value: tf.Tensor) -> tf.Tensor:
    return value if scale == 1 else scale * value


def _plain_unless_sigma(forward: Forward, x: Any, regularizer: GradientRegularizer):
    """The plain objective, NaN if sigma > 0 (no floating-point input to differentiate)."""
    result = plain_objective(forward, x)
    nan = tf.where(regularizer.sigma_tensor() > 0.0, float("nan"), 0.0)
    total = result.total + tf.cast(nan, result.total.dtype)
    return result._replace(total=total, penalty=result.penalty + tf.cast(nan, result.total.dtype))


def _plain_outside_branch(
    model, forward: Forward, x: Any, branches: Branches, extra_state
) -> RegularizedLoss:
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
    seed_states = [generator.state for generator in randomness.seed_generators(model)]
    state = [*seed_states, *_state_outside(model, seed_states, extra_state)]
    before = randomness.snapshot(state)
    y_pred, loss = forward(x)

    def regularized():
        randomness.restore(state, before)
        term = branches.functions[1]()
        return term.total - term.data_loss, tf.cast(term.penalty, loss.dtype)

    def plain():
        return tf.zeros_like(loss), tf.zeros_like(loss)

    extra, penalty = tf.cond(tf.greater(branches.index, 0), regularized, plain)
    return RegularizedLoss(loss + extra, loss, penalty, y_pred)


def _term_unless_sigma(term: Callable[[], RegularizedLoss], regularizer) -> RegularizedLoss:
    """The regularised objective, always computed; at sigma = 0 the plain objective's values.

    `regularized_objective`'s form when only sigma (and clean_weight) choose
    (`every=1, fraction=1`): a run-time branch that the caller's tape
    differentiates through costs more than the term it may skip. XLA's CPU
    backend runs the convolutions of a conditional's branch as naive loops
    (76x a plain step on a small CNN); without XLA the differentiated
    `tf.cond` cost 1.5x the same objective without it (bench/README.md). A
    sigma = 0 step costs a regularised step here; `fit` skips the term.
    """
    result = term()
    regularize = regularizer.sigma_tensor() > 0.0
    return result._replace(
        total=tf.where(regularize, result.total, result.data_loss),
        penalty=tf.where(regularize, result.penalty, tf.zeros_like(result.penalty)),
    )


def _nan_gradient_unless_finite(penalty: tf.Tensor, loss: tf.Tensor) -> tf.Tensor:
    """0 while `penalty` is finite; NaN, with NaN parameter gradients, otherwise.

    For p = 1 and p = inf the gradient of a NaN norm row (an overflowed
    loss-scaled input gradient) is 0, not NaN; this term makes it NaN so a
    `LossScaleOptimizer` skips the step and lowers its scale. It costs a
    scalar: backprop meets `loss` once.
    """
    overflow = tf.cast(tf.where(tf.math.is_finite(penalty), 0.0, float("nan")), loss.dtype)
    return overflow * tf.where(tf.math.is_finite(loss), loss, tf.zeros_like(loss))


def _state_outside(model: keras.layers.Layer, seed_states: list, extra_state) -> list:
    """Non-trainable model variables and `extra_state`, seed states excluded."""
    seeds = {id(state) for state in seed_states}
    variables = [*model.non_trainable_variables, *extra_state]
    return [variable for variable in variables if id(variable) not in seeds]


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
