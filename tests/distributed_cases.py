"""Runs RegularizedModel on 1 and on 2 logical CPU devices; prints JSON.

Logical devices must be configured before TensorFlow runs anything, so the
tests run this file in a subprocess:

    python tests/distributed_cases.py mirrored OUT.json
    python tests/distributed_cases.py worker OUT.npz   # with TF_CONFIG set
    python tests/distributed_cases.py single OUT.npz
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

if sys.argv[1] == "mirrored":
    _cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_gradreg as kgr  # noqa: E402

METHODS = ("penalty", "adversarial", "finite_difference")
GLOBAL_BATCH = 16
STEPS = 3


def problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(GLOBAL_BATCH * STEPS, 6)).astype("float32")
    y = rng.integers(0, 3, size=len(x))
    return x, y


def regularizer(method: str) -> kgr.GradientRegularizer:
    return kgr.GradientRegularizer(p=2, sigma=0.5, method=method, clean_weight=0.3)


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


def mirrored(out_path: str) -> None:
    results = {}
    mirrored_strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    for method in METHODS:
        for name, strategy, spe in (
            ("one_device", tf.distribute.get_strategy(), 1),
            ("two_replicas", mirrored_strategy, 1),
            ("two_replicas_spe3", mirrored_strategy, 3),
        ):
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


def multi_worker(out_path: str) -> None:
    """One of two workers; each global batch is split between them by TF."""
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    x, y = problem()
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH).with_options(options)
    with strategy.scope():
        model = build("penalty")
    model.fit(dataset, epochs=1, verbose=0)
    evaluation = model.evaluate(dataset, verbose=0, return_dict=True)
    np.savez(out_path, *model.get_weights(), evaluation_loss=evaluation["loss"])


def single(out_path: str) -> None:
    model, _ = train(tf.distribute.get_strategy(), "penalty")
    x, y = problem()
    evaluation = model.evaluate(x, y, batch_size=GLOBAL_BATCH, verbose=0, return_dict=True)
    np.savez(out_path, *model.get_weights(), evaluation_loss=evaluation["loss"])


if __name__ == "__main__":
    {"mirrored": mirrored, "worker": multi_worker, "single": single}[sys.argv[1]](sys.argv[2])
