"""Compiled passes the report needs besides the attacks: the clean pass and random noise."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tensorflow as tf

from keras_gradreg.attacks.common import box, correct_predictions
from keras_gradreg.balls import random_on_sphere
from keras_gradreg.gradients import loss_and_input_gradient
from keras_gradreg.norms import dual_norm


class CleanPass(NamedTuple):
    """Per example: correctness, dual norms (one row per p), and output checks."""

    correct: tf.Tensor
    norms: tf.Tensor
    zero_gradient: tf.Tensor
    looks_probability: tf.Tensor
    in_unit_interval: tf.Tensor


def clean_fn(model_ref, loss_fn, from_logits, ps):
    """Kernel builder: the clean pass with each example's input gradient of `loss_fn`."""

    def run(x, y):
        _, y_pred, gradient = loss_and_input_gradient(model_ref(), x, y, loss_fn)
        flat = tf.reshape(gradient, [tf.shape(x)[0], -1])
        norms = tf.stack([dual_norm(flat, p) for p in ps], axis=0)
        zero = tf.reduce_all(tf.equal(flat, 0.0), axis=1)
        outputs = tf.reshape(tf.cast(y_pred, tf.float32), [tf.shape(x)[0], -1])
        in_unit = tf.reduce_all((outputs >= 0.0) & (outputs <= 1.0), axis=1)
        if outputs.shape[-1] is not None and outputs.shape[-1] > 1:
            sums_to_one = tf.abs(tf.reduce_sum(outputs, axis=1) - 1.0) < 1e-3
            looks_probability = in_unit & sums_to_one
        else:
            looks_probability = in_unit
        correct = correct_predictions(y, y_pred, from_logits)
        return CleanPass(correct, norms, zero, looks_probability, in_unit)

    return run


def noise_fn(model_ref, loss_fn, from_logits, p):
    """Kernel builder: correctness at x plus a random point of p-norm epsilon, in the box."""
    del loss_fn

    def run(x, y, epsilon, low, high, seed):
        noise = random_on_sphere(tf.shape(x), p, epsilon, seed, x.dtype)
        x_noisy = box(x + noise, low, high)
        return correct_predictions(y, model_ref()(x_noisy, training=False), from_logits)

    return run


def output_change(model, x: tf.Tensor) -> float:
    """The largest difference between two identical inference calls on `x`.

    Nonzero for a randomised model (dropout or noise left on at inference).
    """
    first = np.asarray(model(x, training=False), np.float64)
    second = np.asarray(model(x, training=False), np.float64)
    scale = max(float(np.max(np.abs(first))), 1.0)
    return float(np.max(np.abs(first - second))) / scale
