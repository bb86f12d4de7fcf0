"""Per-example input gradients and helpers for models with several inputs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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


def resolve_loss(model: keras.Model, loss: LossLike) -> Callable:
    """A callable `(y_true, y_pred) -> per-example losses` for `loss`.

    Args:
        model: Used for its compiled loss when `loss` is None.
        loss: A Keras loss name, a `keras.losses.Loss`, a function of
            `(y_true, y_pred)`, or None for the model's compiled loss.

    Raises:
        ValueError: If `loss` is None and the model has no single compiled loss.
    """
    if loss is None:
        loss = getattr(model, "loss", None)
        if loss is None or isinstance(loss, (dict, list, tuple)):
            raise ValueError(
                "`loss=None` uses the model's compiled loss, which must be a single "
                f"loss. Pass `loss=` explicitly. Received: model.loss={loss!r}"
            )
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        return loss.call
    if callable(loss):
        return loss
    raise ValueError(f"`loss` must be a Keras loss or a callable. Received: loss={loss!r}")


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
    loss_fn = resolve_loss(model, loss)
    x = tf.nest.map_structure(lambda t: t if t is None else tf.convert_to_tensor(t), x)
    inputs = floating_inputs(x)
    if not inputs:
        raise ValueError(f"`x` has no floating-point input to differentiate. Received: x={x!r}")
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        y_pred = model(x, training=training)
        total = tf.reduce_sum(per_example_loss(loss_fn, y, y_pred))
    gradients = zeros_for_missing(tape.gradient(total, inputs), inputs)
    if tf.is_tensor(x):
        return gradients[0]
    replacements = iter(gradients)
    flat = [
        next(replacements) if t is not None and t.dtype.is_floating else None
        for t in tf.nest.flatten(x)
    ]
    return tf.nest.pack_sequence_as(x, flat)
