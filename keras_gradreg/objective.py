"""The regularised objective L + sigma * ||grad_x L||_q and its three estimators.

The objective's one home. `RegularizedModel.train_step` computes its loss
with `regularized_objective`; `regularized_loss` is the same computation for
any `keras.Model` and a loss function, to call inside your own
`tf.GradientTape` in a custom training loop:

```python
with tf.GradientTape() as tape:
    result = kgr.regularized_loss(model, x, y, loss_fn, regularizer)
gradients = tape.gradient(result.total, model.trainable_variables)
```

The input gradient is that of the *reduced* loss, so row i is
c_i * d l_i / d x_i with c_i the loss's weight of example i (sample weight
over batch size, and over the number of replicas under a `tf.distribute`
strategy): the sum of the rows' norms is the penalty reduced exactly like
the loss, and it does not change with the batch size or replica count.
"""

from __future__ import annotations

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

Forward = Callable[[Any], tuple[Any, tf.Tensor]]
"""One forward pass: model input -> (predictions, reduced scalar loss)."""


class RegularizedLoss(NamedTuple):
    """The regularised objective of one batch and its parts.

    Losses are scalars reduced as the loss function reduces them (under a
    `tf.distribute` strategy, Keras's default reduction also divides by the
    number of replicas).

    Attributes:
        total: The objective to differentiate: `data_loss + penalty` for
            "penalty" and "finite_difference", `clean_weight * data_loss +
            (1 - clean_weight) * penalty` for "adversarial", `data_loss` when
            sigma is 0. Under loss scaling, when the input gradient
            overflowed, it is NaN and so are its parameter gradients (a
            `LossScaleOptimizer` then skips the step).
        data_loss: The clean loss L(x).
        penalty: sigma * ||g||_q ("penalty"), its finite-difference estimate
            ("finite_difference"), the loss at x + r* ("adversarial"), 0 when
            sigma is 0.
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
) -> RegularizedLoss:
    """The regularised loss of one batch, for a custom training loop.

    What `kgr.RegularizedModel.fit` minimises, for any Keras model: call it
    inside a `tf.GradientTape` and differentiate `total`. All forward passes
    share the step's dropout masks; the pass at x + r* leaves no trace in
    the model's state. Eager, `tf.function`, XLA, and under `strategy.run`.

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

    Returns:
        A `RegularizedLoss(total, data_loss, penalty, y_pred)`.

    Raises:
        ValueError: On a bad argument, before any work; or if `x` has no
            floating-point tensor while sigma > 0.
    """
    _check_layer_and_training(model, training)
    regularizer = as_regularizer(regularizer)
    reduced_loss = _reduced_loss(loss_fn)
    if loss_scale is not None and not tf.is_tensor(loss_scale):
        loss_scale = _checks.check_positive(loss_scale, "loss_scale")
    x = tf.nest.map_structure(_as_tensor, x)

    def forward(inputs):
        y_pred = _internals.call_model(model, inputs, training)
        loss = _with_model_losses(model, reduced_loss(y, y_pred, sample_weight=sample_weight))
        return y_pred, loss

    return regularized_objective(model, forward, x, regularizer, loss_scale=loss_scale)


def regularized_objective(
    model: keras.layers.Layer,
    forward: Forward,
    x: Any,
    regularizer: GradientRegularizer,
    loss_scale: float | tf.Tensor | None = None,
    extra_state: list | tuple = (),
) -> RegularizedLoss:
    """The regularised objective of one batch, by the regularizer's estimator.

    Args:
        model: The model `forward` calls (its seed generators and
            non-trainable variables are the state the passes share or restore).
        forward: One forward pass, `x -> (y_pred, reduced loss)`.
        x: The batch's model input (tensors).
        regularizer: The settings.
        loss_scale: The mixed-precision loss scale for the input gradient, or None.
        extra_state: More variables a forward pass changes that a probing
            pass must leave untouched (e.g. per-output loss trackers).

    Returns:
        A `RegularizedLoss`.
    """
    if regularizer.sigma == 0.0:
        return plain_objective(forward, x)
    if not floating_inputs(x):
        raise ValueError(
            "The gradient penalty needs at least one floating-point input to "
            "differentiate the loss by. Received: input dtypes="
            f"{[t.dtype.name for t in tf.nest.flatten(x) if t is not None]}"
        )
    if regularizer.method == "penalty":
        return penalty_objective(forward, x, regularizer, loss_scale)
    return perturbed_objective(model, forward, x, regularizer, loss_scale, extra_state)


def plain_objective(forward: Forward, x: Any) -> RegularizedLoss:
    """sigma = 0: the clean loss alone (penalty 0)."""
    y_pred, loss = forward(x)
    return RegularizedLoss(loss, loss, tf.zeros_like(loss), y_pred)


def penalty_objective(
    forward: Forward,
    x: Any,
    regularizer: GradientRegularizer,
    loss_scale: float | tf.Tensor | None = None,
) -> RegularizedLoss:
    """L(x) + sigma * ||g||_q, exact, by double backpropagation.

    The input gradient g comes from an inner tape; differentiating `total`
    with an outer tape around this call differentiates through it.
    """
    y_pred, loss, rows = _clean_pass_and_input_gradient(forward, x, loss_scale)
    norms = dual_norm(rows, regularizer.p)  # One term per example, weighted by the loss.
    penalty = tf.cast(regularizer.sigma * tf.reduce_sum(norms), loss.dtype)
    total = loss + penalty + _nan_gradient_unless_finite(penalty, loss)
    return RegularizedLoss(total, loss, penalty, y_pred)


def perturbed_objective(
    model: keras.layers.Layer,
    forward: Forward,
    x: Any,
    regularizer: GradientRegularizer,
    loss_scale: float | tf.Tensor | None = None,
    extra_state: list | tuple = (),
) -> RegularizedLoss:
    """The "adversarial" and "finite_difference" estimators: a second pass at x + r.

    r = r*(g) with radius sigma ("adversarial") or `fd_step`
    ("finite_difference"), held constant. The second pass draws the clean
    pass's dropout masks and leaves no trace in the model's state.
    """
    adversarial = regularizer.method == "adversarial"
    seed_states = [generator.state for generator in randomness.seed_generators(model)]
    step_randomness = randomness.snapshot(seed_states)
    y_pred, loss, rows = _clean_pass_and_input_gradient(forward, x, loss_scale)
    radius = regularizer.sigma if adversarial else regularizer.fd_step
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
    if adversarial:
        weight = regularizer.clean_weight
        # With weight 0 the clean pass is only the input gradient's source.
        clean = loss if weight > 0.0 else tf.stop_gradient(loss)
        penalty = moved_loss
        total = weight * clean + (1.0 - weight) * moved_loss
    else:
        penalty = regularizer.sigma * (moved_loss - loss) / regularizer.fd_step
        total = loss + penalty
    return RegularizedLoss(total, loss, penalty, y_pred)


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
