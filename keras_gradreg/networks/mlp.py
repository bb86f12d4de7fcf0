"""Multilayer perceptrons: the paper's sigmoid MLP and the maxout MLP."""

from __future__ import annotations

from collections.abc import Sequence

import keras

from keras_gradreg.layers import Maxout
from keras_gradreg.model import RegularizedModel
from keras_gradreg.networks import _parts
from keras_gradreg.regularizer import GradientRegularizer


def _check_activation(activation: str, pieces: int) -> None:
    if activation == "maxout":
        _parts.check_positive_ints((pieces,), "pieces")
        return
    try:
        keras.activations.get(activation)
    except (ValueError, TypeError):
        raise ValueError(
            '`activation` must be "maxout" or a Keras activation name. '
            f"Received: activation={activation!r}"
        ) from None


def mlp(
    input_shape: Sequence[int],
    num_classes: int = 10,
    *,
    hidden_units: Sequence[int],
    activation: str = "maxout",
    pieces: int = 5,
    input_dropout: float = 0.2,
    hidden_dropout: float = 0.5,
    max_norm: float | None = 1.9365,
    preprocessing: keras.layers.Layer | None = None,
    regularizer: GradientRegularizer | None = None,
    name: str = "mlp",
) -> RegularizedModel:
    """A dense network with dropout and max-norm, ending in logits.

    The input is flattened; each hidden layer is dropout, `Dense`, then the
    activation; the logits layer gets dropout too (as in the maxout paper's
    pylearn2 configs) and is computed in float32.

    Args:
        input_shape: Shape of one example, e.g. (28, 28, 1) or (784,).
        num_classes: Number of logits, >= 2.
        hidden_units: Width of each hidden layer: units after maxout for
            `activation="maxout"` (the `Dense` layer has `pieces` times more).
        activation: "maxout", or a Keras activation name such as "sigmoid".
        pieces: Linear pieces per maxout unit.
        input_dropout: Dropout rate on the input, in [0, 1); 0 adds no layer.
        hidden_dropout: Dropout rate on the input of every later layer.
        max_norm: Max L2 norm of each unit's incoming weights; None for none.
        preprocessing: Optional layer applied to the input first (e.g.
            `kgr.layers.ContrastNormalizeZCA`), so the model takes raw pixels.
        regularizer: The model's `kgr.GradientRegularizer` (None: default).
        name: The model's name.

    Returns:
        An uncompiled `kgr.RegularizedModel` mapping inputs to logits (train
        it with `from_logits=True`).

    Raises:
        ValueError: On an invalid argument.
    """
    input_shape, input_dropout, hidden_dropout, max_norm = _parts.check_common(
        input_shape, num_classes, input_dropout, hidden_dropout, max_norm, preprocessing
    )
    units = _parts.check_positive_ints(hidden_units, "hidden_units")
    _check_activation(activation, pieces)
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs if preprocessing is None else preprocessing(inputs)
    x = keras.layers.Flatten(name="flatten")(x)
    for i, width in enumerate(units):
        x = _parts.dropout(x, input_dropout if i == 0 else hidden_dropout, f"dropout_{i}")
        maxout = activation == "maxout"
        x = keras.layers.Dense(
            width * pieces if maxout else width,
            activation=None if maxout else activation,
            kernel_constraint=_parts.dense_constraint(max_norm),
            name=f"dense_{i}",
        )(x)
        if maxout:
            x = Maxout(width, name=f"maxout_{i}")(x)
    outputs = _parts.logits(x, num_classes, hidden_dropout, max_norm, len(units))
    return RegularizedModel(inputs, outputs, regularizer=regularizer, name=name)


def maxout_mlp(
    input_shape: Sequence[int] = (28, 28, 1),
    num_classes: int = 10,
    *,
    hidden_units: Sequence[int] = (240, 240),
    input_dropout: float = 0.2,
    hidden_dropout: float = 0.5,
    max_norm: float | None = 1.9365,
    preprocessing: keras.layers.Layer | None = None,
    regularizer: GradientRegularizer | None = None,
    name: str = "maxout_mlp",
) -> RegularizedModel:
    """The maxout paper's permutation-invariant MNIST MLP: 784-240x5-240x5-10.

    Dropout 0.2 on the input and 0.5 on hidden layers, max-norm 1.9365 (the
    pylearn2 config `mnist_pi.yaml`). Arguments as for `mlp`, with 5 pieces;
    the defaults are the paper's.
    """
    return mlp(
        input_shape,
        num_classes,
        hidden_units=hidden_units,
        activation="maxout",
        pieces=5,
        input_dropout=input_dropout,
        hidden_dropout=hidden_dropout,
        max_norm=max_norm,
        preprocessing=preprocessing,
        regularizer=regularizer,
        name=name,
    )


def sigmoid_mlp(
    input_shape: Sequence[int] = (28, 28, 1),
    num_classes: int = 10,
    *,
    hidden_units: Sequence[int] = (1200, 1200),
    input_dropout: float = 0.2,
    hidden_dropout: float = 0.5,
    max_norm: float | None = 1.9365,
    preprocessing: keras.layers.Layer | None = None,
    regularizer: GradientRegularizer | None = None,
    name: str = "sigmoid_mlp",
) -> RegularizedModel:
    """The paper's sigmoid MLP on MNIST.

    Its widths are not known (docs/method.md); 2 x 1200 is the common MNIST
    MLP of the dropout papers of the time. Dropout and max-norm as for the
    maxout MLP. Arguments as for `mlp`.
    """
    return mlp(
        input_shape,
        num_classes,
        hidden_units=hidden_units,
        activation="sigmoid",
        input_dropout=input_dropout,
        hidden_dropout=hidden_dropout,
        max_norm=max_norm,
        preprocessing=preprocessing,
        regularizer=regularizer,
        name=name,
    )
