"""Trains one small model per regularizer setting on one of two workers, or on one process.

Run by tests/test_multi_worker_methods.py in subprocesses:

    TF_CONFIG=... python tests/multi_worker_cases.py worker OUT.npz SETTINGS_JSON
    python tests/multi_worker_cases.py single OUT.npz SETTINGS_JSON

SETTINGS_JSON is a list of `kgr.GradientRegularizer` argument dicts; OUT.npz
gets, for setting i, its final weights (`i/w0`, `i/w1`, ...) and its
`evaluate` loss (`i/evaluation_loss`).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_gradreg as kgr  # noqa: E402

GLOBAL_BATCH = 16
STEPS = 3


def problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(GLOBAL_BATCH * STEPS, 6)).astype("float32")
    y = rng.integers(0, 3, size=len(x))
    return x, y


def build(settings: dict) -> kgr.RegularizedModel:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, activation="tanh")(inputs)
    model = kgr.RegularizedModel(inputs, keras.layers.Dense(3)(hidden), regularizer=settings)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    return model


def run(strategy, settings_list: list, dataset) -> dict:
    results = {}
    for index, settings in enumerate(settings_list):
        with strategy.scope():
            model = build(settings)
        model.fit(dataset, epochs=2, verbose=0)
        evaluation = model.evaluate(dataset, verbose=0, return_dict=True)
        for k, weight in enumerate(model.get_weights()):
            results[f"{index}/w{k}"] = weight
        results[f"{index}/evaluation_loss"] = np.asarray(evaluation["loss"])
    return results


def main(mode: str, out_path: str, settings_json: str) -> None:
    settings_list = json.loads(settings_json)
    x, y = problem()
    if mode == "worker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        options = tf.data.Options()
        policy = tf.data.experimental.AutoShardPolicy.DATA
        options.experimental_distribute.auto_shard_policy = policy
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
        dataset = dataset.with_options(options)
    else:
        strategy = tf.distribute.get_strategy()
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    np.savez(out_path, **run(strategy, settings_list, dataset))


if __name__ == "__main__":
    main(*sys.argv[1:4])
