"""Tests of train.data: npz and TFDS loading, splits, the tf.data pipeline."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from train import data as data_lib

MNIST_NPZ = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "shared",
    "data",
    "mnist.npz",
)


def _write_npz(path, n_train=50, n_test=20, shape=(28, 28), **replace):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, size=(n_train, *shape)).astype("uint8"),
        "y_train": rng.integers(0, 10, size=n_train).astype("uint8"),
        "x_test": rng.integers(0, 256, size=(n_test, *shape)).astype("uint8"),
        "y_test": rng.integers(0, 10, size=n_test).astype("uint8"),
    }
    arrays.update(replace)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return arrays


def test_npz_with_validation_split(tmp_path):
    path = str(tmp_path / "d.npz")
    raw = _write_npz(path)
    arrays = data_lib.load("mnist", data_npz=path, validation_split=0.2)
    assert arrays.input_shape == (28, 28, 1)
    assert (len(arrays.x_train), len(arrays.x_validation), len(arrays.x_test)) == (40, 10, 20)
    # The validation split is the last examples of the training set.
    np.testing.assert_array_equal(arrays.x_validation[..., 0], raw["x_train"][40:])
    np.testing.assert_array_equal(arrays.y_train, raw["y_train"][:40])
    assert arrays.y_train.dtype == np.int64 and arrays.num_classes == 10
    # What was trained on is recorded: the file, its checksum, shapes and classes.
    record = arrays.record
    assert record["source"] == "npz" and record["path"] == path
    assert record["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert (record["train_examples"], record["validation_examples"]) == (40, 10)
    assert record["image_shape"] == [28, 28, 1] and record["num_classes"] == 10
    assert record["classes_present"] == len(set(raw["y_train"]) | set(raw["y_test"]))


@pytest.mark.parametrize(
    "replace, match",
    [
        ({"y_test": None}, r"missing \['y_test'\]"),
        ({"x_train": np.zeros((50, 28, 28), "float32")}, "x_train.dtype=float32"),
        ({"y_train": np.full(50, 12)}, r"must be in \[0, 10\)"),
        ({"y_train": np.zeros(49, "int64")}, "must hold 50 integer labels"),
        (
            {
                "x_train": np.zeros((50, 32, 32, 3), "uint8"),
                "x_test": np.zeros((20, 32, 32, 3), "uint8"),
            },
            r"shape \(32, 32, 3\), but --dataset=mnist",
        ),
    ],
)
def test_bad_npz(tmp_path, replace, match):
    path = str(tmp_path / "d.npz")
    _write_npz(path, **replace)
    with pytest.raises(ValueError, match=match):
        data_lib.load("mnist", data_npz=path)


def test_validation_split_too_large(tmp_path):
    path = str(tmp_path / "d.npz")
    _write_npz(path, n_train=3)
    with pytest.raises(ValueError, match="validation_split=0.9"):
        data_lib.load("mnist", data_npz=path, validation_split=0.9)


def test_evaluation_pipeline_scales_and_keeps_every_example():
    x = np.arange(10 * 2 * 2, dtype="uint8").reshape(10, 2, 2, 1)
    y = np.arange(10)
    test = list(data_lib.pipeline(x, y, batch_size=4).as_numpy_iterator())
    assert [len(b[1]) for b in test] == [4, 4, 2]
    np.testing.assert_allclose(np.concatenate([b[0] for b in test]), x / 255.0, rtol=1e-6)
    assert test[0][0].dtype == np.float32


def _labels(dataset, count):
    return [b[1].tolist() for b in dataset.take(count).as_numpy_iterator()]


def test_training_batches_are_a_function_of_seed_and_step():
    x = np.arange(10, dtype="uint8").reshape(10, 1, 1, 1)
    y = np.arange(10)
    stream = data_lib.training_batches(x, y, batch_size=4, seed=1)
    batches = _labels(stream, 6)  # 2 full batches per pass over 10 examples: 3 passes.
    images = next(stream.as_numpy_iterator())[0]
    np.testing.assert_allclose(images[:, 0, 0, 0] * 255.0, batches[0])  # Images match labels.
    for k in range(3):
        first, second = batches[2 * k], batches[2 * k + 1]
        assert len(set(first + second)) == 8  # Without replacement within a pass.
    assert batches[0:2] != batches[2:4]  # Each pass has its own order.
    # The pass order is a stateless permutation of (seed, pass).
    expected = tf.random.experimental.stateless_shuffle(tf.range(10, dtype=tf.int64), seed=[1, 1])
    assert batches[2] + batches[3] == expected.numpy()[:8].tolist()
    # Resuming at any step gives the same batches as going on.
    for step in (1, 2, 3, 5):
        resumed = data_lib.training_batches(x, y, batch_size=4, seed=1, start_step=step)
        assert _labels(resumed, 6 - step) == batches[step:]
    other = _labels(data_lib.training_batches(x, y, batch_size=4, seed=2), 6)
    assert other != batches
    with pytest.raises(ValueError, match="--batch_size=11 exceeds the 10 training examples"):
        data_lib.training_batches(x, y, batch_size=11)


def test_tfds_mock_data():
    with tfds.testing.mock_data(num_examples=12):
        arrays = data_lib.load("cifar10")
    assert arrays.x_train.shape == (12, 32, 32, 3) and arrays.x_test.shape == (12, 32, 32, 3)
    assert arrays.x_train.dtype == np.uint8 and arrays.source == "tfds:cifar10"


def test_tfds_download_failure_says_how_to_give_data_offline(monkeypatch, tmp_path):
    def no_network(self, *args, **kwargs):
        raise ConnectionError("name resolution failed")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_network)
    with pytest.raises(data_lib.DataUnavailableError) as error:
        data_lib.load("mnist", tfds_data_dir=str(tmp_path))
    message = str(error.value)
    assert "--data_npz" in message and "--tfds_data_dir" in message
    assert "name resolution failed" in message and str(tmp_path) in message


@pytest.mark.skipif(not os.path.exists(MNIST_NPZ), reason="no shared/data/mnist.npz")
def test_real_mnist_npz():
    arrays = data_lib.load("mnist", data_npz=MNIST_NPZ, validation_split=1 / 6)
    assert arrays.x_train.shape == (50000, 28, 28, 1)
    assert arrays.x_validation.shape == (10000, 28, 28, 1)
    assert arrays.x_test.shape == (10000, 28, 28, 1)
    assert sorted(set(arrays.y_test.tolist())) == list(range(10))
