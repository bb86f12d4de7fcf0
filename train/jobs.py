"""Training runs of a reproduction: each a `train.main` run in a workdir of its own.

A finished run (its metrics.json says "done") is read, not repeated, once
its recorded settings are checked against the ones asked for; an unfinished
one resumes. Runs go one after another in this process, or up to `parallel`
at a time as `python -m train.main` subprocesses (each with a log file next
to its workdir).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from typing import Any

from absl import logging

from train import config as config_lib
from train import train_lib
from train.workdir import METRICS_FILE

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH_FLAGS = frozenset({"data_npz", "tfds_data_dir"})
# Where the data is and how the run executes: a finished run may be reused
# across them (train_lib resumes across them too).
RUN_LOCATION_FIELDS = frozenset(
    {"data_npz", "tfds_data_dir", "strategy", "jit_compile", "deterministic"}
)


@dataclasses.dataclass(frozen=True)
class Job:
    """One run: `python -m train.main --preset=... [--flag=value ...] --workdir=root/name`."""

    name: str
    preset: str
    overrides: dict[str, Any]


def checkout_relative(path: str) -> str:
    """`path` relative to the checkout (commands run there), e.g. ../shared/data/mnist.npz."""
    return os.path.relpath(os.path.abspath(path), CHECKOUT)


def command_arguments(preset: str, overrides: dict[str, Any]) -> list[str]:
    """The flags of the `train.main` command of a run (paths relative to the checkout)."""
    arguments = [f"--preset={preset}"]
    for key, value in overrides.items():
        if key in PATH_FLAGS and value:
            value = checkout_relative(value)
        if isinstance(value, float) and math.isinf(value):
            value = "inf"
        if isinstance(value, (tuple, list)):
            value = ",".join("inf" if math.isinf(v) else str(v) for v in value)
        if isinstance(value, bool):
            arguments.append(f"--{key}" if value else f"--no{key}")
        else:
            arguments.append(f"--{key}={value}")
    return arguments


def command_line(preset: str, overrides: dict[str, Any]) -> str:
    """The `train.main` command that reproduces a run, run from the checkout."""
    return " ".join(["python -m train.main", *command_arguments(preset, overrides)])


def check_same_settings(workdir: str, recorded: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Raises if a run directory holds a run with other settings than `wanted`."""

    def same(a, b):
        a, b = (float(v) if v in ("inf", "-inf") else v for v in (a, b))  # JSON has no inf.
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            return math.isclose(a, b) or (math.isinf(a) and math.isinf(b) and a == b)
        return a == b

    differing = sorted(
        k
        for k in wanted
        if k not in RUN_LOCATION_FIELDS and k in recorded and not same(recorded[k], wanted[k])
    )
    if differing:
        raise ValueError(
            f"{workdir} holds a run with other settings; move it away or choose another "
            "--workdir. Differing: "
            + ", ".join(f"{k}={recorded[k]!r} (wanted {wanted[k]!r})" for k in differing)
        )


def _finished(root: str, job: Job) -> dict[str, Any] | None:
    """The metrics of a finished run of `job` (checked), or None if it has not finished."""
    workdir = os.path.join(root, job.name)
    config = config_lib.make_config(job.preset, **job.overrides)
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        done = json.load(f)
    check_same_settings(workdir, done.get("flags", {}), dataclasses.asdict(config))
    return done if done.get("status") == "done" else None


def _result(root: str, job: Job, metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "metrics": metrics,
        "command": command_line(job.preset, job.overrides),
        "workdir": os.path.join(root, job.name),
    }


def run_jobs(root: str, jobs: list[Job], parallel: int = 1) -> dict[str, dict[str, Any]]:
    """Trains, resumes or reads every job; returns name -> {metrics, command, workdir}.

    Args:
        root: The directory holding one workdir per job.
        jobs: The runs.
        parallel: Runs at a time; above 1 they are `train.main` subprocesses.

    Raises:
        RuntimeError: If a subprocess run fails (the message ends with its log).
    """
    results, pending = {}, []
    for job in jobs:
        done = _finished(root, job)
        if done is not None:
            logging.info("%s: finished earlier, reading it", job.name)
            results[job.name] = _result(root, job, done)
        else:
            pending.append(job)
    if parallel <= 1:
        for job in pending:
            logging.info("%s: training (%s)", job.name, command_line(job.preset, job.overrides))
            config = config_lib.make_config(job.preset, **job.overrides)
            metrics = train_lib.train_and_evaluate(config, os.path.join(root, job.name))
            results[job.name] = _result(root, job, metrics)
        return results
    _run_in_subprocesses(root, pending, parallel)
    for job in pending:
        results[job.name] = _result(root, job, _finished(root, job))
    return results


def _run_in_subprocesses(root: str, jobs: list[Job], parallel: int) -> None:
    waiting, running = list(jobs), {}
    while waiting or running:
        while waiting and len(running) < parallel:
            job = waiting.pop(0)
            workdir = os.path.abspath(os.path.join(root, job.name))
            os.makedirs(os.path.dirname(workdir), exist_ok=True)
            log = open(f"{workdir}.log", "a")  # noqa: SIM115  (closed when the run ends)
            arguments = command_arguments(job.preset, job.overrides) + [f"--workdir={workdir}"]
            logging.info("%s: training in a subprocess (log %s.log)", job.name, workdir)
            process = subprocess.Popen(
                [sys.executable, "-m", "train.main", *arguments],
                cwd=CHECKOUT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            running[job.name] = (process, log, workdir)
        time.sleep(2.0)
        for name, (process, log, workdir) in list(running.items()):
            if process.poll() is None:
                continue
            log.close()
            del running[name]
            if process.returncode:
                for other, _, _ in running.values():
                    other.terminate()
                with open(f"{workdir}.log") as f:
                    tail = f.read()[-3000:]
                raise RuntimeError(f"{name} failed (exit {process.returncode}):\n{tail}")
