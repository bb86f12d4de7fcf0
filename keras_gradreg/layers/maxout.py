"""The maxout activation of Goodfellow et al. (2013) as a Keras layer."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from keras_gradreg import _checks


@keras.saving.register_keras_serializable(package="keras_gradreg")
class Maxout(keras.layers.Layer):
    """Max over contiguous groups of channels.

    With C input channels on `axis` and `num_units` outputs, each group has
    k = C / num_units channels and unit i is the max of channels
    [i * k, (i + 1) * k), the grouping of pylearn2's maxout. Works on any rank,
    e.g. after `Dense` (batch, C) or `Conv2D` (batch, h, w, C).

    Args:
        num_units: Number of output units, a positive integer dividing C.
        axis: The channel axis, -1 by default.
    """

    def __init__(self, num_units: int, axis: int = -1, **kwargs):
        super().__init__(**kwargs)
        self.num_units = _checks.check_count(num_units, "num_units")
        if not _checks.is_number(axis) or not isinstance(axis, (int, np.integer)):
            raise ValueError(f"`axis` must be an integer. Received: axis={axis!r}")
        self.axis = int(axis)

    def _channel_axis(self, rank: int) -> int:
        axis = self.axis if self.axis >= 0 else rank + self.axis
        if not 0 < axis < rank:
            raise ValueError(
                f"`axis` must name a non-batch axis of the input (rank {rank}). "
                f"Received: axis={self.axis}"
            )
        return axis

    def build(self, input_shape):
        axis = self._channel_axis(len(input_shape))
        channels = input_shape[axis]
        if channels is None:
            raise ValueError(
                f"Maxout needs a known channel count on axis {self.axis}. "
                f"Received: input_shape={tuple(input_shape)}"
            )
        if channels % self.num_units:
            raise ValueError(
                f"The channel count {channels} on axis {self.axis} must be divisible "
                f"by `num_units`. Received: num_units={self.num_units}, "
                f"input_shape={tuple(input_shape)}"
            )
        self.pieces = channels // self.num_units

    def call(self, inputs):
        shape = ops.shape(inputs)
        axis = self._channel_axis(len(shape))
        grouped = list(shape[:axis]) + [self.num_units, self.pieces] + list(shape[axis + 1 :])
        return ops.max(ops.reshape(inputs, grouped), axis=axis + 1)

    def compute_output_shape(self, input_shape):
        axis = self._channel_axis(len(input_shape))
        output_shape = list(input_shape)
        output_shape[axis] = self.num_units
        return tuple(output_shape)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "num_units": self.num_units, "axis": self.axis}
