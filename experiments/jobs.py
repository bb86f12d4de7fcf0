"""Training runs of an experiment: each a `train.main` run in a workdir of its own.

A finished run (its metrics.json says "done") is read, not repeated, once
its recorded settings are checked against the ones asked for (the binary's
rule, `train.workdir.check_same_run`); an unfinished one resumes. Runs go
one after another in this process, or up to `parallel` at a time as
`python -m train.main` subprocesses (each with a log file next to its
workdir).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags, logging

from train import config as config_lib
from train import field_flags, train_lib
from train import workdir as workdir_lib

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH_FLAGS = frozenset({"data_npz", "tfds_data_dir"})
METRICS_FILE = workdir_lib.METRICS_FILE


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
        if isinstance(value, (tuple, list)):
            value = ",".join(str(v) for v in value)  # str(math.inf) is "inf".
        if isinstance(value, bool):
            arguments.append(f"--{key}" if value else f"--no{key}")
        else:
            arguments.append(f"--{key}={value}")
    return arguments


def command_line(preset: str, overrides: dict[str, Any]) -> str:
    """The `train.main` command that reproduces a run, run from the checkout."""
    return " ".join(["python -m train.main", *command_arguments(preset, overrides)])


def _finished(root: str, job: Job) -> dict[str, Any] | None:
    """The metrics of a finished run of `job` (checked), or None if it has not finished.

    Raises:
        train.errors.InputError: If the workdir holds a run with other
            settings (a finished run's results are reused as they are, so
            only where the data is and how the run executes may differ).
    """
    workdir = os.path.join(root, job.name)
    done = workdir_lib.read_metrics(workdir)
    if done is None:
        return None
    finished = done.get("status") == "done"
    config = config_lib.make_config(job.preset, **job.overrides)
    workdir_lib.check_same_run(done, config, workdir, reused=finished)
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


def kept_earlier(
    earlier: Sequence[dict[str, Any]],
    produced: Sequence[dict[str, Any]],
    key: Callable[[dict[str, Any]], Any],
    mark: bool = False,
) -> list[dict[str, Any]]:
    """The `earlier` records that no `produced` record replaces (same `key`).

    What --keep_earlier_rows keeps of an experiment's earlier results; with
    `mark`, each kept record is copied with `earlier=True`.
    """
    replaced = {key(record) for record in produced}
    kept = [record for record in earlier if key(record) not in replaced]
    return [dict(record, earlier=True) for record in kept] if mark else kept


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


def hardware() -> str:
    """CPU model, core count and GPUs of this machine (what is known of it)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = re.findall(r"model name\s*:\s*(.+)", f.read())
        if names:
            model = names[0].strip()
    except OSError:
        pass
    import tensorflow as tf

    gpus = len(tf.config.list_physical_devices("GPU"))
    return f"{model}, {os.cpu_count()} cores, " + (f"{gpus} GPU" if gpus else "no GPU")


def define_binary_flags(names: Sequence[str], module: str) -> None:
    """Defines train.main's flags `names` for an experiment that passes them on to its runs.

    Each has the binary's type, default, help and check; the `--help` of
    `module` (the experiment's `__name__`) lists them.
    """
    for name in names:
        field_flags.define(config_lib.FIELDS_BY_NAME[name], module, key_of=module)


def define_flag(module: str, kind: str, name: str, default: Any, help_text: str, **kw) -> None:
    """Defines an experiment's own flag (`kind`: "string", "integer", "bool" or "list").

    Experiments share the flags of one name (`--workdir`, `--parallel`, ...):
    defined by the first imported (tests import several), listed by each one's
    `--help`.
    """
    parser = {
        "string": flags.ArgumentParser,
        "integer": lambda: flags.IntegerParser(**kw),
        "list": flags.ListParser,
    }
    if kind == "bool":
        flag = flags.BooleanFlag(name, default, help_text)
    else:
        serializer = flags.CsvListSerializer(",") if kind == "list" else flags.ArgumentSerializer()
        flag = flags.Flag(parser[kind](), serializer, name, default, help_text)
    field_flags.define_once(flag, module, key_of=module)


def define_keep_earlier_rows(module: str) -> None:
    """--keep_earlier_rows, shared by the experiments that publish a results JSON."""
    define_flag(
        module, "bool", "keep_earlier_rows", True,
        "Keep the rows and selections of the existing results JSON in --results_dir that "
        "this run does not produce (an experiment done in several sittings).",
    )  # fmt: skip


def given_binary_flags(names: Sequence[str]) -> dict[str, Any]:
    """The values of those flags of `names` given on the command line (tuples for lists)."""
    values = {name: flags.FLAGS[name].value for name in names if flags.FLAGS[name].present}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def define_common_flags(module: str, pages: bool = True, readme: bool = False) -> None:
    """The experiments' shared flags.

    --workdir, --parallel and --results_dir; with `pages`, --results_page (the
    page whose table is replaced) and --render; with `readme`, --readme (the
    page whose headline table is replaced).
    """
    define_flag(module, "string", "workdir", None, "Directory holding one workdir per run.")
    define_flag(module, "integer", "parallel", 1, "Runs at a time (above 1: subprocesses).",
                lower_bound=1)  # fmt: skip
    define_flag(module, "string", "results_dir", "results", "Where the results files go.")
    if pages:
        page_help = "Page whose table is replaced ('' for none)."
        define_flag(module, "string", "results_page", "docs/results.md", page_help)
        render_help = "Only write the Markdown again from --results_dir's JSON; run nothing."
        define_flag(module, "bool", "render", False, render_help)
    if readme:
        readme_help = "Page whose headline table is replaced ('' for none)."
        define_flag(module, "string", "readme", "README.md", readme_help)
