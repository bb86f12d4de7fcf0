"""Runs of tests/train_fault_cases.py for the fault tests (test_train_faults*.py).

Each run is a subprocess that kills itself at a deterministic point; these
helpers start runs, wait for them and read what they left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import keras
import numpy as np
from cluster import reserve_ports, tf_config

from keras_gradreg import _randomness as randomness

CASES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_fault_cases.py")
REPO = os.path.dirname(os.path.dirname(CASES))
# 32 mock examples, batch 8: 4 steps per epoch; Adam with cosine decay over the
# run; dropout 0.2/0.5 (seed states); a tiny maxout MLP.
SETTINGS = dict(
    preset="mnist_maxout_mlp",
    hidden_units=(8,),
    batch_size=8,
    epochs=3,
    eval_examples=8,
    eval_suite="fast",
    eval_pgd_steps=2,
    pictures=False,
    deterministic=True,
)


def start(workdir, kill="none", settings=None, env=None):
    return subprocess.Popen(
        [sys.executable, CASES, str(workdir), json.dumps(settings or SETTINGS), kill],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process, expected):
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == expected, stderr[-4000:]
    return stderr


def metrics(workdir):
    with open(os.path.join(workdir, "metrics.json")) as f:
        return json.load(f)


def without_timings(value):
    """metrics.json without what differs between processes (times, argv, resume point)."""
    if isinstance(value, dict):
        return {
            k: without_timings(v)
            for k, v in value.items()
            if "seconds" not in k and k not in ("command", "resumed_from_epoch")
        }
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def final_state(workdir):
    """Weights, optimizer variables and dropout seed states of checkpoints/last.keras."""
    model = keras.saving.load_model(os.path.join(workdir, "checkpoints", "last.keras"))
    seeds = [g.state for g in randomness.seed_generators(model, include_global=False)]
    return [np.asarray(v) for v in (*model.weights, *model.optimizer.variables, *seeds)]


def assert_identical(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def start_workers(workdir, kills=("none", "none")):
    ports = reserve_ports(2)
    settings = {**SETTINGS, "strategy": "multi_worker", "jit_compile": False, "epochs": 2}
    settings["eval_examples"] = 0
    return [
        start(
            workdir,
            kill,
            settings,
            env={"TF_CONFIG": tf_config(ports, index)},
        )
        for index, kill in enumerate(kills)
    ]
