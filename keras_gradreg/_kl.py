"""The KL term of TRADES: KL(f(x) || f(x + r)), per example and reduced like a Keras loss."""

from __future__ import annotations

from typing import Any, NamedTuple

import tensorflow as tf

# Probabilities are clipped before their logarithm, as Keras's KLDivergence does.
_EPSILON = 1e-7


class KLDivergence(NamedTuple):
    """KL(f(x) || f(x')) of a classifier's outputs, the clean output first.

    Attributes:
        from_logits: Whether the model outputs logits (else probabilities).
        sample_weight: Per-example weights of the batch, or None.
    """

    from_logits: bool
    sample_weight: Any = None

    def per_example(self, clean: tf.Tensor, moved: tf.Tensor) -> tf.Tensor:
        """sum_c p_c (log p_c - log p'_c) per example, float32, shape (batch,)."""
        log_p, log_q = (self._log_probabilities(_single(t)) for t in (clean, moved))
        return tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1)

    def reduced(self, clean: tf.Tensor, moved: tf.Tensor, rows: tf.Tensor | None = None):
        """The batch mean of the weighted KL, over the replicas too (Keras's default reduction).

        Args:
            clean: f(x), the model's output on the rows.
            moved: f(x + r) on the same rows.
            rows: The batch's rows `clean` holds (for their sample weights);
                None: the whole batch.
        """
        values = self.per_example(clean, moved)
        if self.sample_weight is not None:
            weights = tf.convert_to_tensor(self.sample_weight)
            weights = weights if rows is None else tf.gather(weights, rows)
            values = values * tf.cast(tf.reshape(weights, [-1]), values.dtype)
        mean = tf.reduce_sum(values) / tf.cast(tf.shape(values)[0], values.dtype)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        return mean if replicas == 1 else mean / replicas

    def _log_probabilities(self, output: tf.Tensor) -> tf.Tensor:
        output = tf.cast(output, tf.float32)
        if self.from_logits:
            return tf.nn.log_softmax(output, axis=-1)
        return tf.math.log(tf.clip_by_value(output, _EPSILON, 1.0))


def _single(output: Any) -> tf.Tensor:
    if not tf.is_tensor(output):
        raise ValueError(
            'method="trades" needs a classifier with one output (logits or '
            f"probabilities). Received: outputs of type {type(output).__name__}"
        )
    return output
