"""`train_and_evaluate(config, workdir)`: the work behind `python -m train.main`.

Writes to `workdir`:

- `metrics.json`: the config ("flags"), library versions, what was trained
  on ("data": file and SHA-256 or TFDS name and version, shapes, classes),
  one record per epoch ("epochs": train/ and test/ (and validation/) metrics
  and seconds), "resumed_from_epoch", "checkpoints" (what best.keras was
  selected by, if anything), "final" test metrics and the "robustness"
  report; rewritten at the end of every epoch.
- `backup/`: the training state after the last completed epoch
  (`train.checkpoints`). Starting the same command again after the process
  died (even by SIGKILL) resumes from there; records of earlier epochs are
  kept. With `--deterministic` the resumed run ends with exactly the weights
  and metrics of an uninterrupted one. Starting a finished run again does
  nothing unless `reevaluate`.
- `checkpoints/last.keras` (every epoch) and, with a validation split,
  `checkpoints/best.keras` (highest validation accuracy). Without one there
  is no best.keras: the test set never selects a model.
- `tensorboard/`: train/ and test/ scalars per epoch and the hyperparameters.
- `robustness.json`, `robustness.png`, `perturbations.png`.

Bad input (data, workdir) raises `train.errors.InputError` before the
workdir is created.
"""

from __future__ import annotations

import inspect
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
from train import checkpoints
from train import config as config_lib
from train import data as data_lib
from train import workdir as workdir_lib
from train.config import Config
from train.recording import EpochRecorder, error_percent, float32_value, selection_record

PICTURE_EXAMPLES = 6
# Examples per attack call of the robustness report (at least the training batch).
EVAL_BATCH_SIZE = 500
METRICS_FILE = workdir_lib.METRICS_FILE


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
    """Builds (uncompiled) the network of `config`, with CIFAR-10 whitening.

    The network is `kgr.networks.NETWORKS[config.model]`, given every config
    field its builder takes (max-norms of 0 as None; settings that are None
    or empty, such as `hidden_units=()` or `activation=None`, leave the
    builder's default); the regularizer is `config.regularizer()`.
    """
    builder = kgr.networks.NETWORKS[config.model]
    arguments = {
        name: getattr(config, name)
        for name in inspect.signature(builder).parameters
        if name in config_lib.FIELDS_BY_NAME
    }
    for name in ("max_norm", "first_conv_max_norm"):
        if name in arguments and not arguments[name]:
            arguments[name] = None
    for name in config_lib.MODEL_FIELDS:
        if name in arguments and arguments[name] in (None, ()):
            del arguments[name]
    preprocessing = None
    if config.dataset == "cifar10":
        preprocessing = kgr.layers.ContrastNormalizeZCA(name="gcn_zca")
        preprocessing.adapt(arrays.x_train)
    return builder(
        arrays.input_shape,
        arrays.num_classes,
        preprocessing=preprocessing,
        regularizer=config.regularizer(),
        **arguments,
    )


def sigma_warmup(config: Config) -> list[keras.callbacks.Callback]:
    """The callback of `--sigma_warmup_epochs` (none for 0).

    `kgr.callbacks.RegularizerScheduler` with `kgr.callbacks.linear_warmup`:
    epoch e (from 0) trains with sigma * min(1, (e + 1) / N), set before its
    first step and logged as `train/sigma`. A function of the epoch, so a
    resumed run sets the epoch's value again.
    """
    if not config.sigma_warmup_epochs:
        return []
    schedule = kgr.callbacks.linear_warmup(config.sigma, config.sigma_warmup_epochs)
    return [kgr.callbacks.RegularizerScheduler(schedule)]


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


# --------------------------------------------------------------------------- #
# The run.
# --------------------------------------------------------------------------- #


def train_and_evaluate(
    config: Config,
    workdir: str,
    *,
    callbacks: list[keras.callbacks.Callback] | None = None,
    reevaluate: bool = False,
) -> dict[str, Any]:
    """Trains the model of `config`, evaluates it and writes the run's files.

    Starting again with the same `config` and `workdir` after an interruption
    resumes from the last completed epoch; a run that finished is not
    trained or evaluated again unless `reevaluate`.

    Args:
        config: The validated `Config`.
        workdir: Directory of the run's files (created if missing).
        callbacks: Extra Keras callbacks for `fit` (run before the built-in
            ones at the end of each epoch).
        reevaluate: Evaluate a finished run again (its robustness report and
            pictures, e.g. with other evaluation settings).

    Returns:
        The content of `metrics.json`.

    Raises:
        train.errors.InputError: On a bad workdir or bad data, before the
            workdir is created.
    """
    strategy = make_strategy(config.strategy)
    if not is_chief(strategy):
        task = strategy.cluster_resolver.task_id
        workdir = os.path.join(workdir, "workers", f"worker_{task}")
    workdir_lib.check_path(workdir)
    previous = workdir_lib.read_metrics(workdir)
    workdir_lib.check_same_run(previous, config, workdir)
    if workdir_lib.is_complete(previous, config) and not reevaluate:
        _report_complete(previous, config, workdir)
        return previous
    arrays = load_data(config)
    workdir_lib.check_same_data(previous, arrays.record, workdir)
    workdir_lib.create(workdir)
    with workdir_lib.locked(workdir):
        keras.utils.set_random_seed(config.seed)
        if config.deterministic:
            tf.config.experimental.enable_op_determinism()
        previous_policy = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy(config.mixed_precision)
        try:
            return _run(config, workdir, strategy, arrays, previous, callbacks or [])
        finally:
            keras.mixed_precision.set_global_policy(previous_policy)


def _report_complete(previous: dict[str, Any], config: Config, workdir: str) -> None:
    epochs = f"{config.epochs} epoch{'s' if config.epochs != 1 else ''}"
    message = (
        f"The run in --workdir={workdir} is complete ({epochs}, "
        f"test accuracy {previous['final']['test/accuracy']:.4f}): nothing to do."
    )
    changed = workdir_lib.changed_evaluation(previous, config)
    if changed:
        message += f" Its evaluation used other settings ({', '.join(changed)});"
    message += " Pass --reevaluate to evaluate it again."
    print(message, file=sys.stderr)


def load_data(config: Config) -> data_lib.Arrays:
    """The run's data, checked against `config` (InputError on a mismatch)."""
    arrays = data_lib.load(
        config.dataset,
        data_npz=config.data_npz,
        tfds_data_dir=config.tfds_data_dir,
        validation_split=config.validation_split,
    )
    if len(arrays.x_train) < config.batch_size:
        raise data_lib.InputError(
            f"--batch_size={config.batch_size} exceeds the {len(arrays.x_train)} training "
            f"examples of {arrays.source}."
        )
    record = arrays.record
    if record["classes_present"] < record["num_classes"]:
        logging.warning(
            "%s has labels of %d of the %d classes of --dataset=%s.",
            arrays.source,
            record["classes_present"],
            record["num_classes"],
            config.dataset,
        )
    logging.info(
        "Data %s: %d train, %d validation, %d test examples of shape %s.",
        arrays.source,
        record["train_examples"],
        record["validation_examples"],
        record["test_examples"],
        arrays.input_shape,
    )
    return arrays


def _compiled_model(config, arrays, strategy, steps_per_epoch) -> kgr.RegularizedModel:
    with strategy.scope():
        model = make_model(config, arrays)
        model.compile(
            optimizer=make_optimizer(config, steps_per_epoch),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
            jit_compile=config.jit_compile,
        )
    model.summary(print_fn=logging.info)
    return model


def _metrics_file(config, workdir, arrays, previous) -> workdir_lib.MetricsFile:
    return workdir_lib.MetricsFile(
        os.path.join(workdir, METRICS_FILE),
        {
            "flags": config.to_dict(),
            "versions": library_versions(),
            "command": sys.argv,
            "data": arrays.record,
            "status": "training",
            "resumed_from_epoch": 0,
            "epochs": list((previous or {}).get("epochs", [])),
            "checkpoints": None,
            "final": None,
            "robustness": None,
            "artifacts": {},
        },
    )


def _fit_callbacks(workdir, metrics, eval_sets, state, extra):
    """The recorder and the callbacks of `fit`, in order."""
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    os.makedirs(checkpoint_dir, exist_ok=True)
    monitor = "validation/accuracy" if "validation" in eval_sets else None
    best = None
    if monitor is not None:
        best = keras.callbacks.ModelCheckpoint(
            os.path.join(checkpoint_dir, "best.keras"),
            monitor=monitor,
            mode="max",
            save_best_only=True,
        )
    writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
    recorder = EpochRecorder(metrics, eval_sets, writer, best, monitor)
    callbacks = [
        *extra,
        recorder,
        *([best] if best else []),
        keras.callbacks.ModelCheckpoint(os.path.join(checkpoint_dir, "last.keras")),
        # Last, so an epoch counts as done only once everything above is written.
        checkpoints.SaveTrainingState(state),
    ]
    return recorder, monitor, callbacks


def _run(config, workdir, strategy, arrays, previous, extra_callbacks) -> dict[str, Any]:
    steps_per_epoch = config.steps_per_epoch or len(arrays.x_train) // config.batch_size
    model = _compiled_model(config, arrays, strategy, steps_per_epoch)
    state = checkpoints.TrainingState(os.path.join(workdir, "backup"))
    with strategy.scope():
        done = state.restore(model)
    if done:
        logging.info("Resumed from the backup after %d completed epochs.", done)
    eval_sets = {}
    if arrays.x_validation is not None:
        eval_sets["validation"] = data_lib.pipeline(
            arrays.x_validation, arrays.y_validation, batch_size=config.batch_size
        )
    eval_sets["test"] = data_lib.pipeline(
        arrays.x_test, arrays.y_test, batch_size=config.batch_size
    )
    metrics = _metrics_file(config, workdir, arrays, previous)
    recorder, monitor, callbacks = _fit_callbacks(
        workdir, metrics, eval_sets, state, [*sigma_warmup(config), *extra_callbacks]
    )
    recorder.start(min(done, config.epochs))
    start = time.perf_counter()
    if done < config.epochs:
        train_ds = data_lib.training_batches(
            arrays.x_train,
            arrays.y_train,
            batch_size=config.batch_size,
            seed=config.seed,
            start_step=done * steps_per_epoch,
        )
        model.fit(
            train_ds,
            epochs=config.epochs,
            initial_epoch=done,
            steps_per_epoch=steps_per_epoch,
            callbacks=callbacks,
            shuffle=False,  # training_batches orders the data.
            verbose="auto",
        )
    logging.info("Training took %.1f s in this process.", time.perf_counter() - start)
    metrics.content["checkpoints"] = selection_record(metrics.content["epochs"], monitor)
    _final_evaluation(model, config, eval_sets["test"], metrics)
    metrics.content["artifacts"] = evaluate_and_draw(model, arrays, config, workdir, metrics)
    metrics.content["status"] = "done"
    metrics.write()
    return metrics.content


def _final_evaluation(model, config, test_ds, metrics) -> None:
    metrics.content["status"] = "evaluating"
    test = model.evaluate(test_ds, verbose=0, return_dict=True)
    metrics.content["final"] = {
        "epochs": config.epochs,
        "test/accuracy": float32_value(test["accuracy"]),
        "test/error_percent": error_percent(test["accuracy"]),
        "test/loss": float32_value(test["loss"]),
    }
    metrics.write()
    logging.info("Final test accuracy %.4f.", metrics.content["final"]["test/accuracy"])


def evaluate_and_draw(
    model: keras.Model,
    arrays: data_lib.Arrays,
    config: Config,
    workdir: str,
    metrics: workdir_lib.MetricsFile,
) -> dict[str, str]:
    """The robustness report and the perturbation pictures, in pixel space.

    Attacks the first `eval_examples` test images as [0, 1] pixels, clipped to
    [0, 1] (CIFAR-10's whitening is inside the model), with `eval_suite`'s
    attacks; one line per attack goes to stdout. Stores the report's
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
    if count and config.eval_suite != "none" and epsilons:
        start = time.perf_counter()
        x = arrays.x_test[:count].astype(np.float32) / 255.0
        report = kgr.evaluate_robustness(
            model,
            (x, arrays.y_test[:count]),
            epsilons=epsilons,
            suite=config.eval_suite,
            steps=config.eval_pgd_steps,
            apgd_steps=config.eval_apgd_steps,
            fab_steps=config.eval_apgd_steps,
            square_queries=config.eval_square_queries,
            batch_size=max(config.batch_size, EVAL_BATCH_SIZE),
            seed=config.seed,
            verbose=2,
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
