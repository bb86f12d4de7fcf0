"""Faults: a run SIGKILLed anywhere and restarted ends exactly like an uninterrupted one.

Every run is a subprocess of tests/train_fault_cases.py, which kills itself
at a deterministic point (a training step, inside the write of the training
state, inside an evaluation). With --deterministic the restarted run must end
with bit-identical weights, optimizer and dropout-seed states, and the same
metrics (timings aside) as a run that was never interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_gradreg import _randomness as randomness

pytestmark = pytest.mark.slow

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


def test_killed_anywhere_and_restarted_ends_bit_identical(tmp_path):
    reference = start(tmp_path / "reference")
    run = tmp_path / "run"
    # Killed after step 2 of epoch 2: resumes after epoch 1.
    finish(start(run, "step:1:2"), -signal.SIGKILL)
    assert [r["epoch"] for r in metrics(run)["epochs"]] == [1]
    # Killed inside the write of epoch 2's training state (a torn file): epoch 2's
    # record is written, but the run resumes after epoch 1 and redoes epoch 2.
    finish(start(run, "state:2"), -signal.SIGKILL)
    assert [r["epoch"] for r in metrics(run)["epochs"]] == [1, 2]
    assert sorted(os.listdir(run / "backup")) == ["epoch_000001", "epoch_000002.partial"]
    # Killed in epoch 3's test evaluation (2nd evaluate of this process).
    finish(start(run, "evaluate:2"), -signal.SIGKILL)
    assert metrics(run)["resumed_from_epoch"] == 1
    assert [r["epoch"] for r in metrics(run)["epochs"]] == [1, 2]
    # Killed in the robustness report after the final test evaluation.
    finish(start(run, "robustness"), -signal.SIGKILL)
    killed = metrics(run)
    assert killed["status"] == "evaluating" and killed["resumed_from_epoch"] == 2
    assert killed["final"] is not None and killed["robustness"] is None
    # Started again: training is complete, the evaluation is done.
    finish(start(run), 0)
    finish(reference, 0)
    resumed, uninterrupted = metrics(run), metrics(tmp_path / "reference")
    assert resumed["status"] == "done" and resumed["resumed_from_epoch"] == 3
    assert [r["epoch"] for r in resumed["epochs"]] == [1, 2, 3]
    assert without_timings(resumed) == without_timings(uninterrupted)
    assert_identical(final_state(run), final_state(tmp_path / "reference"))
    assert resumed["robustness"]["rows"] and resumed["final"]["test/accuracy"] >= 0
    # A finished run started again does nothing and says so.
    stderr = finish(start(run), 0)
    assert "is complete (3 epochs" in stderr and "--reevaluate" in stderr
    assert metrics(run) == resumed


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_workers(workdir, kills=("none", "none")):
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
    settings = {**SETTINGS, "strategy": "multi_worker", "jit_compile": False, "epochs": 2}
    settings["eval_examples"] = 0
    return [
        start(
            workdir,
            kill,
            settings,
            env={
                "TF_CONFIG": json.dumps(
                    {"cluster": cluster, "task": {"type": "worker", "index": index}}
                )
            },
        )
        for index, kill in enumerate(kills)
    ]


def test_multi_worker_killed_worker_resumes_like_an_uninterrupted_run(tmp_path):
    reference = start_workers(tmp_path / "reference")
    for process in reference:
        finish(process, 0)
    chief = metrics(tmp_path / "reference")
    assert chief["flags"]["strategy"] == "multi_worker" and len(chief["epochs"]) == 2
    # Only the chief writes the run's files; worker 1 writes its own below it.
    worker_dir = tmp_path / "reference" / "workers" / "worker_1"
    assert (worker_dir / "metrics.json").exists()
    assert not (tmp_path / "reference" / "workers" / "worker_0").exists()
    assert_identical(final_state(tmp_path / "reference"), final_state(worker_dir))

    run = tmp_path / "run"
    chief_process, worker = start_workers(run, kills=("none", "step:1:1"))
    finish(worker, -signal.SIGKILL)  # Worker 1 died in the middle of epoch 2 ...
    chief_process.kill()  # ... and the chief, blocked on it, is stopped: restart both.
    chief_process.communicate(timeout=60)
    assert [r["epoch"] for r in metrics(run)["epochs"]] == [1]
    for process in start_workers(run):
        finish(process, 0)
    resumed = metrics(run)
    assert resumed["resumed_from_epoch"] == 1 and [r["epoch"] for r in resumed["epochs"]] == [1, 2]
    assert without_timings(resumed) == without_timings(chief)
    assert_identical(final_state(run), final_state(tmp_path / "reference"))
    assert_identical(final_state(run / "workers" / "worker_1"), final_state(worker_dir))
