"""`train_and_evaluate(config, workdir)`: the work behind `python -m train.main`.

Writes to `workdir`:

- `metrics.json`: the config ("flags"), library versions, one record per
  epoch ("epochs": train/ and test/ (and validation/) metrics and seconds),
  "resumed_from_epoch", "final" test metrics and the "robustness" report;
  rewritten at the end of every epoch.
- `backup/`: `keras.callbacks.BackupAndRestore` state. Starting the same
  command again after the process died (even by SIGKILL) resumes from the
  last completed epoch; records of earlier epochs are kept.
- `checkpoints/last.keras` (every epoch) and `checkpoints/best.keras` (best
  validation accuracy, or test accuracy without a validation split).
- `tensorboard/`: train/ and test/ scalars per epoch and the hyperparameters.
- `robustness.json`, `robustness.png`, `perturbations.png`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from absl import logging

import keras_gradreg as kgr
from train import data as data_lib
from train import models
from train.config import Config
from train.preprocessing import ContrastNormalizeZCA

METRICS_FILE = "metrics.json"
PICTURE_EXAMPLES = 6

# Fields that may change between a run and its resumption in the same workdir.
RESUMABLE_FIELDS = frozenset(
    {
        "epochs",
        "tfds_data_dir",
        "data_npz",
        "strategy",
        "jit_compile",
        "deterministic",
        "eval_attacks",
        "eval_epsilons_inf",
        "eval_epsilons_2",
        "eval_examples",
        "eval_pgd_steps",
        "pictures",
    }
)


# --------------------------------------------------------------------------- #
# Pieces.
# --------------------------------------------------------------------------- #


def make_strategy(name: str) -> tf.distribute.Strategy:
    """The `tf.distribute` strategy for `--strategy`.

    "one_device" is TensorFlow's default strategy (one device, no wrapping).
    """
    if name == "one_device":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"Unknown strategy. Received: strategy={name!r}")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run's files (always, but on workers > 0)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


@keras.saving.register_keras_serializable(package="keras_gradreg_train")
class EpochExponentialDecay(keras.optimizers.schedules.LearningRateSchedule):
    """lr * decay ** (step / steps_per_epoch), never below `minimum`.

    Args:
        initial_learning_rate: The rate at step 0.
        steps_per_epoch: Steps per epoch (> 0).
        decay: Factor per epoch, in (0, 1].
        minimum: Floor of the rate.
    """

    def __init__(
        self, initial_learning_rate: float, steps_per_epoch: int, decay: float, minimum: float
    ):
        self.initial_learning_rate = float(initial_learning_rate)
        self.steps_per_epoch = int(steps_per_epoch)
        self.decay = float(decay)
        self.minimum = float(minimum)

    def __call__(self, step):
        epochs = keras.ops.cast(step, "float32") / self.steps_per_epoch
        rate = self.initial_learning_rate * keras.ops.power(self.decay, epochs)
        return keras.ops.maximum(rate, self.minimum)

    def get_config(self) -> dict[str, Any]:
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "steps_per_epoch": self.steps_per_epoch,
            "decay": self.decay,
            "minimum": self.minimum,
        }


def make_optimizer(config: Config, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """The optimizer and learning-rate schedule of `config`."""
    rate: Any = config.learning_rate
    if config.lr_schedule == "exponential":
        rate = EpochExponentialDecay(
            config.learning_rate, steps_per_epoch, config.lr_decay, config.min_learning_rate
        )
    elif config.lr_schedule == "cosine":
        rate = keras.optimizers.schedules.CosineDecay(
            config.learning_rate,
            decay_steps=config.epochs * steps_per_epoch,
            alpha=config.min_learning_rate / config.learning_rate,
        )
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(rate, momentum=config.momentum)
    return keras.optimizers.Adam(rate)


def make_model(config: Config, arrays: data_lib.Arrays) -> kgr.RegularizedModel:
    """Builds (uncompiled) the network of `config`, with CIFAR-10 whitening."""
    preprocessing = None
    if config.dataset == "cifar10":
        preprocessing = ContrastNormalizeZCA(name="gcn_zca")
        preprocessing.adapt(arrays.x_train)
    return models.build_model(
        config.model,
        input_shape=arrays.input_shape,
        num_classes=arrays.num_classes,
        input_dropout=config.input_dropout,
        hidden_dropout=config.hidden_dropout,
        max_norm=config.max_norm or None,
        first_conv_max_norm=config.first_conv_max_norm or None,
        hidden_units=config.hidden_units or None,
        preprocessing=preprocessing,
        regularizer=kgr.GradientRegularizer(
            p=config.p,
            sigma=config.sigma,
            method=config.method,
            clean_weight=config.clean_weight,
            fd_step=config.fd_step,
        ),
    )


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries a result depends on."""
    import tensorflow_datasets as tfds

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "keras_gradreg": kgr.__version__,
        "numpy": np.__version__,
        "tensorflow_datasets": tfds.__version__,
    }


class MetricsFile:
    """`metrics.json`, held in memory and rewritten atomically."""

    def __init__(self, path: str, content: dict[str, Any]):
        self.path = path
        self.content = content

    @staticmethod
    def read(path: str) -> dict[str, Any] | None:
        """The content of an existing file, or None if there is none."""
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def write(self) -> None:
        """Writes the content (to a temporary file, then renamed)."""
        temporary = f"{self.path}.tmp"
        with open(temporary, "w") as f:
            json.dump(self.content, f, indent=2, default=_json_default)
        os.replace(temporary, self.path)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"Not JSON serializable: {type(value).__name__}")


def _float(value: Any) -> float:
    return float(np.asarray(value))


class EpochRecorder(keras.callbacks.Callback):
    """Evaluates, records and summarises every epoch.

    At the end of each epoch: evaluates the model on each evaluation set
    (adding `test/accuracy`, ... to the epoch's logs, so later callbacks and
    the progress bar see them), appends a record to `metrics.json` and writes
    TensorBoard scalars. The first epoch it sees tells from which epoch the
    run resumed; records of later epochs from an earlier process are dropped.

    Args:
        metrics: The run's `MetricsFile`.
        eval_sets: Name ("test", "validation") to batched dataset.
        writer: TensorBoard summary writer, or None.
        best_checkpoint: The best-model `ModelCheckpoint`, whose best value is
            restored from the kept records when resuming.
        monitor: The metric `best_checkpoint` monitors.
    """

    def __init__(
        self,
        metrics: MetricsFile,
        eval_sets: dict[str, tf.data.Dataset],
        writer,
        best_checkpoint: keras.callbacks.ModelCheckpoint | None,
        monitor: str,
    ):
        super().__init__()
        self.metrics = metrics
        self.eval_sets = eval_sets
        self.writer = writer
        self.best_checkpoint = best_checkpoint
        self.monitor = monitor
        self.resumed_from_epoch: int | None = None
        self._start = 0.0

    def start(self, first_epoch: int) -> None:
        """Marks the first epoch this process runs (0-based)."""
        self.resumed_from_epoch = first_epoch
        kept = [r for r in self.metrics.content.get("epochs", []) if r["epoch"] <= first_epoch]
        self.metrics.content["epochs"] = kept
        self.metrics.content["resumed_from_epoch"] = first_epoch
        if self.best_checkpoint is not None:
            values = [r[self.monitor] for r in kept if self.monitor in r]
            if values:
                self.best_checkpoint.best = max(values)
        if first_epoch == 0 and self.writer is not None:
            write_hyperparameters(self.writer, self.metrics.content["flags"])
        self.metrics.write()

    def on_epoch_begin(self, epoch, logs=None):
        if self.resumed_from_epoch is None:
            self.start(epoch)
            if epoch:
                logging.info("Resumed from the backup after %d completed epochs.", epoch)
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        train_seconds = time.perf_counter() - self._start
        record: dict[str, Any] = {"epoch": epoch + 1}
        for key, value in logs.items():
            if "/" not in key:
                record[f"train/{key}"] = _float(value)
        record["train/learning_rate"] = _float(self.model.optimizer.learning_rate)
        for name, dataset in self.eval_sets.items():
            results = self.model.evaluate(dataset, verbose=0, return_dict=True)
            for key, value in results.items():
                logs[f"{name}/{key}"] = _float(value)
                record[f"{name}/{key}"] = _float(value)
        record["train_seconds"] = train_seconds
        record["seconds"] = time.perf_counter() - self._start
        self.metrics.content.setdefault("epochs", []).append(record)
        self.metrics.write()
        if self.writer is not None:
            with self.writer.as_default(step=epoch + 1):
                for key, value in record.items():
                    if "/" in key:
                        tf.summary.scalar(key, value)
                tf.summary.scalar("train/seconds", record["seconds"])
            self.writer.flush()
        logging.info(
            "Epoch %d: %s",
            epoch + 1,
            ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"),
        )


def write_hyperparameters(writer, flags: dict[str, Any]) -> None:
    """Writes the run's settings for TensorBoard's HParams and Text tabs."""
    from tensorboard.plugins.hparams import api as hparams_api

    values = {
        key: value if isinstance(value, (bool, int, float, str)) else str(value)
        for key, value in flags.items()
    }
    rows = "\n".join(f"| {key} | {value} |" for key, value in values.items())
    with writer.as_default(step=0):
        hparams_api.hparams(values)
        tf.summary.text("hparams", f"| hyperparameter | value |\n| --- | --- |\n{rows}")
    writer.flush()


def _check_same_run(previous: dict[str, Any] | None, config: Config, workdir: str) -> None:
    if not previous or "flags" not in previous:
        return
    current = config.to_dict()
    changed = sorted(
        key
        for key in set(current) | set(previous["flags"])
        if key not in RESUMABLE_FIELDS and previous["flags"].get(key) != current.get(key)
    )
    if changed:
        details = ", ".join(
            f"{k}: {previous['flags'].get(k)!r} -> {current.get(k)!r}" for k in changed
        )
        raise ValueError(
            f"--workdir={workdir} holds a run with other settings ({details}). "
            "Use a new --workdir, or the same settings to resume."
        )


# --------------------------------------------------------------------------- #
# The run.
# --------------------------------------------------------------------------- #


def train_and_evaluate(
    config: Config,
    workdir: str,
    *,
    callbacks: list[keras.callbacks.Callback] | None = None,
) -> dict[str, Any]:
    """Trains the model of `config`, evaluates it and writes the run's files.

    Starting again with the same `config` and `workdir` after an interruption
    resumes from the last completed epoch.

    Args:
        config: The validated `Config`.
        workdir: Directory of the run's files (created if missing).
        callbacks: Extra Keras callbacks for `fit` (run before the built-in
            ones at the end of each epoch).

    Returns:
        The content of `metrics.json`.
    """
    strategy = make_strategy(config.strategy)
    chief = is_chief(strategy)
    if not chief:
        task = strategy.cluster_resolver.task_id
        workdir = os.path.join(workdir, "workers", f"worker_{task}")
    os.makedirs(workdir, exist_ok=True)
    metrics_path = os.path.join(workdir, METRICS_FILE)
    previous = MetricsFile.read(metrics_path)
    _check_same_run(previous, config, workdir)

    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(config.mixed_precision)
    try:
        return _run(config, workdir, strategy, previous, callbacks or [])
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


def _run(config, workdir, strategy, previous, extra_callbacks) -> dict[str, Any]:
    arrays = data_lib.load(
        config.dataset,
        data_npz=config.data_npz,
        tfds_data_dir=config.tfds_data_dir,
        validation_split=config.validation_split,
    )
    logging.info(
        "Data %s: %d train, %d validation, %d test examples of shape %s.",
        arrays.source,
        len(arrays.x_train),
        0 if arrays.x_validation is None else len(arrays.x_validation),
        len(arrays.x_test),
        arrays.input_shape,
    )
    steps_per_epoch = config.steps_per_epoch or len(arrays.x_train) // config.batch_size
    train_ds = data_lib.pipeline(
        arrays.x_train,
        arrays.y_train,
        batch_size=config.batch_size,
        training=True,
        seed=config.seed,
        repeat=config.steps_per_epoch > 0,
    )
    eval_sets = {}
    if arrays.x_validation is not None:
        eval_sets["validation"] = data_lib.pipeline(
            arrays.x_validation, arrays.y_validation, batch_size=config.batch_size, training=False
        )
    test_ds = data_lib.pipeline(
        arrays.x_test, arrays.y_test, batch_size=config.batch_size, training=False
    )
    eval_sets["test"] = test_ds

    with strategy.scope():
        model = make_model(config, arrays)
        model.compile(
            optimizer=make_optimizer(config, steps_per_epoch),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
            jit_compile=config.jit_compile,
        )
    model.summary(print_fn=logging.info)

    metrics = MetricsFile(
        os.path.join(workdir, METRICS_FILE),
        {
            "flags": config.to_dict(),
            "versions": library_versions(),
            "command": sys.argv,
            "status": "training",
            "resumed_from_epoch": 0,
            "epochs": list((previous or {}).get("epochs", [])),
            "final": None,
            "robustness": None,
            "artifacts": {},
        },
    )
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    os.makedirs(checkpoint_dir, exist_ok=True)
    monitor = "validation/accuracy" if "validation" in eval_sets else "test/accuracy"
    best_checkpoint = keras.callbacks.ModelCheckpoint(
        os.path.join(checkpoint_dir, "best.keras"), monitor=monitor, mode="max", save_best_only=True
    )
    writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
    recorder = EpochRecorder(metrics, eval_sets, writer, best_checkpoint, monitor)
    fit_callbacks = [
        *extra_callbacks,
        recorder,
        best_checkpoint,
        keras.callbacks.ModelCheckpoint(os.path.join(checkpoint_dir, "last.keras")),
        # Last, so an epoch counts as done only once everything above is written.
        keras.callbacks.BackupAndRestore(
            os.path.join(workdir, "backup"), double_checkpoint=True, delete_checkpoint=False
        ),
    ]
    start = time.perf_counter()
    model.fit(
        train_ds,
        epochs=config.epochs,
        steps_per_epoch=steps_per_epoch,
        callbacks=fit_callbacks,
        shuffle=False,  # The pipeline shuffles.
        verbose="auto",
    )
    if recorder.resumed_from_epoch is None:
        # fit ran no epoch: the backup says all of them were done already.
        recorder.start(config.epochs)
    logging.info("Training took %.1f s in this process.", time.perf_counter() - start)

    metrics.content["status"] = "evaluating"
    test = model.evaluate(test_ds, verbose=0, return_dict=True)
    metrics.content["final"] = {
        "epochs": config.epochs,
        "test/accuracy": _float(test["accuracy"]),
        "test/error_percent": 100.0 * (1.0 - _float(test["accuracy"])),
        "test/loss": _float(test["loss"]),
    }
    metrics.write()
    logging.info("Final test accuracy %.4f.", metrics.content["final"]["test/accuracy"])

    metrics.content["artifacts"] = evaluate_and_draw(model, arrays, config, workdir, metrics)
    metrics.content["status"] = "done"
    metrics.write()
    return metrics.content


def evaluate_and_draw(
    model: keras.Model,
    arrays: data_lib.Arrays,
    config: Config,
    workdir: str,
    metrics: MetricsFile,
) -> dict[str, str]:
    """The robustness report and the perturbation pictures, in pixel space.

    Attacks the first `eval_examples` test images as [0, 1] pixels, clipped to
    [0, 1] (CIFAR-10's whitening is inside the model). Stores the report's
    `to_dict()` under "robustness" in `metrics`.

    Returns:
        File names (in `workdir`) of what was written.
    """
    artifacts = {}
    epsilons = {
        p: list(values)
        for p, values in ((math.inf, config.eval_epsilons_inf), (2, config.eval_epsilons_2))
        if values
    }
    count = min(config.eval_examples, len(arrays.x_test))
    if count and config.eval_attacks and epsilons:
        start = time.perf_counter()
        x = arrays.x_test[:count].astype(np.float32) / 255.0
        report = kgr.evaluate_robustness(
            model,
            (x, arrays.y_test[:count]),
            epsilons=epsilons,
            attacks=config.eval_attacks,
            steps=config.eval_pgd_steps,
            batch_size=config.batch_size,
            seed=config.seed,
        )
        logging.info(
            "Robustness on %d test examples (%.1f s):\n%s",
            count,
            time.perf_counter() - start,
            report,
        )
        if report.flags:
            logging.warning("The robustness report flags: %s", report.flags)
        metrics.content["robustness"] = report.to_dict()
        report.save_json(os.path.join(workdir, "robustness.json"))
        report.plot(os.path.join(workdir, "robustness.png"))
        artifacts.update(robustness_json="robustness.json", robustness_plot="robustness.png")
    if config.pictures:
        count = min(PICTURE_EXAMPLES, len(arrays.x_test))
        kgr.visualize.perturbations(
            model,
            arrays.x_test[:count].astype(np.float32) / 255.0,
            arrays.y_test[:count],
            path=os.path.join(workdir, "perturbations.png"),
        )
        artifacts["perturbations"] = "perturbations.png"
    return artifacts
