"""The field's standard MNIST CNN (Madry et al. 2018), with a choice of activation."""

from __future__ import annotations

from collections.abc import Sequence

import keras

from keras_gradreg.layers import CeilMaxPooling2D, Maxout
from keras_gradreg.model import RegularizedModel
from keras_gradreg.networks import _parts
from keras_gradreg.regularizer import GradientRegularizer

# The activations the binary offers; `cnn` takes any Keras activation name too.
ACTIVATIONS = ("relu", "gelu", "softplus", "maxout")


def check_activation(activation: str, pieces: int) -> None:
    """Raises ValueError unless `activation` is "maxout" or a Keras activation name.

    `pieces` is checked (a positive integer) for "maxout" only.
    """
    if activation == "maxout":
        _parts.check_positive_ints((pieces,), "pieces")
        return
    if not isinstance(activation, str):
        raise ValueError(
            '`activation` must be "maxout" or a Keras activation name such as "relu", '
            f'"gelu" or "softplus". Received: activation={activation!r}'
        )
    try:
        keras.activations.get(activation)
    except (ValueError, TypeError):
        raise ValueError(
            '`activation` must be "maxout" or a Keras activation name such as "relu", '
            f'"gelu" or "softplus". Received: activation={activation!r}'
        ) from None


def _unit(x, layer, units: int, activation: str, pieces: int, kind: str, index: int):
    """`layer(filters, activation, name)` (a Conv2D or Dense) and the activation.

    Named f"{kind}_{index}", with f"maxout_{index}" after it for maxout.
    """
    if activation == "maxout":
        x = layer(units * pieces, None, f"{kind}_{index}")(x)
        return Maxout(units, name=f"maxout_{index}")(x)
    return layer(units, activation, f"{kind}_{index}")(x)


def cnn(
    input_shape: Sequence[int] = (28, 28, 1),
    num_classes: int = 10,
    *,
    conv_channels: Sequence[int] = (32, 64),
    dense_units: int = 1024,
    activation: str = "relu",
    pieces: int = 2,
    kernel: int = 5,
    input_dropout: float = 0.0,
    hidden_dropout: float = 0.0,
    max_norm: float | None = None,
    preprocessing: keras.layers.Layer | None = None,
    regularizer: GradientRegularizer | None = None,
    name: str = "cnn",
) -> RegularizedModel:
    """Madry et al.'s MNIST network: conv 32, pool, conv 64, pool, dense 1024, logits.

    Each convolution is `kernel` x `kernel` with 'same' padding, followed by
    the activation and 2x2 max-pooling with stride 2 (output size rounded up,
    as 'same' padding in Madry et al.'s code does); then a dense layer of `dense_units`, the
    activation, and the float32 logits. On 28x28 MNIST the last map is
    7x7x64 and the defaults have 3,274,634 parameters. A narrower instance
    is one call: `cnn(conv_channels=(16, 32), dense_units=128)`.

    With `activation="maxout"` every convolution and the dense layer compute
    `pieces` times more outputs and `kgr.layers.Maxout` takes the max over
    groups of `pieces`, so widths count maxout units.

    The pooling is `kgr.layers.CeilMaxPooling2D`, a maximum over strided
    slices: the exact penalty differentiates its gradient exactly under XLA
    too (XLA's own max-pooling second derivative picks window maxima by
    bfloat16-rounded values; tests/test_networks.py).

    Madry et al. use no dropout; `input_dropout` and `hidden_dropout` add
    `kgr.layers.FastDropout` on the image and on the input of each later
    layer (convolution, dense and logits).

    Args:
        input_shape: (height, width, channels) of one image.
        num_classes: Number of logits, >= 2.
        conv_channels: Output channels of each convolution (each followed by
            pooling), input first.
        dense_units: Width of the dense layer before the logits.
        activation: "relu", "gelu" (exact, erf form), "softplus", "maxout",
            or another Keras activation name.
        pieces: Linear pieces per maxout unit (`activation="maxout"` only).
        kernel: Square kernel size of the convolutions.
        input_dropout: Dropout rate on the image, in [0, 1); 0 adds no layer.
        hidden_dropout: Dropout rate on the input of every later layer.
        max_norm: Max L2 norm of each unit's incoming weights (every
            convolution and dense layer); None for none.
        preprocessing: Optional layer applied to the input first, so the
            model takes raw pixels.
        regularizer: The model's `kgr.GradientRegularizer` (None: default).
        name: The model's name.

    Returns:
        An uncompiled `kgr.RegularizedModel` mapping images to logits (train
        it with `from_logits=True`).

    Raises:
        ValueError: On an invalid argument.
    """
    input_shape, input_dropout, hidden_dropout, max_norm = _parts.check_common(
        input_shape, num_classes, input_dropout, hidden_dropout, max_norm, preprocessing
    )
    if len(input_shape) != 3:
        raise ValueError(
            f"{name!r} needs input_shape=(height, width, channels). "
            f"Received: input_shape={input_shape!r}"
        )
    conv_channels = _parts.check_positive_ints(conv_channels, "conv_channels")
    _parts.check_positive_ints((dense_units,), "dense_units")
    _parts.check_positive_ints((kernel,), "kernel")
    check_activation(activation, pieces)

    def conv(filters, act, layer_name):
        return keras.layers.Conv2D(
            filters,
            kernel,
            padding="same",
            activation=act,
            kernel_constraint=_parts.conv_constraint(max_norm),
            name=layer_name,
        )

    def dense(units, act, layer_name):
        return keras.layers.Dense(
            units,
            activation=act,
            kernel_constraint=_parts.dense_constraint(max_norm),
            name=layer_name,
        )

    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs if preprocessing is None else preprocessing(inputs)
    for i, channels in enumerate(conv_channels):
        x = _parts.dropout(x, input_dropout if i == 0 else hidden_dropout, f"dropout_{i}")
        x = _unit(x, conv, channels, activation, pieces, "conv", i)
        # For 2x2 windows of stride 2 the same numbers as Keras's 'same' MaxPooling2D.
        x = CeilMaxPooling2D(2, 2, name=f"pool_{i}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    depth = len(conv_channels)
    x = _parts.dropout(x, hidden_dropout, f"dropout_{depth}")
    x = _unit(x, dense, dense_units, activation, pieces, "dense", depth)
    outputs = _parts.logits(x, num_classes, hidden_dropout, max_norm, depth + 1)
    return RegularizedModel(inputs, outputs, regularizer=regularizer, name=name)
