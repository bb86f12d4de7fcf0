"""Per-example input gradients and helpers for models with several inputs."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import keras
import tensorflow as tf

LossLike = str | keras.losses.Loss | Callable | None


def floating_inputs(x: Any) -> list[tf.Tensor]:
    """The floating-point tensors in a (possibly nested) model input."""
    return [t for t in tf.nest.flatten(x) if t is not None and t.dtype.is_floating]


def replace_floating_inputs(x: Any, new_tensors: list[tf.Tensor]) -> Any:
    """`x` with its floating-point tensors replaced, in order, by `new_tensors`."""
    replacements = iter(new_tensors)
    flat = [
        next(replacements) if t is not None and t.dtype.is_floating else t
        for t in tf.nest.flatten(x)
    ]
    return tf.nest.pack_sequence_as(x, flat)


def concat_per_example(tensors: list[tf.Tensor], dtype=tf.float32) -> tf.Tensor:
    """Flattens each tensor to (batch, -1) and concatenates them on axis 1."""
    flat = [tf.reshape(tf.cast(t, dtype), [tf.shape(t)[0], -1]) for t in tensors]
    return flat[0] if len(flat) == 1 else tf.concat(flat, axis=1)


def split_per_example(flat: tf.Tensor, like: list[tf.Tensor]) -> list[tf.Tensor]:
    """Inverse of `concat_per_example`: pieces shaped and typed as `like`."""
    if len(like) == 1:
        return [tf.cast(tf.reshape(flat, tf.shape(like[0])), like[0].dtype)]
    sizes = [tf.reduce_prod(tf.shape(t)[1:]) for t in like]
    pieces = tf.split(flat, sizes, axis=1)
    return [tf.cast(tf.reshape(piece, tf.shape(t)), t.dtype) for piece, t in zip(pieces, like)]


def zeros_for_missing(gradients: list, tensors: list[tf.Tensor]) -> list[tf.Tensor]:
    """Replaces None gradients (inputs the loss does not use) by zeros."""
    return [tf.zeros_like(t) if g is None else g for g, t in zip(gradients, tensors)]


def get_loss(
    loss: LossLike, model: keras.Model | None = None, name: str = "loss"
) -> keras.losses.Loss | Callable:
    """The loss `loss` stands for: the library's one loss resolver.

    The attacks, `loss_and_input_gradient`, `regularized_loss` and the
    robustness evaluation all resolve their loss argument here.

    Args:
        loss: A Keras loss name, a `keras.losses.Loss`, a function of
            `(y_true, y_pred)`, or None for `model`'s compiled loss.
        model: The model whose compiled loss None stands for; without one,
            None is refused.
        name: The argument's name, for errors.

    Returns:
        A `keras.losses.Loss` or a callable `(y_true, y_pred)`.

    Raises:
        ValueError: For an unknown loss name, None when the model has no
            single compiled loss, or anything else that is not callable.
    """
    if loss is None and model is not None:
        loss = getattr(model, "loss", None)
        if loss is None or isinstance(loss, (dict, list, tuple)):
            raise ValueError(
                f"`{name}=None` uses the model's compiled loss, which must be a single "
                f"loss. Pass `{name}=` explicitly. Received: model.loss={loss!r}"
            )
    if isinstance(loss, str):
        try:
            return keras.losses.get(loss)
        except ValueError:
            raise ValueError(f"Unknown loss. Received: {name}={loss!r}") from None
    if not callable(loss):
        raise ValueError(
            f"`{name}` must be a Keras loss, a loss name or a callable. Received: {name}={loss!r}"
        )
    return loss


def resolve_loss(model: keras.Model, loss: LossLike) -> Callable:
    """A callable `(y_true, y_pred) -> per-example losses` for `loss` (`get_loss`)."""
    loss = get_loss(loss, model)
    return loss.call if isinstance(loss, keras.losses.Loss) else loss


def loss_from_logits(model: keras.Model, loss: LossLike = None) -> bool | None:
    """Whether `loss` (the compiled loss if None) expects logits.

    Returns:
        True or False as read from the loss's `from_logits` (a Keras loss
        object, a loss name, a Keras loss function or a `functools.partial`
        of one), or None when the loss has no such setting or there is no
        usable loss.
    """
    try:
        loss = get_loss(loss, model)
    except ValueError:
        return None
    if isinstance(loss, keras.losses.Loss):
        config = loss.get_config()
        return bool(config["from_logits"]) if "from_logits" in config else None
    if isinstance(loss, functools.partial):
        if "from_logits" in loss.keywords:
            return bool(loss.keywords["from_logits"])
        loss = loss.func
    try:
        parameter = inspect.signature(loss).parameters.get("from_logits")
    except (TypeError, ValueError):
        return None
    if parameter is not None and parameter.default is not inspect.Parameter.empty:
        return bool(parameter.default)
    return None


def per_example_loss(loss_fn: Callable, y: Any, y_pred: Any) -> tf.Tensor:
    """Loss of each example, summed over any non-batch axes, shape (batch,)."""
    values = tf.convert_to_tensor(loss_fn(y, y_pred))
    values = tf.cast(values, tf.float32)
    if values.shape.rank == 0:
        raise ValueError(
            "The loss must return one value per example, not a scalar; use a "
            f"Keras loss or a function without reduction. Received: loss shape={values.shape}"
        )
    if values.shape.rank > 1:
        values = tf.reduce_sum(tf.reshape(values, [tf.shape(values)[0], -1]), axis=1)
    return values


class LossAndGradient(NamedTuple):
    """Per-example losses, predictions and input gradient of one batch.

    Attributes:
        losses: Each example's loss, shape (batch,), float32.
        y_pred: The model's output on the batch.
        gradient: d losses[i] / d x[i]: a tensor shaped like `x`, or for a
            structure `x` a structure like it with a gradient per
            floating-point input and None elsewhere.
    """

    losses: tf.Tensor
    y_pred: Any
    gradient: Any


def differentiate_inputs(
    compute: Callable[[Any], tuple[tf.Tensor, Any]], x: Any
) -> tuple[list[tf.Tensor], Any]:
    """Gradient of `compute(x)`'s target with respect to x's floating inputs.

    The library's one input-gradient tape: attacks, the robustness report,
    `input_gradients` and the regularised objective all differentiate through
    it. `compute(x)` returns `(target, aux)` and runs inside the tape, so the
    reduction to the scalar `target` is recorded. Called inside an outer
    `tf.GradientTape`, the gradient is itself recorded by that tape, which can
    then differentiate it again (double backpropagation).

    Args:
        compute: `x -> (target, aux)`: `target` a scalar (a tensor of any
            shape is summed by the tape), `aux` anything to hand back.
        x: A tensor or a nested structure of tensors; its floating-point
            tensors are watched.

    Returns:
        `(gradients, aux)`: one gradient per floating-point tensor of `x`
        (in `tf.nest.flatten` order, zeros where `target` does not depend on
        it) and `compute`'s `aux`.
    """
    inputs = floating_inputs(x)
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        target, aux = compute(x)
    return zeros_for_missing(tape.gradient(target, inputs), inputs), aux


def _like_x(x: Any, gradients: list[tf.Tensor]) -> Any:
    """The gradients in the structure of `x` (None for non-floating tensors)."""
    if tf.is_tensor(x):
        return gradients[0]
    replacements = iter(gradients)
    flat = [
        next(replacements) if t is not None and t.dtype.is_floating else None
        for t in tf.nest.flatten(x)
    ]
    return tf.nest.pack_sequence_as(x, flat)


def loss_and_input_gradient(
    model: keras.Model,
    x: Any,
    y: Any,
    loss: LossLike = None,
    training: bool = False,
) -> LossAndGradient:
    """Per-example losses, predictions and input gradients from one forward pass.

    The gradient is that of the sum of the per-example losses, so row i is
    d loss(x_i, y_i) / d x_i whatever the batch (what attacks and the
    robustness report need). Works eagerly and inside `tf.function` and XLA.

    Args:
        model: A Keras model (any callable `model(x, training=...)`).
        x: Model input: a tensor, or a nested structure of tensors.
        y: Targets matching `loss`.
        loss: A Keras loss name or object, a callable `(y_true, y_pred)`
            returning per-example losses, or None for the model's compiled loss.
        training: Whether to run the model in training mode.

    Returns:
        A `LossAndGradient(losses, y_pred, gradient)`.

    Raises:
        ValueError: If `x` has no floating-point tensor, or `loss` cannot be used.
    """
    loss_fn = resolve_loss(model, loss)
    x = tf.nest.map_structure(lambda t: t if t is None else tf.convert_to_tensor(t), x)
    if not floating_inputs(x):
        raise ValueError(f"`x` has no floating-point input to differentiate. Received: x={x!r}")

    def summed_losses(inputs):
        y_pred = model(inputs, training=training)
        losses = per_example_loss(loss_fn, y, y_pred)
        return tf.reduce_sum(losses), (losses, y_pred)

    gradients, (losses, y_pred) = differentiate_inputs(summed_losses, x)
    return LossAndGradient(losses, y_pred, _like_x(x, gradients))


def input_gradients(
    model: keras.Model,
    x: Any,
    y: Any,
    loss: LossLike = None,
    training: bool = False,
) -> Any:
    """Gradient of each example's own loss with respect to its input.

    The result does not depend on the batch: row i is d loss(x_i, y_i) / d x_i.

    Args:
        model: A Keras model.
        x: Model input: a tensor, or a nested structure of tensors.
        y: Targets matching `loss`.
        loss: A Keras loss, a callable `(y_true, y_pred)`, or None for the
            model's compiled loss.
        training: Whether to run the model in training mode.

    Returns:
        For a single-tensor `x`, a tensor shaped like `x`; otherwise a
        structure like `x` with a gradient for every floating-point input and
        None for the others.
    """
    return loss_and_input_gradient(model, x, y, loss, training=training).gradient
