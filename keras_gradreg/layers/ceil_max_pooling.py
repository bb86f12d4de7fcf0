"""`CeilMaxPooling2D`: max pooling whose output size is rounded up (cuda-convnet)."""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_gradreg")
class CeilMaxPooling2D(keras.layers.Layer):
    """2D max pooling whose output size is rounded up (cuda-convnet's rule).

    Output size per spatial axis: ceil((size - pool_size) / strides) + 1. The
    last window may be partial; it is padded with -inf, so it is the max of
    the values it covers. Channels-last input. The maxout paper's pylearn2
    networks pooled this way, so the MNIST conv maxout network ends in a
    3x3x24 map where Keras's `MaxPooling2D` would give 2x2x24.

    Args:
        pool_size: Window size, a positive integer.
        strides: Step between windows, a positive integer.
        **kwargs: As for `keras.layers.Layer`.
    """

    def __init__(self, pool_size: int, strides: int, **kwargs):
        super().__init__(**kwargs)
        for name, value in (("pool_size", pool_size), ("strides", strides)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
        self.pool_size = pool_size
        self.strides = strides

    def _output_size(self, size: int | None) -> int | None:
        if size is None:
            return None
        return max(math.ceil((size - self.pool_size) / self.strides), 0) + 1

    def _padding(self, size: int) -> int:
        return max((self._output_size(size) - 1) * self.strides + self.pool_size - size, 0)

    def call(self, inputs):
        height, width = inputs.shape[1], inputs.shape[2]
        pads = [[0, 0], [0, self._padding(height)], [0, self._padding(width)], [0, 0]]
        if any(pad[1] for pad in pads):
            inputs = ops.pad(inputs, pads, constant_values=float("-inf"))
        # The maximum of pool_size**2 strided slices, one per window offset:
        # the same values as a max-pooling op, and a second derivative that
        # XLA computes exactly (XLA's max-pooling gradient kernel picks each
        # window's maximum by values rounded to bfloat16, so its double
        # backward differed from TensorFlow's by 1% on a ReLU CNN).
        rows, columns = self._output_size(height), self._output_size(width)
        span_rows = (rows - 1) * self.strides + 1
        span_columns = (columns - 1) * self.strides + 1
        result = None
        for i in range(self.pool_size):
            for j in range(self.pool_size):
                window = inputs[
                    :, i : i + span_rows : self.strides, j : j + span_columns : self.strides, :
                ]
                result = window if result is None else ops.maximum(result, window)
        return result

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = input_shape
        return (batch, self._output_size(height), self._output_size(width), channels)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "pool_size": self.pool_size, "strides": self.strides}


# Models saved before the layer moved from train/ into the library load too.
keras.saving.get_custom_objects()["keras_gradreg_train>CeilMaxPooling2D"] = CeilMaxPooling2D
