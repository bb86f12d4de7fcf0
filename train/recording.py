"""Per-epoch records: evaluation, metrics.json, TensorBoard, model selection."""

from __future__ import annotations

import time
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from train.workdir import MetricsFile


def float32_value(value: Any) -> float:
    """A float32 metric as the shortest decimal that is that float32 (0.9644, not 0.96439999)."""
    return float(str(np.float32(np.asarray(value))))


def error_percent(accuracy: float) -> float:
    """100 * (1 - accuracy), to the 5 decimals a float32 accuracy resolves (3.56)."""
    return round(100.0 * (1.0 - float32_value(accuracy)), 5)


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


def selection_record(records: list[dict[str, Any]], monitor: str | None) -> dict[str, Any]:
    """What `checkpoints/` offers and what chose it, for metrics.json.

    Args:
        records: The per-epoch records.
        monitor: The metric best.keras is chosen on ("validation/accuracy"),
            or None when there is no validation split (no best.keras: a
            model chosen on the test set must not be offered as the best).
    """
    if monitor is None:
        return {
            "last": "checkpoints/last.keras",
            "best": None,
            "selected_by": None,
            "note": "No validation split (--validation_split=0): no model is selected; "
            "last.keras is the model after the last epoch.",
        }
    scored = [r for r in records if monitor in r]
    best = max(scored, key=lambda r: (r[monitor], -r["epoch"])) if scored else None
    return {
        "last": "checkpoints/last.keras",
        "best": "checkpoints/best.keras",
        "selected_by": f"highest {monitor}",
        "best_epoch": best and best["epoch"],
        f"best_{monitor}": best and best[monitor],
    }


class EpochRecorder(keras.callbacks.Callback):
    """Evaluates, records and summarises every epoch.

    At the end of each epoch: evaluates the model on each evaluation set
    (adding `test/accuracy`, ... to the epoch's logs, so later callbacks and
    the progress bar see them), appends a record to `metrics.json` and writes
    TensorBoard scalars. Metrics are stored as float32 values.

    Args:
        metrics: The run's `MetricsFile`.
        eval_sets: Name ("validation", "test") to batched dataset.
        writer: TensorBoard summary writer, or None.
        best_checkpoint: The best-model `ModelCheckpoint` (None without a
            validation split), whose best value is restored when resuming.
        monitor: The metric `best_checkpoint` monitors.
    """

    def __init__(
        self,
        metrics: MetricsFile,
        eval_sets: dict[str, tf.data.Dataset],
        writer,
        best_checkpoint: keras.callbacks.ModelCheckpoint | None,
        monitor: str | None,
    ):
        super().__init__()
        self.metrics = metrics
        self.eval_sets = eval_sets
        self.writer = writer
        self.best_checkpoint = best_checkpoint
        self.monitor = monitor
        self._start = 0.0

    def start(self, first_epoch: int) -> None:
        """Keeps the records of the `first_epoch` epochs already done; drops later ones."""
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
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        train_seconds = time.perf_counter() - self._start
        record: dict[str, Any] = {"epoch": epoch + 1}
        for key, value in logs.items():
            if "/" not in key:
                record[f"train/{key}"] = float32_value(value)
        record["train/learning_rate"] = float32_value(self.model.optimizer.learning_rate)
        for name, dataset in self.eval_sets.items():
            results = self.model.evaluate(dataset, verbose=0, return_dict=True)
            for key, value in results.items():
                logs[f"{name}/{key}"] = record[f"{name}/{key}"] = float32_value(value)
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
