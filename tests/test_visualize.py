"""Tests for kgr.visualize: perturbation grids."""

import math
import struct

import keras
import matplotlib
import numpy as np
import pytest

from keras_gradreg import visualize
from keras_gradreg.gradients import input_gradients


def _png_size(path):
    with open(path, "rb") as file:
        header = file.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


@pytest.fixture(scope="module")
def linear_model():
    """Softmax regression on flat 8x8 images: r* has a closed form in NumPy."""
    rng = np.random.default_rng(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(3)])
    weights = rng.normal(size=(64, 3)).astype("float32")
    model.layers[0].set_weights([weights, np.zeros(3, "float32")])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = rng.uniform(size=(3, 64)).astype("float32")
    return model, weights, x, np.array([0, 1, 2])


def test_perturbations_are_the_closed_form_r_star(linear_model, tmp_path):
    model, weights, x, y = linear_model
    path = str(tmp_path / "grid.png")
    steps = visualize.perturbations(model, x, y, sigma={1: 2.0, 2: 1.0, "inf": 0.1}, path=path)
    z = x @ weights
    probs = np.exp(z - z.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    g = (probs - np.eye(3)[y]) @ weights.T
    np.testing.assert_allclose(steps[math.inf], 0.1 * np.sign(g), atol=1e-6)
    np.testing.assert_allclose(
        steps[2.0], g / np.linalg.norm(g, axis=1, keepdims=True), rtol=1e-4, atol=1e-6
    )
    expected_l1 = np.zeros_like(g)
    rows = np.arange(3)
    j = np.abs(g).argmax(1)
    expected_l1[rows, j] = 2.0 * np.sign(g[rows, j])
    np.testing.assert_allclose(steps[1.0], expected_l1, atol=1e-6)
    np.testing.assert_allclose(
        steps[2.0],
        np.asarray(input_gradients(model, x, y)) / np.linalg.norm(g, axis=1)[:, None],
        rtol=1e-4,
        atol=1e-6,
    )
    # 3 rows x (input + 2 per norm) columns at 1.6 x 1.7 inches, 100 dpi.
    assert _png_size(path) == (int(1.6 * 7 * 100), int((1.7 * 3 + 0.4) * 100))


def test_perturbations_accept_images_and_rgb(tmp_path):
    """Smoke test: (n, H, W, 1) and (n, H, W, 3) inputs draw without error."""
    for channels in (1, 3):
        model = keras.Sequential(
            [keras.Input((6, 6, channels)), keras.layers.Flatten(), keras.layers.Dense(2)]
        )
        model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        x = np.random.default_rng(1).uniform(size=(2, 6, 6, channels)).astype("float32")
        path = str(tmp_path / f"grid{channels}.png")
        steps = visualize.perturbations(model, x, np.array([0, 1]), ps=(2,), sigma=0.5, path=path)
        assert steps[2.0].shape == x.shape
        assert _png_size(path)[0] == int(1.6 * 3 * 100)


def test_perturbations_leave_the_matplotlib_backend_alone(linear_model, tmp_path):
    model, _, x, y = linear_model
    before = matplotlib.get_backend()
    visualize.perturbations(model, x, y, path=str(tmp_path / "a.png"))
    assert matplotlib.get_backend() == before


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sigma=-1.0), r"Received: sigma=-1\.0"),
        (dict(sigma={2: 1.0}), r"no radius for p=1\.0"),
        (dict(ps=(0.5,)), r"Received: ps=0\.5"),
        (dict(ps=()), r"Received: ps=\[\]"),
        (dict(clip=(1, 0)), r"Received: clip=\(1, 0\)"),
        (dict(image_shape=(4, 4, 5)), r"Received: image_shape=\(4, 4, 5\)"),
    ],
)
def test_perturbations_reject_bad_arguments(linear_model, tmp_path, kwargs, match):
    model, _, x, y = linear_model
    with pytest.raises(ValueError, match=match):
        visualize.perturbations(model, x, y, path=str(tmp_path / "x.png"), **kwargs)


def test_non_square_flat_input_needs_image_shape(tmp_path):
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(2)])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.zeros((2, 10), "float32")
    with pytest.raises(ValueError, match=r"Received: image_shape=None for 10 features"):
        visualize.perturbations(model, x, np.array([0, 1]), path=str(tmp_path / "x.png"))
    steps = visualize.perturbations(
        model, x, np.array([0, 1]), image_shape=(2, 5), path=str(tmp_path / "y.png")
    )
    assert steps[math.inf].shape == (2, 10)


def test_titles_show_true_and_predicted_labels_and_r_star_has_a_colour_bar(
    linear_model, tmp_path, monkeypatch
):
    model, _, x, y = linear_model
    figures = []
    monkeypatch.setattr(visualize, "_save", lambda figure, path: figures.append(figure))
    visualize.perturbations(model, x, y, ps=(2,), sigma=0.5, path=str(tmp_path / "a.png"))
    (figure,) = figures
    predicted = np.asarray(model(x)).argmax(axis=1)
    titles = [axis.get_title() for axis in figure.axes]
    for row in range(3):
        assert f"true {y[row]}, pred {predicted[row]}" in titles
    assert sum(title.startswith("x + r*: pred ") for title in titles) == 3
    # 3 rows x 3 panels, plus one colour bar per r* panel, spanning -max|r*| .. max|r*|.
    assert len(figure.axes) == 9 + 3
    bars = [axis for axis in figure.axes if not axis.get_title()]
    steps = visualize.perturbations(model, x, y, ps=(2,), sigma=0.5, path=str(tmp_path / "b.png"))
    for row, bar in enumerate(bars):
        low, high = bar.get_ylim()
        scale = np.abs(steps[2.0][row]).max()
        np.testing.assert_allclose((low, high), (-scale, scale), rtol=1e-5)
