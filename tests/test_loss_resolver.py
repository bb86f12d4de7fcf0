"""`gradients.get_loss`: the one loss resolver of the attacks, gradients and the objective."""

import keras
import numpy as np
import pytest

from keras_gradreg import gradients, regularized_loss
from keras_gradreg.attacks import common

Y = np.array([0, 1])
LOGITS = np.array([[2.0, 0.0], [0.0, 1.0]], "float32")
# -log softmax: log(1 + e^-2) and log(1 + e^-1).
CROSS_ENTROPY = np.log1p(np.exp([-2.0, -1.0]))


def _model(loss=None):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    if loss is not None:
        model.compile(loss=loss)
    return model


def test_names_objects_functions_and_the_compiled_loss_resolve_to_the_same_values():
    sce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for model, loss in (
        (None, sce),
        (None, lambda y, z: keras.losses.sparse_categorical_crossentropy(y, z, from_logits=True)),
        (_model(sce), None),
    ):
        resolved = gradients.resolve_loss(model, loss)
        np.testing.assert_allclose(resolved(Y, LOGITS), CROSS_ENTROPY, rtol=1e-6)
    found = gradients.get_loss("sparse_categorical_crossentropy")
    assert found is keras.losses.get("sparse_categorical_crossentropy")
    assert gradients.get_loss(None, _model(sce)) is sce
    # The attacks' module uses the same functions.
    assert common.resolve_loss is gradients.resolve_loss
    assert common.loss_from_logits is gradients.loss_from_logits


@pytest.mark.parametrize(
    "loss, model, name, match",
    [
        ("no_such_loss", None, "loss_fn", r"Unknown loss. Received: loss_fn='no_such_loss'"),
        (3, None, "loss", r"`loss` must be a Keras loss.*Received: loss=3"),
        (None, None, "loss_fn", r"Received: loss_fn=None"),
        (None, "uncompiled", "loss", r"`loss=None` uses the model's compiled loss.*=None"),
        (None, "two losses", "loss", r"must be a single loss.*Received: model.loss="),
    ],
)
def test_bad_losses_are_refused_naming_the_argument(loss, model, name, match):
    model = {None: None, "uncompiled": _model(), "two losses": _model(["mse", "mse"])}[model]
    with pytest.raises(ValueError, match=match):
        gradients.get_loss(loss, model, name)


def test_from_logits_read_through_the_resolver():
    sce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    assert gradients.loss_from_logits(_model(sce)) is True
    assert gradients.loss_from_logits(None, "sparse_categorical_crossentropy") is False
    assert gradients.loss_from_logits(_model()) is None
    assert gradients.loss_from_logits(None, "no_such_loss") is None


def test_regularized_loss_resolves_loss_fn_names_the_same_way():
    model = _model()
    model.layers[0].set_weights([np.eye(2, dtype="float32"), np.zeros(2, "float32")])
    probabilities = np.array([[0.8, 0.2], [0.3, 0.7]], "float32")
    result = regularized_loss(
        model, probabilities, Y, "sparse_categorical_crossentropy", {"sigma": 0.0}
    )
    # The named loss reads probabilities: the batch mean of -log p_y.
    np.testing.assert_allclose(float(result.data_loss), -np.mean(np.log([0.8, 0.7])), rtol=1e-6)
    with pytest.raises(ValueError, match=r"Unknown loss. Received: loss_fn='no_such_loss'"):
        regularized_loss(model, probabilities, Y, "no_such_loss", {"sigma": 0.0})
