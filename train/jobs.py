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
from collections.abc import Callable
from typing import Any

from absl import logging

from train import config as config_lib
from train import train_lib
from train.workdir import EVALUATION_FIELDS, METRICS_FILE

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
            value = ",".join("inf" if v == math.inf else str(v) for v in value)
        if isinstance(value, bool):
            arguments.append(f"--{key}" if value else f"--no{key}")
        else:
            arguments.append(f"--{key}={value}")
    return arguments


def command_line(preset: str, overrides: dict[str, Any]) -> str:
    """The `train.main` command that reproduces a run, run from the checkout."""
    return " ".join(["python -m train.main", *command_arguments(preset, overrides)])


def check_same_settings(
    workdir: str, recorded: dict[str, Any], wanted: dict[str, Any], finished: bool = True
) -> None:
    """Raises if a run directory holds a run with other settings than `wanted`.

    Where the data is and how the run executes may differ; for a run that has
    not finished, its evaluation settings too (it has not been evaluated yet,
    and train.main resumes it with the new ones).
    """
    free = RUN_LOCATION_FIELDS | (set() if finished else {*EVALUATION_FIELDS, "pictures"})

    def same(a, b):
        a, b = (float(v) if v in ("inf", "-inf") else v for v in (a, b))  # JSON has no inf.
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            return math.isclose(a, b) or (math.isinf(a) and math.isinf(b) and a == b)
        return a == b

    differing = sorted(
        k for k in wanted if k not in free and k in recorded and not same(recorded[k], wanted[k])
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
    finished = done.get("status") == "done"
    check_same_settings(
        workdir,
        config_lib.comparable_settings(done.get("flags", {})),
        config_lib.comparable_settings(dataclasses.asdict(config)),
        finished,
    )
    return done if finished else None


def _result(root: str, job: Job, metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "metrics": metrics,
        "command": command_line(job.preset, job.overrides),
        "workdir": os.path.join(root, job.name),
    }


@dataclasses.dataclass(frozen=True)
class Task:
    """A run whose settings may wait for other stages' results.

    Attributes:
        make: Builds the `Job` from the summaries of the stages in `needs`.
        needs: Stages whose summaries `make` uses; the task starts once they
            are all summarized.
        stage: The stage this run belongs to (None: none), summarized once
            all of its tasks have finished.
    """

    make: Callable[[dict[str, Any]], Job]
    needs: tuple[str, ...] = ()
    stage: str | None = None


def run_jobs(root: str, jobs: list[Job], parallel: int = 1) -> dict[str, dict[str, Any]]:
    """Trains, resumes or reads every job; returns name -> {metrics, command, workdir}."""
    tasks = [Task(lambda _, job=job: job) for job in jobs]
    return run_tasks(root, tasks, {}, parallel)[0]


def run_tasks(
    root: str,
    tasks: list[Task],
    summarize: dict[str, Callable[[dict[str, dict[str, Any]]], Any]],
    parallel: int = 1,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Runs tasks as soon as the stages they need are summarized, up to `parallel` at once.

    Finished runs are read, not repeated. With `parallel` above 1 the runs are
    `train.main` subprocesses; otherwise they run in this process, in order.

    Args:
        root: The directory holding one workdir per run.
        tasks: The runs, in the order to start them.
        summarize: Stage -> a function of all results so far, called once
            every task of that stage has finished.
        parallel: Runs at a time.

    Returns:
        (name -> {metrics, command, workdir}, stage -> summary).

    Raises:
        RuntimeError: If a subprocess run fails (the message ends with its log).
    """
    results, summaries, pending, running = {}, {}, list(tasks), {}
    stage_tasks = {stage: [t for t in tasks if t.stage == stage] for stage in summarize}
    finished_tasks: set[int] = set()
    while pending or running:
        for task in [t for t in pending if all(need in summaries for need in t.needs)]:
            if len(running) >= max(parallel, 1):
                break
            pending.remove(task)
            job = task.make(summaries)
            done = _finished(root, job)
            if done is None and parallel > 1:
                running[job.name] = (task, job, _start(root, job))
                continue
            if done is None:
                done = _train_here(root, job)
            else:
                logging.info("%s: finished earlier, reading it", job.name)
            results[job.name] = _result(root, job, done)
            finished_tasks.add(id(task))
        for name, (task, job, process) in list(running.items()):
            if process.poll() is None:
                continue
            del running[name]
            _check_exit(name, process, running)
            results[name] = _result(root, job, _finished(root, job))
            finished_tasks.add(id(task))
        for stage, members in stage_tasks.items():
            if stage not in summaries and all(id(t) in finished_tasks for t in members):
                summaries[stage] = summarize[stage](results)
        if running:
            time.sleep(2.0)
        elif pending and not any(all(n in summaries for n in t.needs) for t in pending):
            raise ValueError(f"No task can start: unknown stages in {[t.needs for t in pending]}")
    return results, summaries


def _train_here(root: str, job: Job) -> dict[str, Any]:
    logging.info("%s: training (%s)", job.name, command_line(job.preset, job.overrides))
    config = config_lib.make_config(job.preset, **job.overrides)
    return train_lib.train_and_evaluate(config, os.path.join(root, job.name))


def _start(root: str, job: Job) -> subprocess.Popen:
    """Starts `python -m train.main` for `job`, its output appended to <workdir>.log."""
    workdir = os.path.abspath(os.path.join(root, job.name))
    os.makedirs(os.path.dirname(workdir), exist_ok=True)
    arguments = command_arguments(job.preset, job.overrides) + [f"--workdir={workdir}"]
    logging.info("%s: training in a subprocess (log %s.log)", job.name, workdir)
    with open(f"{workdir}.log", "a") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "train.main", *arguments],
            cwd=CHECKOUT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    process.log_path = f"{workdir}.log"
    return process


def _check_exit(name: str, process: subprocess.Popen, running: dict) -> None:
    """Raises (stopping the other runs) if a finished subprocess failed."""
    if not process.returncode:
        return
    for _, _, other in running.values():
        other.terminate()
    with open(process.log_path) as f:
        tail = f.read()[-3000:]
    raise RuntimeError(f"{name} failed (exit {process.returncode}):\n{tail}")
