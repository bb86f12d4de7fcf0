"""Class scores and the losses the suite's attacks maximise (Croce and Hein 2020).

The attacks read a classifier's outputs as scores z of shape (batch,
classes): logits as they are, probabilities as their logarithm (log p =
logits - logsumexp(logits), a per-example shift of the logits, to which the
DLR and margin losses are invariant), and a binary classifier's single output
as two classes. Labels are class indices of shape (batch,).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

LOSSES = ("ce", "dlr")
# The smallest positive float32: log(probability) stays finite where it underflowed.
_TINY = float(np.finfo(np.float32).tiny)


def class_scores(y_pred: tf.Tensor, from_logits: bool | None) -> tf.Tensor:
    """Scores z (batch, classes), float32 (float64 for float64 outputs), from outputs.

    Args:
        y_pred: Outputs of shape (batch, classes), or (batch,) / (batch, 1) for
            a binary classifier.
        from_logits: Whether the outputs are logits; None means logits.
    """
    y_pred = tf.convert_to_tensor(y_pred)
    y_pred = tf.cast(y_pred, tf.float64 if y_pred.dtype == tf.float64 else tf.float32)
    # The classes from the static shape: a traced batch of unknown size must still
    # show its one column, or a binary classifier is read as having one class.
    columns = 1 if y_pred.shape.rank == 1 else y_pred.shape[1:].num_elements()
    y_pred = tf.reshape(y_pred, [-1 if columns else tf.shape(y_pred)[0], columns or -1])
    logits = from_logits is not False
    if y_pred.shape[-1] == 1:
        if logits:
            return tf.concat([tf.zeros_like(y_pred), y_pred], axis=1)
        y_pred = tf.concat([1.0 - y_pred, y_pred], axis=1)
    if logits:
        return y_pred
    return tf.math.log(tf.maximum(y_pred, _TINY))


def num_classes(y_pred_shape: tf.TensorShape) -> int:
    """Classes the scores of outputs shaped `y_pred_shape` have (2 for one output)."""
    last = 1 if y_pred_shape.rank == 1 else int(np.prod(y_pred_shape[1:]))
    return max(last, 2)


def class_labels(y: Any, classes: int) -> tf.Tensor:
    """Class indices (batch,) int32 from integer labels or one-hot targets."""
    y = tf.convert_to_tensor(y)
    if y.shape.rank >= 2 and y.shape[-1] == classes:
        return tf.argmax(y, axis=-1, output_type=tf.int32)
    if y.dtype.is_floating:
        y = tf.round(y)
    return tf.reshape(tf.cast(y, tf.int32), [-1])


def _other_max(z: tf.Tensor, label: tf.Tensor) -> tf.Tensor:
    """max over classes i != label of z_i."""
    is_label = tf.one_hot(label, tf.shape(z)[1], on_value=True, off_value=False)
    return tf.reduce_max(tf.where(is_label, tf.constant(-np.inf, z.dtype), z), axis=1)


def _gather(z: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    return tf.gather(z, index, batch_dims=1)


def cross_entropy(z: tf.Tensor, label: tf.Tensor) -> tf.Tensor:
    """-log softmax(z)_label per example."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=label, logits=z)


def margin(z: tf.Tensor, label: tf.Tensor) -> tf.Tensor:
    """z_label - max_{i != label} z_i: negative once the example is misclassified."""
    return _gather(z, label) - _other_max(z, label)


def dlr(z: tf.Tensor, label: tf.Tensor) -> tf.Tensor:
    """The difference of logits ratio, -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12).

    Needs at least 3 classes; invariant to shifting and scaling the scores.
    """
    top = tf.math.top_k(z, k=3).values
    return -margin(z, label) / (top[:, 0] - top[:, 2] + 1e-12)


def targeted_dlr(z: tf.Tensor, label: tf.Tensor, target: tf.Tensor) -> tf.Tensor:
    """-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12), for target class t.

    Needs at least 4 classes.
    """
    top = tf.math.top_k(z, k=4).values
    scale = top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12
    return -(_gather(z, label) - _gather(z, target)) / scale


def attack_loss(loss: str, targeted: bool, z, label, target) -> tf.Tensor:
    """The per-example loss APGD maximises: CE or DLR, untargeted or targeted.

    Targeted CE is -CE(z, t); targeted DLR is `targeted_dlr`.
    """
    if loss == "ce":
        return -cross_entropy(z, target) if targeted else cross_entropy(z, label)
    return targeted_dlr(z, label, target) if targeted else dlr(z, label)


def min_classes(loss: str, targeted: bool) -> int:
    """The fewest classes a loss is defined for (DLR: 3; targeted DLR: 4)."""
    if loss == "dlr":
        return 4 if targeted else 3
    return 2


def target_ranking(z: tf.Tensor, label: tf.Tensor, count: int) -> tf.Tensor:
    """The `count` classes other than the label with the highest scores, (batch, count)."""
    is_label = tf.one_hot(label, tf.shape(z)[1], on_value=True, off_value=False)
    others = tf.where(is_label, tf.constant(-np.inf, z.dtype), z)
    return tf.math.top_k(others, k=count).indices
