"""Data: MNIST, Fashion-MNIST and CIFAR-10 from tensorflow-datasets or a .npz.

Both sources give uint8 images (N, H, W, C) and integer labels, which go
through the same `tf.data` pipeline: cache (uint8), shuffle, batch to the
global batch, scale to [0, 1] float32, prefetch. Models see pixels in [0, 1];
CIFAR-10's global contrast normalisation and ZCA whitening are a layer inside
the model (`train.preprocessing`), so input gradients, the regulariser's
sigma and the attacks' epsilons are all in [0, 1] pixel units.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10}
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


class DataUnavailableError(RuntimeError):
    """The data set is neither prepared locally nor downloadable."""


@dataclasses.dataclass(frozen=True)
class Arrays:
    """A data set in memory: uint8 images (N, H, W, C) and int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_validation: np.ndarray | None = None
    y_validation: np.ndarray | None = None
    num_classes: int = 10
    source: str = ""

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example."""
        return tuple(self.x_train.shape[1:])


def _as_images(x: np.ndarray, name: str, source: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., np.newaxis]
    if x.ndim != 4:
        raise ValueError(
            f"{source}: `{name}` must be images of shape (N, H, W) or (N, H, W, C). "
            f"Received: {name}.shape={x.shape}"
        )
    if x.dtype != np.uint8:
        raise ValueError(
            f"{source}: `{name}` must be uint8 pixels in [0, 255]. Received: {name}.dtype={x.dtype}"
        )
    return x


def _as_labels(y: np.ndarray, name: str, source: str, count: int, num_classes: int) -> np.ndarray:
    y = np.asarray(y).reshape(-1)
    if y.shape[0] != count or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(
            f"{source}: `{name}` must hold {count} integer labels. "
            f"Received: {name}.shape={y.shape}, dtype={y.dtype}"
        )
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"{source}: `{name}` must be in [0, {num_classes}). "
            f"Received: labels from {y.min()} to {y.max()}"
        )
    return y.astype(np.int64)


def load_npz(path: str, num_classes: int) -> tuple[np.ndarray, ...]:
    """Reads x_train, y_train, x_test, y_test from an .npz file (validated).

    Raises:
        ValueError: If a key is missing or an array has the wrong shape or type.
    """
    source = f"--data_npz={path}"
    with np.load(path) as data:
        missing = [key for key in NPZ_KEYS if key not in data.files]
        if missing:
            raise ValueError(
                f"{source} must contain {NPZ_KEYS}; missing {missing}. Received keys: {data.files}"
            )
        x_train = _as_images(data["x_train"], "x_train", source)
        x_test = _as_images(data["x_test"], "x_test", source)
        y_train = _as_labels(data["y_train"], "y_train", source, len(x_train), num_classes)
        y_test = _as_labels(data["y_test"], "y_test", source, len(x_test), num_classes)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(
            f"{source}: train and test images differ in shape. "
            f"Received: {x_train.shape[1:]} and {x_test.shape[1:]}"
        )
    return x_train, y_train, x_test, y_test


def _tfds_split_arrays(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
    import tensorflow_datasets as tfds

    dataset = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    images, labels = [], []
    for x, y in tfds.as_numpy(dataset.batch(4096)):
        images.append(x)
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)


def load_tfds(name: str, data_dir: str | None) -> tuple[np.ndarray, ...]:
    """Reads the train and test splits of a TFDS data set into memory.

    Raises:
        DataUnavailableError: If the data set is not prepared in `data_dir` and
            cannot be downloaded; the message says how to give it offline.
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    try:
        builder.download_and_prepare()
    except Exception as error:  # Network and download errors come in many types.
        raise DataUnavailableError(
            f"tensorflow-datasets could not prepare {name!r} in "
            f"{data_dir or 'its default data directory'} (no copy there and the "
            f"download failed: {type(error).__name__}: {error}). Give the data "
            "offline: --data_npz=FILE.npz (with x_train, y_train, x_test, y_test) or "
            "--tfds_data_dir=DIR holding a prepared copy of the data set."
        ) from error
    source = f"tensorflow-datasets {name!r}"
    num_classes = builder.info.features["label"].num_classes
    x_train, y_train = _tfds_split_arrays(builder, "train")
    x_test, y_test = _tfds_split_arrays(builder, "test")
    x_train = _as_images(x_train, "train images", source)
    x_test = _as_images(x_test, "test images", source)
    y_train = _as_labels(y_train, "train labels", source, len(x_train), num_classes)
    y_test = _as_labels(y_test, "test labels", source, len(x_test), num_classes)
    return x_train, y_train, x_test, y_test


def load(
    dataset: str,
    *,
    data_npz: str | None = None,
    tfds_data_dir: str | None = None,
    validation_split: float = 0.0,
) -> Arrays:
    """Loads a data set and holds out the last `validation_split` of training.

    Args:
        dataset: A key of `NUM_CLASSES`.
        data_npz: Optional .npz file used instead of tensorflow-datasets.
        tfds_data_dir: Optional tensorflow-datasets data directory.
        validation_split: Fraction in [0, 1) of the training examples, taken
            from its end, returned as the validation split.

    Returns:
        The `Arrays`.
    """
    if dataset not in NUM_CLASSES:
        raise ValueError(f"`dataset` must be one of {tuple(NUM_CLASSES)}. Received: {dataset!r}")
    num_classes = NUM_CLASSES[dataset]
    if data_npz:
        x_train, y_train, x_test, y_test = load_npz(data_npz, num_classes)
        source = f"npz:{data_npz}"
    else:
        x_train, y_train, x_test, y_test = load_tfds(dataset, tfds_data_dir)
        source = f"tfds:{dataset}"
    x_validation = y_validation = None
    if validation_split > 0:
        held_out = int(round(len(x_train) * validation_split))
        if not 0 < held_out < len(x_train):
            raise ValueError(
                f"`validation_split` leaves no training or no validation examples of "
                f"{len(x_train)}. Received: validation_split={validation_split!r}"
            )
        x_train, x_validation = x_train[:-held_out], x_train[-held_out:]
        y_train, y_validation = y_train[:-held_out], y_train[-held_out:]
    return Arrays(
        x_train,
        y_train,
        x_test,
        y_test,
        x_validation,
        y_validation,
        num_classes=num_classes,
        source=source,
    )


def _to_unit_range(x, y):
    return tf.cast(x, tf.float32) / 255.0, y


def pipeline(
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int,
    training: bool,
    seed: int = 0,
    repeat: bool = False,
) -> tf.data.Dataset:
    """A batched `tf.data.Dataset` of ([0, 1] float32 images, int64 labels).

    Args:
        x: uint8 images.
        y: Integer labels.
        batch_size: The global batch size.
        training: Shuffle every epoch (seeded) and drop the last partial batch
            (static shapes for XLA); otherwise keep order and every example.
        seed: Shuffle seed.
        repeat: Repeat forever (for a fixed number of steps per epoch).

    Raises:
        ValueError: If training and there is not one full batch.
    """
    if training and len(x) < batch_size:
        raise ValueError(
            f"`batch_size` must not exceed the {len(x)} training examples. "
            f"Received: batch_size={batch_size}"
        )
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).cache()
    if training:
        dataset = dataset.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    dataset = dataset.batch(batch_size, drop_remainder=training)
    dataset = dataset.map(_to_unit_range, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)
