"""Tests of kgr.networks (the paper's networks), CeilMaxPooling2D and the whitening layer."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_gradreg as kgr
from keras_gradreg import networks
from keras_gradreg.layers import (
    CeilMaxPooling2D,
    ContrastNormalizeZCA,
    fit_zca,
    global_contrast_normalize,
)

MNIST = (28, 28, 1)
CIFAR = (32, 32, 3)


def _shape(name):
    return CIFAR if name == "conv_maxout_cifar10" else MNIST


def _layer_shapes(model, kind):
    return [tuple(layer.output.shape[1:]) for layer in model.layers if kind in layer.name]


def build(name, **kwargs):
    return networks.NETWORKS[name](**kwargs)


@pytest.mark.parametrize("name", list(networks.NETWORKS))
def test_logits_output(name):
    model = build(name, input_shape=_shape(name), num_classes=7)
    assert model.name == name
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
    model = build("maxout_mlp", input_shape=MNIST)
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert [layer.units for layer in dense] == [1200, 1200, 10]
    assert _layer_shapes(model, "maxout") == [(240,), (240,)]
    assert model.count_params() == 784 * 1200 + 1200 + 240 * 1200 + 1200 + 240 * 10 + 10


def test_conv_maxout_sizes_match_pylearn2():
    mnist = build("conv_maxout_mnist", input_shape=MNIST)
    assert _layer_shapes(mnist, "conv") == [(21, 21, 96), (9, 9, 96), (6, 6, 96)]
    # cuda-convnet pooling rounds up: 21 -> 10, 9 -> 4, 6 -> 3.
    assert _layer_shapes(mnist, "pool") == [(10, 10, 48), (4, 4, 48), (3, 3, 24)]
    cifar = build("conv_maxout_cifar10", input_shape=CIFAR)
    # h0 output 33x33 and h1 output 15x15 are pylearn2's partial_sum values.
    assert _layer_shapes(cifar, "conv") == [(33, 33, 192), (15, 15, 384), (9, 9, 384)]
    assert _layer_shapes(cifar, "maxout")[-1] == (500,)


def test_dropout_zero_means_no_dropout_layer():
    model = build("maxout_mlp", input_shape=MNIST, input_dropout=0, hidden_dropout=0)
    assert not [layer for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    model = build("conv_maxout_mnist", input_shape=MNIST, input_dropout=0.2)
    rates = [layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    assert rates == [0.2, 0.5, 0.5, 0.5]


def test_max_norm_constraints():
    model = build("conv_maxout_mnist", input_shape=MNIST)
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
    free = build("maxout_mlp", input_shape=MNIST, max_norm=None)
    assert all(
        layer.kernel_constraint is None
        for layer in free.layers
        if isinstance(layer, keras.layers.Dense)
    )


def test_hidden_units_and_regularizer():
    reg = kgr.GradientRegularizer(p=math.inf, sigma=0.3)
    model = build("sigmoid_mlp", input_shape=MNIST, hidden_units=(32, 16), regularizer=reg)
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
        ({"name": "conv_maxout_mnist", "hidden_units": (10,)}, "hidden_units"),
        ({"name": "maxout_mlp", "hidden_units": ()}, r"hidden_units=\(\)"),
        ({"name": "maxout_mlp", "input_dropout": 1.0}, "input_dropout=1.0"),
        ({"name": "maxout_mlp", "max_norm": 0.0}, "max_norm=0.0"),
        ({"name": "maxout_mlp", "num_classes": 1}, "num_classes=1"),
        ({"name": "conv_maxout_mnist", "input_shape": (784,)}, r"input_shape=\(784,\)"),
    ],
)
def test_bad_arguments(kwargs, match):
    kwargs = {"input_shape": MNIST, **kwargs}
    name = kwargs.pop("name")
    with pytest.raises((ValueError, TypeError), match=match):
        build(name, **kwargs)


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
    layer = CeilMaxPooling2D(pool, stride)
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
    model = build(
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
    assert isinstance(loaded.get_layer("pool_0"), CeilMaxPooling2D)


@pytest.mark.parametrize(
    "builder, kwargs, match",
    [
        (networks.mlp, {"hidden_units": (4,), "activation": "swirl"}, "activation='swirl'"),
        (networks.mlp, {"hidden_units": (4,), "pieces": 0}, r"pieces=\(0,\)"),
        (networks.conv_maxout, {"conv_layers": ()}, r"conv_layers=\(\)"),
        (networks.conv_maxout, {"conv_layers": [(4, 2, 3, 0, 2, 2)]}, "ConvMaxoutLayer"),
    ],
)
def test_generic_builders_reject_bad_arguments(builder, kwargs, match):
    with pytest.raises(ValueError, match=match):
        builder((8, 8, 1), 3, **kwargs)


def test_generic_builders_build_what_they_are_given():
    relu = networks.mlp((5,), 3, hidden_units=(7,), activation="relu", input_dropout=0)
    dense = [layer for layer in relu.layers if isinstance(layer, keras.layers.Dense)]
    assert [(d.units, d.activation.__name__) for d in dense] == [(7, "relu"), (3, "linear")]
    layer = networks.ConvMaxoutLayer(channels=4, pieces=3, kernel=3, pad=1, pool=2, pool_stride=2)
    conv = networks.conv_maxout((8, 8, 1), 3, conv_layers=[layer], dense_layers=[(5, 2)])
    # pad 1: 10x10, conv 3x3: 8x8x12, maxout: 8x8x4, pool 2/2: 4x4x4, dense 10 -> maxout 5.
    assert _layer_shapes(conv, "conv") == [(8, 8, 12)]
    assert _layer_shapes(conv, "pool") == [(4, 4, 4)]
    assert _layer_shapes(conv, "maxout") == [(8, 8, 4), (5,)]
    assert conv.count_params() == (9 * 12 + 12) + (64 * 10 + 10) + (5 * 3 + 3)


def test_zca_layer_golden_numbers():
    """A 2-example, 2-pixel case worked by hand.

    GCN (scale 1): x - mean(x) has norm 1 after scaling, so (0, 2) -> (-1, 1)/sqrt2
    and (3, 1) -> (1, -1)/sqrt2. Their mean is 0; the covariance is
    [[1, -1], [-1, 1]] / 2, with eigenvalues 1 (u = (1, -1)/sqrt2) and 0
    (v = (1, 1)/sqrt2). With filter_bias 1: W = u u^T / sqrt(2) + v v^T / 1.
    """
    layer = ContrastNormalizeZCA(scale=1.0, filter_bias=1.0)
    layer.adapt(np.array([[[0], [2]], [[3], [1]]], "uint8"))
    u, v = np.array([1.0, -1.0]) / np.sqrt(2), np.array([1.0, 1.0]) / np.sqrt(2)
    w = np.outer(u, u) / np.sqrt(2) + np.outer(v, v)
    np.testing.assert_allclose(np.asarray(layer.whitening), w, atol=1e-6)
    np.testing.assert_allclose(np.asarray(layer.mean), [0.0, 0.0], atol=1e-7)
    # (0, 0.5): GCN gives (-1, 1)/sqrt2 = -u, so the output is -u W = -u / sqrt2.
    out = np.asarray(layer(np.array([[[0.0], [0.5]]], "float32"))).reshape(-1)
    np.testing.assert_allclose(out, -u @ w, atol=1e-6)
    np.testing.assert_allclose(out, [-0.5, 0.5], atol=1e-6)


def test_zca_layer_round_trip_and_bad_arguments(tmp_path):
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, size=(40, 3, 3, 2)).astype("uint8")
    layer = ContrastNormalizeZCA(scale=10.0, filter_bias=0.5, name="w")
    layer.adapt(images)
    inputs = keras.Input((3, 3, 2))
    model = keras.Model(inputs, layer(inputs))
    path = str(tmp_path / "zca.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    x = images[:4].astype("float32") / 255.0
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    assert loaded.get_layer("w").get_config()["filter_bias"] == 0.5
    assert tuple(loaded.output.shape) == (None, 3, 3, 2)
    with pytest.raises(ValueError, match="scale=0"):
        ContrastNormalizeZCA(scale=0)
    with pytest.raises(ValueError, match="filter_bias=-1"):
        ContrastNormalizeZCA(filter_bias=-1)
    with pytest.raises(ValueError, match=r"x.shape=\(1, 3, 3, 2\)"):
        ContrastNormalizeZCA().adapt(images[:1])
    with pytest.raises(ValueError, match="built for 18"):
        layer.adapt(rng.integers(0, 256, size=(5, 4, 4, 2)))


def test_layers_saved_under_the_old_train_names_still_load():
    assert keras.saving.get_registered_object("keras_gradreg_train>CeilMaxPooling2D") is (
        CeilMaxPooling2D
    )
    assert keras.saving.get_registered_object("keras_gradreg_train>ContrastNormalizeZCA") is (
        ContrastNormalizeZCA
    )
    assert kgr.layers.CeilMaxPooling2D is CeilMaxPooling2D


# --------------------------------------------------------------------------- #
# kgr.networks.cnn: Madry et al.'s MNIST CNN.
# --------------------------------------------------------------------------- #


def _cnn_params(channels, dense, pieces=1, kernel=5, image=(28, 28, 1), classes=10):
    """Parameters of `cnn` counted by hand: two 'same' convs, two 2x2 pools, dense, logits."""
    count, depth = 0, image[2]
    for c in channels:
        count += kernel * kernel * depth * c * pieces + c * pieces
        depth = c
    side_h, side_w = image[0], image[1]
    for _ in channels:
        side_h, side_w = math.ceil(side_h / 2), math.ceil(side_w / 2)
    flat = side_h * side_w * depth
    return count + flat * dense * pieces + dense * pieces + dense * classes + classes


def test_cnn_is_madrys_network_and_its_narrow_and_maxout_variants():
    model = networks.cnn()
    assert _layer_shapes(model, "conv") == [(28, 28, 32), (14, 14, 64)]
    assert _layer_shapes(model, "pool") == [(14, 14, 32), (7, 7, 64)]
    # 5*5*32 + 32, 5*5*32*64 + 64, 7*7*64*1024 + 1024, 1024*10 + 10.
    assert model.count_params() == 832 + 51_264 + 3_212_288 + 10_250 == 3_274_634
    assert model.count_params() == _cnn_params((32, 64), 1024)
    assert not [layer for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    narrow = networks.cnn(conv_channels=(16, 32), dense_units=128)
    # 5*5*16 + 16, 5*5*16*32 + 32, 7*7*32*128 + 128, 128*10 + 10.
    assert narrow.count_params() == 416 + 12_832 + 200_832 + 1_290
    assert narrow.count_params() == _cnn_params((16, 32), 128)
    maxout = networks.cnn(conv_channels=(16, 32), dense_units=128, activation="maxout", pieces=3)
    # Each layer computes 3 pieces per unit: 5*5*48 + 48, 5*5*16*96 + 96, 1568*384 + 384.
    assert maxout.count_params() == 1_248 + 38_496 + 602_496 + 1_290
    assert maxout.count_params() == _cnn_params((16, 32), 128, pieces=3)
    assert _layer_shapes(maxout, "maxout") == [(28, 28, 16), (14, 14, 32), (128,)]
    # Odd sizes: 'same' pooling rounds up, 9 -> 5 -> 3.
    odd = networks.cnn((9, 9, 3), 4, conv_channels=(2, 3), dense_units=5, kernel=3)
    assert _layer_shapes(odd, "pool") == [(5, 5, 2), (3, 3, 3)]
    assert odd.count_params() == _cnn_params((2, 3), 5, kernel=3, image=(9, 9, 3), classes=4)


def _conv_same(x, kernel, bias):
    k = kernel.shape[0]
    padded = np.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (k, k), axis=(1, 2))
    # windows: (n, h, w, c_in, k, k); kernel: (k, k, c_in, c_out).
    return np.einsum("nhwcij,ijco->nhwo", windows, kernel) + bias


def _pool_same(x):
    """2x2 max-pooling, stride 2, 'same': the last window of an odd side holds one row."""
    n, h, w, c = x.shape
    padded = np.full((n, h + h % 2, w + w % 2, c), -np.inf)
    padded[:, :h, :w] = x
    return padded.reshape(n, padded.shape[1] // 2, 2, padded.shape[2] // 2, 2, c).max(axis=(2, 4))


_ERF = np.vectorize(math.erf)
NUMPY_ACTIVATIONS = {
    "relu": lambda z, pieces: np.maximum(z, 0.0),
    "gelu": lambda z, pieces: 0.5 * z * (1.0 + _ERF(z / math.sqrt(2.0))),
    "softplus": lambda z, pieces: np.logaddexp(0.0, z),
    # pylearn2's grouping: channels [i * k, (i + 1) * k) feed unit i.
    "maxout": lambda z, pieces: z.reshape(*z.shape[:-1], -1, pieces).max(axis=-1),
}


@pytest.mark.parametrize("activation", list(NUMPY_ACTIVATIONS))
def test_cnn_forward_pass_matches_numpy(activation):
    """The whole network in float64 NumPy: 'same' convs, activation, pooling, dense, logits."""
    pieces = 3
    model = networks.cnn(
        (7, 7, 2), 4, conv_channels=(3, 4), dense_units=5, activation=activation, pieces=pieces
    )
    rng = np.random.default_rng(7)
    # Weights of both signs and scale ~1, so every activation's curved part is used.
    model.set_weights([rng.normal(scale=0.5, size=w.shape) for w in model.get_weights()])
    x = rng.uniform(size=(3, 7, 7, 2))
    weights = [w.astype(np.float64) for w in model.get_weights()]
    act = NUMPY_ACTIVATIONS[activation]
    h = x
    for i in range(2):
        h = _pool_same(act(_conv_same(h, weights[2 * i], weights[2 * i + 1]), pieces))
    assert h.shape == (3, 2, 2, 4)  # 7 -> 4 -> 2.
    h = act(h.reshape(3, -1) @ weights[4] + weights[5], pieces)
    expected = h @ weights[6] + weights[7]
    got = np.asarray(model(x.astype("float32"), training=True))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # One layer's activation alone, on a pre-activation of both signs.
    layer = model.get_layer("maxout_0" if activation == "maxout" else "conv_0")
    probe = keras.Model(model.input, [model.get_layer("conv_0").output, layer.output])
    if activation != "maxout":
        linear = np.asarray(
            keras.ops.conv(x.astype("float32"), model.get_layer("conv_0").kernel, padding="same")
            + model.get_layer("conv_0").bias
        )
        assert (linear < 0).any() and (linear > 0).any()
        np.testing.assert_allclose(
            np.asarray(probe(x.astype("float32"))[1]), act(linear.astype(np.float64), pieces),
            rtol=1e-5, atol=1e-5,
        )  # fmt: skip
    else:
        pre, out = (np.asarray(t, np.float64) for t in probe(x.astype("float32")))
        np.testing.assert_array_equal(out, act(pre, pieces))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"activation": "swirl"}, "Received: activation='swirl'"),
        ({"activation": 3}, "Received: activation=3"),
        ({"activation": "maxout", "pieces": 0}, r"Received: pieces=\(0,\)"),
        ({"conv_channels": ()}, r"Received: conv_channels=\(\)"),
        ({"conv_channels": (16, 0)}, r"Received: conv_channels=\(16, 0\)"),
        ({"dense_units": 0}, r"Received: dense_units=\(0,\)"),
        ({"dense_units": 2.5}, r"Received: dense_units=\(2.5,\)"),
        ({"kernel": 0}, r"Received: kernel=\(0,\)"),
        ({"hidden_dropout": 1.0}, "Received: hidden_dropout=1.0"),
        ({"max_norm": -1.0}, "Received: max_norm=-1.0"),
        ({"input_shape": (784,)}, r"Received: input_shape=\(784,\)"),
        ({"num_classes": 1}, "Received: num_classes=1"),
    ],
)
def test_cnn_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        networks.cnn(**kwargs)


def test_cnn_dropout_and_max_norm_when_asked():
    model = networks.cnn(
        conv_channels=(4, 8), dense_units=16, input_dropout=0.1, hidden_dropout=0.3, max_norm=2.0
    )
    rates = [layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    assert rates == [0.1, 0.3, 0.3, 0.3]  # image, conv_1, dense_2, logits.
    assert all(
        isinstance(layer, kgr.layers.FastDropout) for layer in model.layers if "drop" in layer.name
    )
    norms = [layer.kernel_constraint.max_value for layer in model.layers if "kernel" in dir(layer)]
    assert norms == [2.0, 2.0, 2.0, 2.0]


@pytest.mark.parametrize("activation", ["gelu", "maxout"])
def test_cnn_saving_round_trip(tmp_path, activation):
    reg = kgr.GradientRegularizer(p=math.inf, sigma=0.3, method="adversarial")
    model = networks.cnn(
        conv_channels=(4, 8), dense_units=16, activation=activation, hidden_dropout=0.5,
        regularizer=reg,
    )  # fmt: skip
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    path = str(tmp_path / "cnn.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    x = np.random.default_rng(8).uniform(size=(4, 28, 28, 1)).astype("float32")
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
    assert loaded.regularizer == reg and loaded.count_params() == model.count_params()
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in model.layers]


def _penalty_steps(activation, mode):
    """Weights after two SGD steps of p=inf's exact penalty on a small `cnn`, from fixed weights."""
    rng = np.random.default_rng(9)
    x = rng.uniform(size=(16, 12, 12, 1)).astype("float32")
    y = rng.integers(0, 3, size=16)
    model = networks.cnn(
        (12, 12, 1), 3, conv_channels=(3, 4), dense_units=8, activation=activation,
        regularizer=kgr.GradientRegularizer(p=math.inf, sigma=0.3),
    )  # fmt: skip
    model.set_weights([rng.normal(scale=0.3, size=w.shape) for w in model.get_weights()])
    model.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        run_eagerly=mode == "eager",
        jit_compile=mode == "xla",
    )
    logs = model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0).history
    assert logs["penalty"][0] > 0
    return model.get_weights()


# tf2xla's MaxPoolGradGrad (tensorflow/compiler/tf2xla/kernels/pooling_ops.cc)
# picks each window's maximum by the input rounded to bfloat16 and takes the
# later of tied values where TensorFlow's kernel takes the first (1.2%
# relative error in the penalty's parameter gradient on a small ReLU network
# here). kgr.layers.CeilMaxPooling2D is a maximum over strided slices, exact
# under XLA: this test fails if the networks go back to a max-pooling op.
@pytest.mark.parametrize("activation", ["relu", "maxout"])
@pytest.mark.parametrize("mode", ["graph", "xla"])
def test_cnn_penalty_steps_through_max_pooling_agree_with_eager(activation, mode):
    """The exact penalty differentiates max-pooling's gradient (its double backward)."""
    for a, b in zip(_penalty_steps(activation, "eager"), _penalty_steps(activation, mode)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
