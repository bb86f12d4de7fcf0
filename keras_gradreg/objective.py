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

from keras_gradreg import _checks, _internals, randomness
from keras_gradreg.gradients import (
    concat_per_example,
    differentiate_inputs,
    floating_inputs,
    replace_floating_inputs,
    split_per_example,
)
from keras_gradreg.norms import dual_norm, worst_case_perturbation
from keras_gradreg.regularizer import GradientRegularizer, as_regularizer
from keras_gradreg.subsets import batch_size_of, gather_rows, subset_rows

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


class RegularizedLoss(NamedTuple):
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
) -> RegularizedLoss:
    """The regularised loss of one batch, for a custom training loop.

    What `kgr.RegularizedModel.fit` minimises, for any Keras model: call it
    inside a `tf.GradientTape` and differentiate `total`. All forward passes
    share the step's dropout masks; the pass at x + r* leaves no trace in
    the model's state. Eager, `tf.function`, XLA, and under `strategy.run`.

    With `every > 1` the term is computed when `step % every == 0` (pass the
    optimizer's `iterations`, as `fit` uses); the choice is made at run time
    (a `tf.cond`, differentiated through), so a traced step serves every
    step. `sigma` and `clean_weight` are read from the regularizer's
    variables, so assigning them between steps needs no retracing.

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

    Returns:
        A `RegularizedLoss(total, data_loss, penalty, y_pred)`.

    Raises:
        ValueError: On a bad argument, before any work; or if `x` has no
            floating-point tensor while sigma > 0.
    """
    _check_layer_and_training(model, training)
    regularizer = _shared_regularizer(regularizer)
    reduced_loss = _reduced_loss(loss_fn)
    if regularizer.fraction < 1.0:
        check_subset_reduction(reduced_loss, "loss_fn")
    if loss_scale is not None and not tf.is_tensor(loss_scale):
        loss_scale = _checks.check_positive(loss_scale, "loss_scale")
    x = tf.nest.map_structure(_as_tensor, x)

    def forward(inputs, rows=None):
        targets, weights = gather_rows((y, sample_weight), rows)
        y_pred = _internals.call_model(model, inputs, training)
        loss = _with_model_losses(model, reduced_loss(targets, y_pred, sample_weight=weights))
        return y_pred, loss

    return regularized_objective(model, forward, x, regularizer, loss_scale=loss_scale, step=step)


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
) -> RegularizedLoss:
    """The regularised objective of one batch, by the regularizer's estimator.

    The choice between the plain and the regularised objective (sigma = 0,
    or a step that `every` skips) is made at run time by a `tf.switch_case`
    that the caller's tape differentiates through.

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

    Returns:
        A `RegularizedLoss`.
    """
    return objective_branches(model, forward, x, regularizer, loss_scale, extra_state, step).run()


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
    term = functools.partial(
        term_objective, model, forward, x, regularizer, loss_scale, extra_state
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
) -> RegularizedLoss:
    """The regularised objective with the term multiplied by `every`, on the batch or a subset."""
    if regularizer.fraction < 1.0:
        return subset_objective(model, forward, x, regularizer, loss_scale, extra_state)
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
) -> RegularizedLoss:
    """The "adversarial" and "finite_difference" estimators: a second pass at x + r.

    r = r*(g) with radius sigma ("adversarial") or `fd_step`
    ("finite_difference"), held constant. The second pass draws the clean
    pass's dropout masks and leaves no trace in the model's state. The term
    is multiplied by `scale`; `clean_gradient=False` drops the clean loss's
    gradient, valid only where its weight is 0 ("adversarial", clean_weight
    0, scale 1).
    """
    y_pred, loss, moved_loss = _clean_and_moved_losses(
        model, forward, x, regularizer, loss_scale, extra_state
    )
    if regularizer.method == "adversarial":
        clean = loss if clean_gradient else tf.stop_gradient(loss)
        clean_weight, moved_weight = _adversarial_weights(regularizer, scale, loss.dtype)
        total = clean_weight * clean + moved_weight * moved_loss
        return RegularizedLoss(total, loss, moved_loss, y_pred)
    penalty = _finite_difference(regularizer, moved_loss, loss)
    return RegularizedLoss(loss + _times(scale, penalty), loss, penalty, y_pred)


def subset_objective(
    model: keras.layers.Layer,
    forward: Forward,
    x: Any,
    regularizer: GradientRegularizer,
    loss_scale: float | tf.Tensor | None = None,
    extra_state: list | tuple = (),
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
        _, rows_loss, moved_loss = _clean_and_moved_losses(
            model, forward_rows, x_rows, regularizer, loss_scale, extra_state
        )
        if regularizer.method == "adversarial":
            weight = 1.0 - tf.cast(regularizer.clean_weight_tensor(), loss.dtype)
            penalty, term = moved_loss, weight * (moved_loss - rows_loss)
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


def _clean_and_moved_losses(model, forward: Forward, x: Any, regularizer, loss_scale, extra_state):
    """The clean pass and the pass at x + r (same masks, no trace): (y_pred, loss, moved loss)."""
    seed_states = [generator.state for generator in randomness.seed_generators(model)]
    step_randomness = randomness.snapshot(seed_states)
    y_pred, loss, rows = _clean_pass_and_input_gradient(forward, x, loss_scale)
    adversarial = regularizer.method == "adversarial"
    radius = regularizer.sigma_tensor() if adversarial else regularizer.fd_step
    step = tf.stop_gradient(worst_case_perturbation(rows, regularizer.p, radius))
    inputs = floating_inputs(x)
    steps = split_per_example(step, inputs)
    x_moved = replace_floating_inputs(x, [t + s for t, s in zip(inputs, steps)])
    # The moved pass is a probe: it redraws the clean pass's masks and
    # leaves no trace in the model's state (BatchNorm statistics) or in
    # `extra_state`. A NaN r* (overflowed input gradient) makes its loss,
    # hence the parameter gradients, NaN.
    side_state = _state_outside(model, seed_states, extra_state)
    kept_state = randomness.snapshot(side_state)
    randomness.restore(seed_states, step_randomness)
    _, moved_loss = forward(x_moved)
    randomness.restore(side_state, kept_state)
    return y_pred, loss, moved_loss


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
    if isinstance(loss_fn, str):
        try:
            loss_fn = keras.losses.get(loss_fn)
        except ValueError:
            raise ValueError(f"Unknown loss. Received: loss_fn={loss_fn!r}") from None
    if isinstance(loss_fn, keras.losses.Loss):
        if loss_fn.reduction in (None, "none"):
            raise ValueError(
                "`loss_fn` must reduce the batch to a scalar (the penalty is reduced "
                f"like it). Received: loss_fn with reduction={loss_fn.reduction!r}"
            )
        return loss_fn
    if callable(loss_fn):
        return _PerExampleLoss(loss_fn)
    raise ValueError(
        f"`loss_fn` must be a Keras loss, a loss name or a callable. Received: loss_fn={loss_fn!r}"
    )


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
