"""Faults with two workers: a worker SIGKILLed in an epoch, both restarted, end like
an uninterrupted pair (bit-identical states on the chief and the other worker).

Runs are subprocesses of tests/train_fault_cases.py (tests/fault_runs.py).
"""

from __future__ import annotations

import signal

import pytest
from fault_runs import (
    assert_identical,
    final_state,
    finish,
    metrics,
    start_workers,
    without_timings,
)

pytestmark = pytest.mark.slow


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
