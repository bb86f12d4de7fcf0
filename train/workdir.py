"""The run's directory: checks before any work, creation, metrics.json.

Everything here runs before training: a --workdir that cannot hold the run
(a file, a parent that cannot be created, another run's settings, an
unreadable metrics.json) raises `InputError` naming the flag and the value,
and nothing is created until every check has passed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from train.config import Config, comparable_settings
from train.errors import InputError

METRICS_FILE = "metrics.json"

# Settings a run's workdir does not pin: where the data is and how the run
# executes (always), and what resuming a run may change: its length, its
# evaluation and its pictures (the binary trains on or evaluates again).
LOCATION_FIELDS = frozenset(
    {"tfds_data_dir", "data_npz", "strategy", "jit_compile", "deterministic"}
)
EVALUATION_FIELDS = (
    "eval_apgd_steps", "eval_epsilons_2", "eval_epsilons_inf", "eval_examples", "eval_pgd_steps",
    "eval_square_queries", "eval_suite",
)  # fmt: skip
RESUMABLE_FIELDS = LOCATION_FIELDS | {"epochs", "pictures", *EVALUATION_FIELDS}


def _missing_parents(path: str) -> list[str]:
    """`path` and its ancestors that do not exist, deepest first."""
    missing = []
    while path and not os.path.lexists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def check_path(workdir: str) -> None:
    """Raises `InputError` unless `workdir` is, or can be created as, a directory."""
    flag = f"--workdir={workdir}"
    if not workdir:
        raise InputError(f"--workdir must name a directory. Received: workdir={workdir!r}")
    if os.path.lexists(workdir):
        if not os.path.isdir(workdir):
            raise InputError(f"{flag} exists and is not a directory.")
        if not os.access(workdir, os.W_OK | os.X_OK):
            raise InputError(f"{flag} is not writable.")
        return
    missing = _missing_parents(os.path.abspath(workdir))
    existing = os.path.dirname(missing[-1])
    if not os.path.isdir(existing):
        raise InputError(f"{flag} cannot be created: {existing} is not a directory.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{flag} cannot be created: {existing} is not writable.")
    longest = os.pathconf(existing, "PC_NAME_MAX")
    too_long = [os.path.basename(p) for p in missing if len(os.path.basename(p)) > longest]
    if too_long:
        raise InputError(
            f"{flag} cannot be created: a name is longer than {longest} characters "
            f"({too_long[0][:20]}...)."
        )


def create(workdir: str) -> None:
    """Creates `workdir` and its missing parents; on failure removes what it made."""
    missing = _missing_parents(os.path.abspath(workdir))
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as error:
        for path in missing:
            if os.path.isdir(path) and not os.listdir(path):
                os.rmdir(path)
        raise InputError(f"--workdir={workdir} cannot be created ({error}).") from None


LOCK_FILE = ".lock"


@contextlib.contextmanager
def locked(workdir: str) -> Iterator[None]:
    """Holds `workdir`'s lock while the block runs (and no longer than the process).

    Two processes training in one workdir would overwrite each other's
    checkpoints and metrics; the second one stops here instead.

    Raises:
        InputError: If another process holds the lock.
    """
    path = os.path.join(workdir, LOCK_FILE)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise InputError(
                f"--workdir={workdir} is in use by another run (it holds {path}); wait for "
                "it to finish or use another --workdir."
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_metrics(workdir: str) -> dict[str, Any] | None:
    """The `metrics.json` of an earlier run in `workdir`, or None."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            content = json.load(f)
    except (OSError, ValueError) as error:
        raise InputError(
            f"--workdir={workdir} holds an unreadable {METRICS_FILE} ({error}); "
            "move it away or use a new --workdir."
        ) from None
    if not isinstance(content, dict):
        raise InputError(f"--workdir={workdir}: {METRICS_FILE} is not a JSON object.")
    return content


def check_same_run(
    previous: dict[str, Any] | None, config: Config, workdir: str, *, reused: bool = False
) -> None:
    """Raises `InputError` if `previous` was run with other settings than `config`.

    The one rule for "same run", of the binary and of the experiments. Both
    sides are compared as `Config.to_dict()` writes them, the regularizer's
    settings as it resolves them (`comparable_settings`), and a setting the
    record lacks (added after the run) as its default. `LOCATION_FIELDS` may
    always differ; the rest of `RESUMABLE_FIELDS` only when the run is
    resumed, not when a finished run's results are `reused` as they are.
    """
    if not previous or "flags" not in previous:
        return
    free = LOCATION_FIELDS if reused else RESUMABLE_FIELDS
    current = comparable_settings(config.to_dict())
    recorded = comparable_settings({**type(config)().to_dict(), **previous["flags"]})
    changed = sorted(
        key
        for key in set(current) | set(recorded)
        if key not in free and recorded.get(key) != current.get(key)
    )
    if changed:
        details = ", ".join(f"{k}: {recorded.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise InputError(
            f"--workdir={workdir} holds a run with other settings ({details}). "
            "Use a new --workdir, or the same settings to resume."
        )


def check_same_data(previous: dict[str, Any] | None, data: dict[str, Any], workdir: str) -> None:
    """Raises `InputError` if `previous` was trained on other data than `data` describes.

    Two .npz files are the same data if their SHA-256 agree (wherever they
    are); two TFDS data sets if name and version agree. A run may move
    between an .npz and TFDS (no common checksum): that is not checked.
    """
    recorded = (previous or {}).get("data") or {}
    if recorded.get("source") != data.get("source"):
        return
    keys = ("sha256",) if data["source"] == "npz" else ("name", "version")
    differ = [k for k in keys if recorded.get(k) != data.get(k)]
    if differ:
        flag = "--data_npz" if data["source"] == "npz" else "--dataset"
        where = data.get("path") or data.get("name")
        raise InputError(
            f"{flag}={where} is not the data the run in --workdir={workdir} was trained on "
            + ", ".join(f"({k} {recorded.get(k)} there, {data.get(k)} here)" for k in differ)
            + ". Use a new --workdir, or the same data to resume."
        )


def is_complete(previous: dict[str, Any] | None, config: Config) -> bool:
    """Whether `previous` finished training `config.epochs` epochs and its evaluation."""
    return bool(
        previous
        and previous.get("status") == "done"
        and (previous.get("final") or {}).get("epochs") == config.epochs
    )


def changed_evaluation(previous: dict[str, Any], config: Config) -> list[str]:
    """Evaluation settings that differ from those `previous` was evaluated with."""
    current = config.to_dict()
    return [k for k in EVALUATION_FIELDS if previous["flags"].get(k) != current.get(k)]


class MetricsFile:
    """`metrics.json`, held in memory and rewritten atomically."""

    def __init__(self, path: str, content: dict[str, Any]):
        self.path = path
        self.content = content

    def write(self) -> None:
        """Writes the content (to a temporary file, then renamed)."""
        temporary = f"{self.path}.tmp"
        with open(temporary, "w") as f:
            json.dump(self.content, f, indent=2, default=_json_default)
        os.replace(temporary, self.path)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"Not JSON serializable: {type(value).__name__}")
