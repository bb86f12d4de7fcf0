"""Data: MNIST, Fashion-MNIST and CIFAR-10 from tensorflow-datasets or a .npz.

Both sources give uint8 images (N, H, W, C) and integer labels, which go
through the same `tf.data` pipeline: cache (uint8), shuffle, batch to the
global batch, scale to [0, 1] float32, prefetch. Models see pixels in [0, 1];
CIFAR-10's global contrast normalisation and ZCA whitening are a layer inside
the model (`kgr.layers.ContrastNormalizeZCA`), so input gradients, the
regulariser's sigma and the attacks' epsilons are all in [0, 1] pixel units.

Training batches are a function of (seed, step) alone: the order of each pass
over the data is a stateless permutation of (seed, pass), so a run resumed at
any step sees exactly the batches an uninterrupted run sees there.

Bad data raises `train.errors.InputError` naming the flag and the value.
"""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile
import zlib
from typing import Any

import numpy as np
import tensorflow as tf

from train.errors import InputError

NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10}
# Shape of one image of each named data set.
IMAGE_SHAPES = {"mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3)}
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


class DataUnavailableError(InputError):
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
    record: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example."""
        return tuple(self.x_train.shape[1:])


def _as_images(x: np.ndarray, name: str, source: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., np.newaxis]
    if x.ndim != 4:
        raise InputError(
            f"{source}: `{name}` must be images of shape (N, H, W) or (N, H, W, C). "
            f"Received: {name}.shape={x.shape}"
        )
    if not len(x):
        raise InputError(f"{source}: `{name}` holds no images. Received: {name}.shape={x.shape}")
    if x.dtype != np.uint8:
        raise InputError(
            f"{source}: `{name}` must be uint8 pixels in [0, 255]. Received: {name}.dtype={x.dtype}"
        )
    return x


def _as_labels(y: np.ndarray, name: str, source: str, count: int, num_classes: int) -> np.ndarray:
    y = np.asarray(y).reshape(-1)
    if y.shape[0] != count or not np.issubdtype(y.dtype, np.integer):
        raise InputError(
            f"{source}: `{name}` must hold {count} integer labels. "
            f"Received: {name}.shape={y.shape}, dtype={y.dtype}"
        )
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise InputError(
            f"{source}: `{name}` must be in [0, {num_classes}) ({num_classes} classes of "
            f"the --dataset). Received: labels from {y.min()} to {y.max()}"
        )
    return y.astype(np.int64)


_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError)


def _read_npz(path: str, source: str) -> dict[str, np.ndarray]:
    """The four arrays of an .npz file; InputError if it is not a readable one."""
    try:
        data = np.load(path, allow_pickle=False)
    except _READ_ERRORS as error:
        # numpy reports a file that is neither .npy nor .npz as pickled data.
        reason = "not a NumPy file" if "pickle" in str(error) else str(error)
        raise InputError(f"{source}: cannot read the file as an .npz archive ({reason}).") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise InputError(
            f"{source}: a single .npy array, not an .npz archive; save the arrays "
            "with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)."
        )
    with data:
        missing = [key for key in NPZ_KEYS if key not in data.files]
        if missing:
            raise InputError(
                f"{source} must contain {NPZ_KEYS}; missing {missing}. Received keys: {data.files}"
            )
        arrays = {}
        for key in NPZ_KEYS:
            try:
                arrays[key] = data[key]
            except _READ_ERRORS as error:
                reason = "it holds Python objects" if "pickle" in str(error) else str(error)
                raise InputError(f"{source}: cannot read the array `{key}` ({reason}).") from None
    return arrays


def load_npz(path: str, num_classes: int) -> tuple[np.ndarray, ...]:
    """Reads x_train, y_train, x_test, y_test from an .npz file (validated).

    Raises:
        InputError: If the file is not a readable .npz, a key is missing or
            an array has the wrong shape, type or labels.
    """
    source = f"--data_npz={path}"
    data = _read_npz(path, source)
    x_train = _as_images(data["x_train"], "x_train", source)
    x_test = _as_images(data["x_test"], "x_test", source)
    y_train = _as_labels(data["y_train"], "y_train", source, len(x_train), num_classes)
    y_test = _as_labels(data["y_test"], "y_test", source, len(x_test), num_classes)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise InputError(
            f"{source}: train and test images differ in shape. "
            f"Received: {x_train.shape[1:]} and {x_test.shape[1:]}"
        )
    return x_train, y_train, x_test, y_test


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    source = f"--dataset={name} (tensorflow-datasets)"
    num_classes = builder.info.features["label"].num_classes
    x_train, y_train = _tfds_split_arrays(builder, "train")
    x_test, y_test = _tfds_split_arrays(builder, "test")
    x_train = _as_images(x_train, "train images", source)
    x_test = _as_images(x_test, "test images", source)
    y_train = _as_labels(y_train, "train labels", source, len(x_train), num_classes)
    y_test = _as_labels(y_test, "test labels", source, len(x_test), num_classes)
    return x_train, y_train, x_test, y_test, str(builder.info.version), builder.data_dir


def load(
    dataset: str,
    *,
    data_npz: str | None = None,
    tfds_data_dir: str | None = None,
    validation_split: float = 0.0,
) -> Arrays:
    """Loads a data set and holds out the last `validation_split` of training.

    Args:
        dataset: A key of `NUM_CLASSES`: the classes and image shape the data
            must have (an .npz of another shape is refused).
        data_npz: Optional .npz file used instead of tensorflow-datasets.
        tfds_data_dir: Optional tensorflow-datasets data directory.
        validation_split: Fraction in [0, 1) of the training examples, taken
            from its end, returned as the validation split.

    Returns:
        The `Arrays`, with `record` describing what was loaded (file and
        checksum or TFDS name and version, shapes, classes).

    Raises:
        InputError: On unreadable or inconsistent data.
    """
    if dataset not in NUM_CLASSES:
        raise InputError(f"`dataset` must be one of {tuple(NUM_CLASSES)}. Received: {dataset!r}")
    num_classes = NUM_CLASSES[dataset]
    if data_npz:
        x_train, y_train, x_test, y_test = load_npz(data_npz, num_classes)
        source = f"npz:{data_npz}"
        record = {"source": "npz", "path": data_npz, "sha256": file_sha256(data_npz)}
        _check_shape(dataset, x_train.shape[1:], f"--data_npz={data_npz}")
    else:
        x_train, y_train, x_test, y_test, version, directory = load_tfds(dataset, tfds_data_dir)
        source = f"tfds:{dataset}"
        record = {"source": "tfds", "name": dataset, "version": version, "data_dir": directory}
    x_train, y_train, x_validation, y_validation = _split(x_train, y_train, validation_split)
    record.update(
        dataset=dataset,
        image_shape=list(x_train.shape[1:]),
        num_classes=num_classes,
        classes_present=int(len(np.union1d(y_train, y_test))),
        train_examples=len(x_train),
        validation_examples=0 if x_validation is None else len(x_validation),
        test_examples=len(x_test),
    )
    return Arrays(
        x_train,
        y_train,
        x_test,
        y_test,
        x_validation,
        y_validation,
        num_classes=num_classes,
        source=source,
        record=record,
    )


def _split(x: np.ndarray, y: np.ndarray, validation_split: float) -> tuple:
    """(x_train, y_train, x_validation, y_validation): the last examples held out."""
    if validation_split <= 0:
        return x, y, None, None
    held_out = int(round(len(x) * validation_split))
    if not 0 < held_out < len(x):
        raise InputError(
            f"--validation_split={validation_split!r} leaves no training or no validation "
            f"examples of {len(x)}."
        )
    return x[:-held_out], y[:-held_out], x[-held_out:], y[-held_out:]


def _check_shape(dataset: str, shape: tuple[int, ...], source: str) -> None:
    expected = IMAGE_SHAPES[dataset]
    if tuple(shape) != expected:
        others = [name for name, s in IMAGE_SHAPES.items() if s == tuple(shape)]
        hint = f"pass --dataset={others[0]}" if others else "pass a --dataset of that shape"
        raise InputError(
            f"{source} holds images of shape {tuple(shape)}, but --dataset={dataset} "
            f"(set by the flag or the preset) has images of shape {expected}: {hint}. "
            f"Received: dataset={dataset!r}"
        )


def _to_unit_range(x, y):
    return tf.cast(x, tf.float32) / 255.0, y


def pipeline(x: np.ndarray, y: np.ndarray, *, batch_size: int) -> tf.data.Dataset:
    """Evaluation batches: ([0, 1] float32 images, int64 labels), in order, all kept."""
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).cache()
    dataset = dataset.batch(batch_size)
    dataset = dataset.map(_to_unit_range, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


def training_batches(
    x: np.ndarray, y: np.ndarray, *, batch_size: int, seed: int = 0, start_step: int = 0
) -> tf.data.Dataset:
    """The endless stream of training batches from step `start_step` on.

    Pass k over the data visits the examples in the order of a stateless
    random permutation of (seed, k), cut into full batches (the last partial
    batch of each pass is dropped: static shapes for XLA). Batch s of the
    stream is therefore the same in every process, so a resumed run gets the
    batches an uninterrupted run gets.

    Args:
        x: uint8 images.
        y: Integer labels.
        batch_size: The global batch size.
        seed: Seed of the permutations.
        start_step: Index of the first batch.

    Raises:
        InputError: If there is not one full batch.
    """
    if len(x) < batch_size:
        raise InputError(f"--batch_size={batch_size} exceeds the {len(x)} training examples.")
    per_pass = len(x) // batch_size
    first_pass, offset = divmod(int(start_step), per_pass)
    images, labels = tf.constant(x), tf.constant(y)

    def one_pass(index):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(len(x), dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), index])
        )
        return tf.data.Dataset.from_tensor_slices(order[: per_pass * batch_size]).batch(batch_size)

    def gather(indices):
        return tf.cast(tf.gather(images, indices), tf.float32) / 255.0, tf.gather(labels, indices)

    dataset = tf.data.Dataset.range(first_pass, np.iinfo(np.int64).max).flat_map(one_pass)
    dataset = dataset.skip(offset).map(gather, num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    options.deterministic = True
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)
