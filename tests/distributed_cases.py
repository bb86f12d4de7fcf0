"""Runs RegularizedModel on 1 and on 2 logical CPU devices; prints JSON.

Logical devices must be configured before TensorFlow runs anything, so the
tests run this file in a subprocess:

    python tests/distributed_cases.py mirrored OUT.json
    python tests/distributed_cases.py lazy OUT.json      # every, fraction, schedules
    TF_CONFIG=... python tests/distributed_cases.py worker OUT.npz SETTINGS_JSON
    python tests/distributed_cases.py single OUT.npz SETTINGS_JSON

SETTINGS_JSON is a list of `kgr.GradientRegularizer` argument dicts, trained
one after the other in the same process (tests/test_multi_worker_methods.py);
OUT.npz gets, for setting i, its final weights (`i/w0`, `i/w1`, ...) and its
`evaluate` loss (`i/evaluation_loss`).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

if sys.argv[1] in ("mirrored", "lazy"):
    _cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_gradreg as kgr  # noqa: E402

METHODS = ("penalty", "adversarial", "finite_difference")
# The multi-step members, compared in the "mirrored" case: their random
# starts are keyed by each example's position in the global batch.
MEMBERS = {
    "pgd": dict(method="adversarial", steps=3, random_start=True, clip=(-2.0, 2.0)),
    "trades": dict(method="trades", steps=2, beta=2.0),
}
GLOBAL_BATCH = 16
STEPS = 3


def problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(GLOBAL_BATCH * STEPS, 6)).astype("float32")
    y = rng.integers(0, 3, size=len(x))
    return x, y


def regularizer(method: str) -> kgr.GradientRegularizer:
    if method in MEMBERS:
        return kgr.GradientRegularizer(p=2, sigma=0.5, **MEMBERS[method])
    return kgr.GradientRegularizer(p=2, sigma=0.5, method=method, clean_weight=0.3)


def fix_start_seed(reg: kgr.GradientRegularizer) -> None:
    """The same first random-start seed in every run compared."""
    if reg.draws_starts:
        reg.start_seed_generator().state.assign(
            np.array([7, 0], "int64").astype(reg.start_seed_generator().state.dtype)
        )


def plain_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, activation="tanh")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3)(hidden))


def build(method: str, steps_per_execution: int = 1) -> kgr.RegularizedModel:
    model = kgr.regularize(plain_model(), regularizer(method))
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=True,
        steps_per_execution=steps_per_execution,
    )
    return model


def train(strategy, method: str, steps_per_execution: int = 1):
    x, y = problem()
    with strategy.scope():
        model = build(method, steps_per_execution)
    fix_start_seed(model.regularizer)
    history = model.fit(x, y, batch_size=GLOBAL_BATCH, shuffle=False, verbose=0)
    logs = {k: float(v[-1]) for k, v in history.history.items()}
    return model, logs


def custom_loop(strategy, method: str) -> list:
    """`kgr.regularized_loss` in a custom loop, each replica's step run by `strategy.run`."""
    x, y = problem()
    with strategy.scope():
        model = plain_model()
        optimizer = keras.optimizers.SGD(0.1, momentum=0.5)
        optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    reg = regularizer(method)
    reg.build(strategy)
    fix_start_seed(reg)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            result = kgr.regularized_loss(model, x, y, loss_fn, reg)
        gradients = tape.gradient(result.total, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return result.total

    @tf.function
    def step(batch):
        return strategy.run(replica_step, args=batch)

    for batch in strategy.experimental_distribute_dataset(dataset):
        step(batch)
    return [w.tolist() for w in model.get_weights()]


def replica_settings(mirrored_strategy):
    """(name, strategy, steps_per_execution) of the runs compared with each other."""
    return (
        ("one_device", tf.distribute.get_strategy(), 1),
        ("two_replicas", mirrored_strategy, 1),
        ("two_replicas_spe3", mirrored_strategy, 3),
    )


def mirrored(out_path: str) -> None:
    results = {}
    mirrored_strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    for method in (*METHODS, *MEMBERS):
        for name, strategy, spe in replica_settings(mirrored_strategy):
            model, logs = train(strategy, method, spe)
            x, y = problem()
            evaluation = model.evaluate(x, y, batch_size=GLOBAL_BATCH, verbose=0, return_dict=True)
            results[f"{method}/{name}"] = {
                "evaluation": {k: float(v) for k, v in evaluation.items()},
                "weights": [w.tolist() for w in model.get_weights()],
                "logs": logs,
                "jit_compile": model.jit_compile,
                "num_replicas": strategy.num_replicas_in_sync,
            }
        results[f"{method}/custom_loop_two_replicas"] = {
            "weights": custom_loop(mirrored_strategy, method)
        }
    with open(out_path, "w") as f:
        json.dump(results, f)


class CountingModel(kgr.RegularizedModel):
    """Counts the Python calls of its step functions: they run only while tracing."""

    calls: list = []

    def train_step(self, data):
        CountingModel.calls.append(("train_step", self.name))
        return super().train_step(data)

    def regularized_step(self, *args, **kwargs):
        CountingModel.calls.append(("regularized_step", self.name))
        return super().regularized_step(*args, **kwargs)


def traces(name: str) -> int:
    return sum(1 for _, model in CountingModel.calls if model == name)


def lazy_fit(strategy, method, name, steps_per_execution=1, every=2, fraction=1.0, epochs=3):
    """fit with `every`/`fraction`, sigma changed each epoch; traces after epoch 1 and in all."""
    x, y = problem()
    weights = np.linspace(0.5, 1.5, len(y)).astype("float32")
    settings = dict(p=2, sigma=0.5, method=method, clean_weight=0.3, every=every, fraction=fraction)
    with strategy.scope():
        plain = plain_model()
        model = CountingModel(plain.inputs, plain.outputs, regularizer=settings, name=name)
        model.compile(
            optimizer=keras.optimizers.SGD(0.1, momentum=0.5),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=True,
            steps_per_execution=steps_per_execution,
        )
    initial_seed = None
    if fraction < 1.0:
        initial_seed = model.regularizer.subset_seed_generator().state.numpy().tolist()
    schedule = kgr.callbacks.RegularizerScheduler(lambda epoch: {"sigma": (0.5, 0.2, 0.8)[epoch]})
    first = {}

    class AfterFirstEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            first.setdefault("traces", traces(name))

    history = model.fit(
        x,
        y,
        sample_weight=weights,
        batch_size=GLOBAL_BATCH,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=[schedule, AfterFirstEpoch()],
    ).history
    return {
        "weights": [w.tolist() for w in model.get_weights()],
        "logs": {k: [float(v) for v in values] for k, values in history.items()},
        "traces_after_first_epoch": first["traces"],
        "traces": traces(name),
        "num_replicas": strategy.num_replicas_in_sync,
        "initial_seed": initial_seed,
    }


def subset_reference(method, initial_seed, replicas=2, epochs=3):
    """What two replicas with fraction=0.5 compute, on one device: each replica's rows.

    Each replica draws the same positions of its local batch of 8 from the
    same seed; its term, reduced over its rows and divided by the replicas,
    sums over the replicas to the term on the union of the rows, reduced
    over the union. The data loss uses the whole global batch.
    """
    x, y = problem()
    weights = np.linspace(0.5, 1.5, len(y)).astype("float32")
    model = plain_model()
    optimizer = keras.optimizers.SGD(0.1, momentum=0.5)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    local = GLOBAL_BATCH // replicas
    draws = 0
    for epoch in range(epochs):
        sigma = (0.5, 0.2, 0.8)[epoch]
        reg = kgr.GradientRegularizer(p=2, sigma=sigma, method=method, clean_weight=0.3)
        for batch in range(STEPS):
            rows = slice(batch * GLOBAL_BATCH, (batch + 1) * GLOBAL_BATCH)
            xb, yb, wb = x[rows], y[rows], weights[rows]
            counted = (epoch * STEPS + batch) % 2 == 0
            seed = np.array(initial_seed) + np.array([0, draws])
            picked = kgr._subsets.subset_rows(seed, local, 0.5).numpy()
            union = np.concatenate([picked + r * local for r in range(replicas)])
            with tf.GradientTape() as tape:
                data = kgr.regularized_loss(
                    model, xb, yb, loss_fn, {"sigma": 0.0}, sample_weight=wb
                )
                total = data.total
                if counted:
                    term = kgr.regularized_loss(
                        model, xb[union], yb[union], loss_fn, reg, sample_weight=wb[union]
                    )
                    total = total + 2 * (term.total - term.data_loss)
            draws += int(counted)
            gradients = tape.gradient(total, model.trainable_variables)
            optimizer.apply_gradients(zip(gradients, model.trainable_variables))
    return [w.tolist() for w in model.get_weights()]


def lazy(out_path: str) -> None:
    results = {}
    mirrored_strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    for method in METHODS:
        for name, strategy, spe in replica_settings(mirrored_strategy):
            results[f"{method}/every/{name}"] = lazy_fit(strategy, method, f"{method}_{name}", spe)
        fraction = lazy_fit(mirrored_strategy, method, f"{method}_fraction", fraction=0.5)
        fraction["reference"] = subset_reference(method, fraction["initial_seed"])
        results[f"{method}/fraction/two_replicas"] = fraction
    with open(out_path, "w") as f:
        json.dump(results, f)


def train_settings(strategy, settings_list: list, dataset) -> dict:
    """Two epochs of each setting on `dataset`, then `evaluate`: weights and loss by index."""
    results = {}
    for index, settings in enumerate(settings_list):
        with strategy.scope():
            plain = plain_model()
            model = kgr.RegularizedModel(plain.inputs, plain.outputs, regularizer=settings)
            model.compile(
                optimizer=keras.optimizers.SGD(0.1, momentum=0.5),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                jit_compile=True,
            )
        model.fit(dataset, epochs=2, verbose=0)
        evaluation = model.evaluate(dataset, verbose=0, return_dict=True)
        for k, weight in enumerate(model.get_weights()):
            results[f"{index}/w{k}"] = weight
        results[f"{index}/evaluation_loss"] = np.asarray(evaluation["loss"])
    return results


def multi_worker(out_path: str, settings_json: str) -> None:
    """One of two workers; each global batch is split between them by TF."""
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    x, y = problem()
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH).with_options(options)
    np.savez(out_path, **train_settings(strategy, json.loads(settings_json), dataset))


def single(out_path: str, settings_json: str) -> None:
    """The same settings in one process on one device."""
    x, y = problem()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    results = train_settings(tf.distribute.get_strategy(), json.loads(settings_json), dataset)
    np.savez(out_path, **results)


if __name__ == "__main__":
    cases = {"mirrored": mirrored, "lazy": lazy, "worker": multi_worker, "single": single}
    cases[sys.argv[1]](*sys.argv[2:])
