"""The maxout paper's convolutional maxout networks for MNIST and CIFAR-10."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import keras

from keras_gradreg.layers import CeilMaxPooling2D, Maxout
from keras_gradreg.model import RegularizedModel
from keras_gradreg.networks import _parts
from keras_gradreg.regularizer import GradientRegularizer


class ConvMaxoutLayer(NamedTuple):
    """One convolutional maxout layer: zero padding, convolution, maxout, pooling.

    Attributes:
        channels: Maxout units (output channels).
        pieces: Filters per unit; the convolution has channels * pieces filters.
        kernel: Square kernel size (valid convolution after the padding).
        pad: Zero padding on each side.
        pool: Max-pooling window (cuda-convnet's rounding up, `CeilMaxPooling2D`).
        pool_stride: Max-pooling stride.
    """

    channels: int
    pieces: int
    kernel: int
    pad: int
    pool: int
    pool_stride: int


# pylearn2's scripts/papers/maxout/mnist.yaml and cifar10_no_aug_valid.yaml.
MNIST_LAYERS = (
    ConvMaxoutLayer(48, 2, 8, 0, 4, 2),
    ConvMaxoutLayer(48, 2, 8, 3, 4, 2),
    ConvMaxoutLayer(24, 4, 5, 3, 2, 2),
)
CIFAR10_LAYERS = (
    ConvMaxoutLayer(96, 2, 8, 4, 4, 2),
    ConvMaxoutLayer(192, 2, 8, 3, 4, 2),
    ConvMaxoutLayer(192, 2, 5, 3, 2, 2),
)


def _conv_maxout_layer(x, layer: ConvMaxoutLayer, index: int, rate: float, max_norm):
    """Dropout, zero padding, convolution, maxout and pooling of one layer."""
    x = _parts.dropout(x, rate, f"dropout_{index}")
    if layer.pad:
        x = keras.layers.ZeroPadding2D(layer.pad, name=f"pad_{index}")(x)
    x = keras.layers.Conv2D(
        layer.channels * layer.pieces,
        layer.kernel,
        kernel_constraint=_parts.conv_constraint(max_norm),
        name=f"conv_{index}",
    )(x)
    x = Maxout(layer.channels, name=f"maxout_{index}")(x)
    return CeilMaxPooling2D(layer.pool, layer.pool_stride, name=f"pool_{index}")(x)


def _check_layers(name: str, conv_layers, dense_layers) -> None:
    if not conv_layers or not all(isinstance(layer, ConvMaxoutLayer) for layer in conv_layers):
        raise ValueError(
            "`conv_layers` must be a non-empty sequence of ConvMaxoutLayer. "
            f"Received: conv_layers={conv_layers!r}"
        )
    for units, pieces in dense_layers:
        _parts.check_positive_ints((units, pieces), "dense_layers")


def conv_maxout(
    input_shape: Sequence[int],
    num_classes: int = 10,
    *,
    conv_layers: Sequence[ConvMaxoutLayer],
    dense_layers: Sequence[tuple[int, int]] = (),
    input_dropout: float = 0.2,
    hidden_dropout: float = 0.5,
    max_norm: float | None = 1.9365,
    first_conv_max_norm: float | None = 0.9,
    preprocessing: keras.layers.Layer | None = None,
    regularizer: GradientRegularizer | None = None,
    name: str = "conv_maxout",
) -> RegularizedModel:
    """Convolutional maxout layers, optional dense maxout layers, then logits.

    Every layer's input gets dropout: `input_dropout` before the first,
    `hidden_dropout` before each later one, the logits layer included.

    Args:
        input_shape: (height, width, channels) of one image.
        num_classes: Number of logits, >= 2.
        conv_layers: The `ConvMaxoutLayer`s, input first.
        dense_layers: (units, pieces) of each dense maxout layer after them.
        input_dropout: Dropout rate on the input, in [0, 1); 0 adds no layer.
        hidden_dropout: Dropout rate on the input of every later layer.
        max_norm: Max L2 norm of each unit's incoming weights in dense layers
            and all but the first convolution; None for none.
        first_conv_max_norm: Max L2 norm of each filter of the first
            convolution (pylearn2's max_kernel_norm); None for none.
        preprocessing: Optional layer applied to the input first (e.g.
            `kgr.layers.ContrastNormalizeZCA`), so the model takes raw pixels.
        regularizer: The model's `kgr.GradientRegularizer` (None: default).
        name: The model's name.

    Returns:
        An uncompiled `kgr.RegularizedModel` mapping images to logits.

    Raises:
        ValueError: On an invalid argument.
    """
    input_shape, input_dropout, hidden_dropout, max_norm = _parts.check_common(
        input_shape, num_classes, input_dropout, hidden_dropout, max_norm, preprocessing
    )
    first_conv_max_norm = _parts.check_norm(first_conv_max_norm, "first_conv_max_norm")
    if len(input_shape) != 3:
        raise ValueError(
            f"{name!r} needs input_shape=(height, width, channels). "
            f"Received: input_shape={input_shape!r}"
        )
    _check_layers(name, conv_layers, dense_layers)
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs if preprocessing is None else preprocessing(inputs)
    for i, layer in enumerate(conv_layers):
        rate = input_dropout if i == 0 else hidden_dropout
        x = _conv_maxout_layer(x, layer, i, rate, first_conv_max_norm if i == 0 else max_norm)
    x = keras.layers.Flatten(name="flatten")(x)
    depth = len(conv_layers)
    for units, pieces in dense_layers:
        x = _parts.dropout(x, hidden_dropout, f"dropout_{depth}")
        x = keras.layers.Dense(
            units * pieces,
            kernel_constraint=_parts.dense_constraint(max_norm),
            name=f"dense_{depth}",
        )(x)
        x = Maxout(units, name=f"maxout_{depth}")(x)
        depth += 1
    outputs = _parts.logits(x, num_classes, hidden_dropout, max_norm, depth)
    return RegularizedModel(inputs, outputs, regularizer=regularizer, name=name)


def conv_maxout_mnist(
    input_shape: Sequence[int] = (28, 28, 1),
    num_classes: int = 10,
    *,
    input_dropout: float = 0.2,
    hidden_dropout: float = 0.5,
    max_norm: float | None = 1.9365,
    first_conv_max_norm: float | None = 0.9,
    preprocessing: keras.layers.Layer | None = None,
    regularizer: GradientRegularizer | None = None,
    name: str = "conv_maxout_mnist",
) -> RegularizedModel:
    """The maxout paper's MNIST network (0.45% test error there).

    Conv 48 x 2 pieces 8x8 (pool 4, stride 2); conv 48 x 2 8x8 pad 3 (pool
    4/2); conv 24 x 4 5x5 pad 3 (pool 2/2); softmax; the last map is 3x3x24.
    Arguments as for `conv_maxout`; the defaults are the paper's.
    """
    return conv_maxout(
        input_shape,
        num_classes,
        conv_layers=MNIST_LAYERS,
        input_dropout=input_dropout,
        hidden_dropout=hidden_dropout,
        max_norm=max_norm,
        first_conv_max_norm=first_conv_max_norm,
        preprocessing=preprocessing,
        regularizer=regularizer,
        name=name,
    )


def conv_maxout_cifar10(
    input_shape: Sequence[int] = (32, 32, 3),
    num_classes: int = 10,
    *,
    input_dropout: float = 0.2,
    hidden_dropout: float = 0.5,
    max_norm: float | None = 1.9365,
    first_conv_max_norm: float | None = 0.9,
    preprocessing: keras.layers.Layer | None = None,
    regularizer: GradientRegularizer | None = None,
    name: str = "conv_maxout_cifar10",
) -> RegularizedModel:
    """The maxout paper's CIFAR-10 network without augmentation (11.68% there).

    Conv 96 x 2 8x8 pad 4; conv 192 x 2 8x8 pad 3; conv 192 x 2 5x5 pad 3;
    dense maxout 500 x 5; softmax. The paper trained on GCN and ZCA-whitened
    images: pass `preprocessing=kgr.layers.ContrastNormalizeZCA()`, adapted on
    the training images, to keep the model's input in pixel space. Arguments
    as for `conv_maxout`.
    """
    return conv_maxout(
        input_shape,
        num_classes,
        conv_layers=CIFAR10_LAYERS,
        dense_layers=((500, 5),),
        input_dropout=input_dropout,
        hidden_dropout=hidden_dropout,
        max_norm=max_norm,
        first_conv_max_norm=first_conv_max_norm,
        preprocessing=preprocessing,
        regularizer=regularizer,
        name=name,
    )
