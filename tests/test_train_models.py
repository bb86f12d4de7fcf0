"""Tests of train.models (the paper's networks) and train.preprocessing."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_gradreg as kgr
from train import models
from train.preprocessing import ContrastNormalizeZCA, fit_zca, global_contrast_normalize

MNIST = (28, 28, 1)
CIFAR = (32, 32, 3)


def _shape(name):
    return CIFAR if name == "conv_maxout_cifar10" else MNIST


def _layer_shapes(model, kind):
    return [tuple(layer.output.shape[1:]) for layer in model.layers if kind in layer.name]


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_logits_output(name):
    model = models.build_model(name, input_shape=_shape(name), num_classes=7)
    assert isinstance(model, kgr.RegularizedModel)
    x = np.random.default_rng(0).uniform(size=(2, *_shape(name))).astype("float32")
    out = model(x, training=False)
    assert tuple(out.shape) == (2, 7)
    last = model.layers[-1]
    assert last.name == "logits" and last.activation is keras.activations.linear
    assert out.dtype == "float32"
    # Logits: not a probability vector.
    assert not np.allclose(np.sum(np.asarray(out), axis=1), 1.0)


def test_maxout_mlp_is_the_papers_784_240x5_240x5_10():
    model = models.build_model("maxout_mlp", input_shape=MNIST)
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert [layer.units for layer in dense] == [1200, 1200, 10]
    assert _layer_shapes(model, "maxout") == [(240,), (240,)]
    assert model.count_params() == 784 * 1200 + 1200 + 240 * 1200 + 1200 + 240 * 10 + 10


def test_conv_maxout_sizes_match_pylearn2():
    mnist = models.build_model("conv_maxout_mnist", input_shape=MNIST)
    assert _layer_shapes(mnist, "conv") == [(21, 21, 96), (9, 9, 96), (6, 6, 96)]
    # cuda-convnet pooling rounds up: 21 -> 10, 9 -> 4, 6 -> 3.
    assert _layer_shapes(mnist, "pool") == [(10, 10, 48), (4, 4, 48), (3, 3, 24)]
    cifar = models.build_model("conv_maxout_cifar10", input_shape=CIFAR)
    # h0 output 33x33 and h1 output 15x15 are pylearn2's partial_sum values.
    assert _layer_shapes(cifar, "conv") == [(33, 33, 192), (15, 15, 384), (9, 9, 384)]
    assert _layer_shapes(cifar, "maxout")[-1] == (500,)


def test_dropout_zero_means_no_dropout_layer():
    model = models.build_model("maxout_mlp", input_shape=MNIST, input_dropout=0, hidden_dropout=0)
    assert not [layer for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    model = models.build_model("conv_maxout_mnist", input_shape=MNIST, input_dropout=0.2)
    rates = [layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    assert rates == [0.2, 0.5, 0.5, 0.5]


def test_max_norm_constraints():
    model = models.build_model("conv_maxout_mnist", input_shape=MNIST)
    kernels = {
        layer.name: layer.kernel_constraint for layer in model.layers if "kernel" in dir(layer)
    }
    assert kernels["conv_0"].max_value == 0.9 and kernels["conv_0"].axis == [0, 1, 2]
    assert kernels["conv_1"].max_value == 1.9365
    assert kernels["logits"].max_value == 1.9365 and kernels["logits"].axis == 0
    # The constraint bounds each output unit's incoming weights.
    big = np.random.default_rng(0).normal(size=(8, 8, 1, 96)).astype("float32") * 10
    norms = np.sqrt(np.sum(np.asarray(kernels["conv_0"](big)) ** 2, axis=(0, 1, 2)))
    np.testing.assert_allclose(norms, 0.9, rtol=1e-5)
    free = models.build_model("maxout_mlp", input_shape=MNIST, max_norm=None)
    assert all(
        layer.kernel_constraint is None
        for layer in free.layers
        if isinstance(layer, keras.layers.Dense)
    )


def test_hidden_units_and_regularizer():
    reg = kgr.GradientRegularizer(p=math.inf, sigma=0.3)
    model = models.build_model(
        "sigmoid_mlp", input_shape=MNIST, hidden_units=(32, 16), regularizer=reg
    )
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert [(layer.units, layer.activation.__name__) for layer in dense] == [
        (32, "sigmoid"),
        (16, "sigmoid"),
        (10, "linear"),
    ]
    assert model.regularizer == reg


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "resnet"}, "name='resnet'"),
        ({"name": "conv_maxout_mnist", "hidden_units": (10,)}, r"hidden_units=\(10,\)"),
        ({"name": "maxout_mlp", "input_dropout": 1.0}, "input_dropout=1.0"),
        ({"name": "maxout_mlp", "max_norm": 0.0}, "max_norm=0.0"),
        ({"name": "maxout_mlp", "num_classes": 1}, "num_classes=1"),
        ({"name": "conv_maxout_mnist", "input_shape": (784,)}, r"input_shape=\(784,\)"),
    ],
)
def test_bad_arguments(kwargs, match):
    kwargs = {"input_shape": MNIST, **kwargs}
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        models.build_model(name, **kwargs)


def _ceil_pool_reference(x, pool, stride):
    n, h, w, c = x.shape
    out_h = math.ceil((h - pool) / stride) + 1
    out_w = math.ceil((w - pool) / stride) + 1
    out = np.empty((n, out_h, out_w, c), x.dtype)
    for i in range(out_h):
        for j in range(out_w):
            window = x[:, i * stride : i * stride + pool, j * stride : j * stride + pool]
            out[:, i, j] = window.max(axis=(1, 2))
    return out


@pytest.mark.parametrize("size, pool, stride", [(21, 4, 2), (9, 4, 2), (6, 2, 2), (33, 4, 2)])
def test_ceil_max_pooling_matches_reference(size, pool, stride):
    # Negative values: a zero-padded partial window would be wrong.
    x = -np.random.default_rng(size).uniform(1, 2, size=(2, size, size + 1, 3)).astype("float32")
    layer = models.CeilMaxPooling2D(pool, stride)
    expected = _ceil_pool_reference(x, pool, stride)
    np.testing.assert_array_equal(np.asarray(layer(x)), expected)
    assert layer.compute_output_shape(x.shape) == expected.shape


def test_gcn_and_zca_reference():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(300, 4, 4, 2)).astype("uint8")
    gcn = global_contrast_normalize(images, scale=55.0)
    np.testing.assert_allclose(gcn.mean(axis=1), 0.0, atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(gcn, axis=1), 55.0)
    mean, w = fit_zca(gcn, filter_bias=1.0)
    white = (gcn - mean) @ w
    cov = np.cov(gcn, rowvar=False, bias=True)
    s, u = np.linalg.eigh(cov)
    expected = (u * (np.maximum(s, 0) / (np.maximum(s, 0) + 1.0))) @ u.T
    np.testing.assert_allclose(np.cov(white, rowvar=False, bias=True), expected, atol=1e-4)
    np.testing.assert_allclose(w, w.T, atol=1e-6)  # ZCA: symmetric, no rotation.


def test_zca_with_fewer_examples_than_dimensions_matches_eigh():
    rng = np.random.default_rng(4)
    x = global_contrast_normalize(rng.integers(0, 256, size=(10, 40)))
    mean, w = fit_zca(x, filter_bias=0.5)
    centred = x - x.mean(axis=0)
    s, u = np.linalg.eigh(centred.T @ centred / len(x))
    expected = (u / np.sqrt(np.maximum(s, 0) + 0.5)) @ u.T
    np.testing.assert_allclose(w, expected, atol=1e-5)
    np.testing.assert_allclose(mean, x.mean(axis=0), atol=1e-5)


def test_whitening_layer_matches_numpy_and_is_scale_free():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(200, 4, 4, 3)).astype("uint8")
    layer = ContrastNormalizeZCA()
    layer.adapt(images)
    mean, w = fit_zca(global_contrast_normalize(images), 1.0)
    expected = ((global_contrast_normalize(images[:5]) - mean) @ w).reshape(5, 4, 4, 3)
    pixels = images[:5].astype("float32") / 255.0  # GCN removes the scale.
    np.testing.assert_allclose(np.asarray(layer(pixels)), expected, atol=1e-3)


def test_whitening_gradient_finite_on_constant_image():
    layer = ContrastNormalizeZCA()
    layer.adapt(np.random.default_rng(2).integers(0, 256, size=(50, 2, 2, 3)).astype("uint8"))
    x = tf.constant(np.full((1, 2, 2, 3), 0.5, "float32"))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.reduce_sum(layer(x))
    gradient = tape.gradient(y, x).numpy()
    assert np.all(np.isfinite(gradient))
    assert np.all(np.isfinite(layer(x).numpy()))


def test_saving_round_trip_with_custom_layers(tmp_path):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(64, 16, 16, 3)).astype("uint8")
    whitening = ContrastNormalizeZCA(name="gcn_zca")
    whitening.adapt(images)
    model = models.build_model(
        "conv_maxout_mnist",
        input_shape=(16, 16, 3),
        preprocessing=whitening,
        regularizer=kgr.GradientRegularizer(p=math.inf, sigma=0.01),
    )
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    x = images[:3].astype("float32") / 255.0
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)
    assert loaded.regularizer == model.regularizer
    assert isinstance(loaded.get_layer("pool_0"), models.CeilMaxPooling2D)
