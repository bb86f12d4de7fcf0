"""The paper's four networks (PAPER.md section 3), as `kgr.RegularizedModel`s.

Each network ends in a `Dense` layer producing logits (train it with
`from_logits=True`), computed in float32 under a mixed-precision policy.
Architectures follow the maxout paper's pylearn2 configs
(scripts/papers/maxout/{mnist_pi,mnist,cifar10_no_aug_valid}.yaml):

- dropout on the input of every layer: `input_dropout` before the first,
  `hidden_dropout` before each later one, including the logits layer;
- max-norm constraints on each output unit's incoming weights: `max_norm`
  on dense layers (pylearn2's `max_col_norm`) and on later convolutions,
  `first_conv_max_norm` on the first convolution (pylearn2's
  `max_kernel_norm: .9`);
- convolutional maxout layers: zero padding, a valid convolution with
  `channels * pieces` filters, maxout over contiguous groups of `pieces`,
  then max pooling that rounds the output size up like cuda-convnet (a last
  partial window is kept), so the MNIST network ends in a 3x3x24 map.

Known differences from pylearn2: Keras's default initialisers instead of
uniform(-0.005, 0.005), and Keras's inverted dropout, which scales kept
inputs by 1 / (1 - rate) during training (pylearn2 used no scale on the
input layer). Neither changes what the network can represent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

import keras_gradreg as kgr

MODEL_NAMES = ("sigmoid_mlp", "maxout_mlp", "conv_maxout_mnist", "conv_maxout_cifar10")

# Hidden layer widths where a config does not fix them. The sigmoid MLP's
# architecture is not known (PAPER.md); 2 x 1200 is the common MNIST MLP of
# the dropout papers of the time.
DEFAULT_HIDDEN_UNITS = {"sigmoid_mlp": (1200, 1200), "maxout_mlp": (240, 240)}
MAXOUT_MLP_PIECES = 5

# (channels, pieces, kernel, pad, pool, pool_stride) of each conv maxout layer.
_CONV_LAYERS = {
    "conv_maxout_mnist": ((48, 2, 8, 0, 4, 2), (48, 2, 8, 3, 4, 2), (24, 4, 5, 3, 2, 2)),
    "conv_maxout_cifar10": ((96, 2, 8, 4, 4, 2), (192, 2, 8, 3, 4, 2), (192, 2, 5, 3, 2, 2)),
}
# (units, pieces) of the dense maxout layers after the convolutions.
_CONV_DENSE_LAYERS = {"conv_maxout_mnist": (), "conv_maxout_cifar10": ((500, 5),)}


@keras.saving.register_keras_serializable(package="keras_gradreg_train")
class CeilMaxPooling2D(keras.layers.Layer):
    """2D max pooling whose output size is rounded up (cuda-convnet's rule).

    Output size per spatial axis: ceil((size - pool_size) / strides) + 1. The
    last window may be partial; it is padded with -inf, so it is the max of
    the values it covers. Channels-last input.

    Args:
        pool_size: Window size, a positive integer.
        strides: Step between windows, a positive integer.
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
        return ops.max_pool(inputs, self.pool_size, self.strides, padding="valid")

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = input_shape
        return (batch, self._output_size(height), self._output_size(width), channels)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "pool_size": self.pool_size, "strides": self.strides}


def _dense_constraint(max_norm: float | None):
    return None if max_norm is None else keras.constraints.MaxNorm(max_norm, axis=0)


def _conv_constraint(max_norm: float | None):
    return None if max_norm is None else keras.constraints.MaxNorm(max_norm, axis=[0, 1, 2])


def _dropout(x, rate: float, name: str):
    # FastDropout: under XLA, keras.layers.Dropout made a step ~4x slower (bench/README.md).
    return kgr.layers.FastDropout(rate, name=name)(x) if rate > 0 else x


def _check_rate(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"`{name}` must be a number in [0, 1). Received: {name}={value!r}")
    return float(value)


def _check_norm(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(
            f"`{name}` must be a finite number > 0 or None. Received: {name}={value!r}"
        )
    return float(value)


def _check_positive_ints(name: str, value: Any) -> tuple[int, ...]:
    if (
        not isinstance(value, Sequence)
        or not value
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)
    ):
        raise ValueError(
            f"`{name}` must be a non-empty sequence of positive integers. "
            f"Received: {name}={value!r}"
        )
    return tuple(value)


def build_model(
    name: str,
    *,
    input_shape: tuple,
    num_classes: int = 10,
    input_dropout: float = 0.2,
    hidden_dropout: float = 0.5,
    max_norm: float | None = 1.9365,
    first_conv_max_norm: float | None = 0.9,
    hidden_units: Sequence[int] | None = None,
    preprocessing: keras.layers.Layer | None = None,
    regularizer: kgr.GradientRegularizer | None = None,
) -> kgr.RegularizedModel:
    """Builds one of the paper's networks, uncompiled, with logits output.

    Args:
        name: One of `MODEL_NAMES`: "sigmoid_mlp" (sigmoid hidden layers),
            "maxout_mlp" (784-240x5-240x5-10), "conv_maxout_mnist" or
            "conv_maxout_cifar10" (the maxout paper's convolutional networks).
        input_shape: Shape of one example, e.g. (28, 28, 1). The MLPs flatten
            it; the convolutional networks need (height, width, channels).
        num_classes: Number of logits.
        input_dropout: Dropout rate on the input; 0 adds no Dropout layer.
        hidden_dropout: Dropout rate on the input of every later layer; 0 adds
            no Dropout layer.
        max_norm: Max norm of each unit's incoming weights in dense layers and
            in all but the first convolution; None for no constraint.
        first_conv_max_norm: The same for the first convolution; None for no
            constraint.
        hidden_units: Widths of the MLPs' hidden layers (units before maxout
            pieces for "maxout_mlp"). None means (240, 240) for "maxout_mlp"
            and (1200, 1200) for "sigmoid_mlp" (the paper's widths are not
            known). Not accepted by the convolutional networks.
        preprocessing: Optional layer applied to the input before everything
            else (e.g. `train.preprocessing.ContrastNormalizeZCA` for CIFAR-10),
            so that the model's input stays in pixel space.
        regularizer: The model's `kgr.GradientRegularizer`; None for the
            default one.

    Returns:
        A `kgr.RegularizedModel` mapping inputs (pixels in [0, 1] in this
        project) to `num_classes` logits.

    Raises:
        ValueError: On an unknown `name` or an invalid argument.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"`name` must be one of {MODEL_NAMES}. Received: name={name!r}")
    if not isinstance(input_shape, (tuple, list)) or not input_shape:
        raise ValueError(
            f"`input_shape` must be a non-empty tuple. Received: input_shape={input_shape!r}"
        )
    input_shape = _check_positive_ints("input_shape", input_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(
            f"`num_classes` must be an integer >= 2. Received: num_classes={num_classes!r}"
        )
    input_dropout = _check_rate("input_dropout", input_dropout)
    hidden_dropout = _check_rate("hidden_dropout", hidden_dropout)
    max_norm = _check_norm("max_norm", max_norm)
    first_conv_max_norm = _check_norm("first_conv_max_norm", first_conv_max_norm)
    is_mlp = name in DEFAULT_HIDDEN_UNITS
    if hidden_units is not None and not is_mlp:
        raise ValueError(
            f"`hidden_units` applies to the MLPs only, not to {name!r}. "
            f"Received: hidden_units={hidden_units!r}"
        )
    if is_mlp:
        units = DEFAULT_HIDDEN_UNITS[name] if hidden_units is None else hidden_units
        units = _check_positive_ints("hidden_units", units)
    elif len(input_shape) != 3:
        raise ValueError(
            f"{name!r} needs input_shape=(height, width, channels). "
            f"Received: input_shape={input_shape!r}"
        )

    if preprocessing is not None and not isinstance(preprocessing, keras.layers.Layer):
        raise ValueError(
            f"`preprocessing` must be a keras.layers.Layer or None. "
            f"Received: preprocessing={preprocessing!r}"
        )
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs if preprocessing is None else preprocessing(inputs)
    if is_mlp:
        x = keras.layers.Flatten(name="flatten")(x)
        for i, width in enumerate(units):
            x = _dropout(x, input_dropout if i == 0 else hidden_dropout, f"dropout_{i}")
            if name == "maxout_mlp":
                x = keras.layers.Dense(
                    width * MAXOUT_MLP_PIECES,
                    kernel_constraint=_dense_constraint(max_norm),
                    name=f"dense_{i}",
                )(x)
                x = kgr.layers.Maxout(width, name=f"maxout_{i}")(x)
            else:
                x = keras.layers.Dense(
                    width,
                    activation="sigmoid",
                    kernel_constraint=_dense_constraint(max_norm),
                    name=f"dense_{i}",
                )(x)
        depth = len(units)
    else:
        conv_layers = _CONV_LAYERS[name]
        for i, (channels, pieces, kernel, pad, pool, stride) in enumerate(conv_layers):
            x = _dropout(x, input_dropout if i == 0 else hidden_dropout, f"dropout_{i}")
            if pad:
                x = keras.layers.ZeroPadding2D(pad, name=f"pad_{i}")(x)
            x = keras.layers.Conv2D(
                channels * pieces,
                kernel,
                kernel_constraint=_conv_constraint(first_conv_max_norm if i == 0 else max_norm),
                name=f"conv_{i}",
            )(x)
            x = kgr.layers.Maxout(channels, name=f"maxout_{i}")(x)
            x = CeilMaxPooling2D(pool, stride, name=f"pool_{i}")(x)
        x = keras.layers.Flatten(name="flatten")(x)
        depth = len(conv_layers)
        for width, pieces in _CONV_DENSE_LAYERS[name]:
            x = _dropout(x, hidden_dropout, f"dropout_{depth}")
            x = keras.layers.Dense(
                width * pieces, kernel_constraint=_dense_constraint(max_norm), name=f"dense_{depth}"
            )(x)
            x = kgr.layers.Maxout(width, name=f"maxout_{depth}")(x)
            depth += 1
    x = _dropout(x, hidden_dropout, f"dropout_{depth}")
    logits = keras.layers.Dense(
        num_classes,
        kernel_constraint=_dense_constraint(max_norm),
        dtype="float32",
        name="logits",
    )(x)
    return kgr.RegularizedModel(inputs, logits, regularizer=regularizer, name=name)
