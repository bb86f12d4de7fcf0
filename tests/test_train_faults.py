"""Faults: a run SIGKILLed anywhere and restarted ends exactly like an uninterrupted one.

Every run is a subprocess of tests/train_fault_cases.py, which kills itself
at a deterministic point (a training step, inside the write of the training
state, inside an evaluation). With --deterministic the restarted run must end
with bit-identical weights, optimizer and dropout-seed states, and the same
metrics (timings aside) as a run that was never interrupted. Two workers, one
of them killed: tests/test_train_faults_multi_worker.py (its own module, so
that pytest-xdist can run both on two workers).
"""

from __future__ import annotations

import os
import signal

import pytest
from fault_runs import (
    assert_identical,
    final_state,
    finish,
    metrics,
    start,
    without_timings,
)

pytestmark = pytest.mark.slow


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
