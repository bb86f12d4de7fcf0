r"""Against adversarial training: the family beside PGD-AT and TRADES, per unit of training time.

    python -m experiments.against_adversarial_training \
        --data_npz=../shared/data/mnist.npz --workdir=runs/against_adversarial_training

Issue 18, section 1. Every row is a `python -m train.main --preset=mnist_cnn`
run (Madry et al.'s CNN at `--cnn_conv_channels`/`--cnn_dense_units`, default
16/32/128) for `--training_epochs` epochs with sigma (the training epsilon)
raised linearly over the ramp's epochs, the same for every row:

- rows (`--experiment_rows`, names `<kind>_<activation>[_eps<epsilon>]`):
  plain; fast FGSM training; PGD-AT (10 steps of 0.25 eps, random start,
  box [0, 1], fixed before any family row is tuned); TRADES (beta chosen on
  validation); the family at p=inf: the exact penalty, the paper's
  closed-form adversarial estimator (no random start), the finite
  difference and an `every` variant, each with relu and the smooth
  activation. Every row is trained at `--threat_epsilon`; the family's rows
  and PGD-AT also at each of `--extra_epsilons`.
- selection: each row's hyperparameters (a small grid per row: the flags
  `--*_sigmas`, `--fgsm_step_sizes`, `--trades_betas`, `--every_values`,
  `--ramp_epochs`) are chosen on the last `--validation_fraction` of the
  training set, never on the test set: the highest validation robust
  accuracy at the row's epsilon under APGD-CE (`--validation_apgd_steps`
  steps, the first `--validation_eval_examples` validation images), among
  the settings whose clean validation error is at most `--error_factor`
  times the plain model's (same activation); the chosen settings are then
  trained on the whole training set.
- final rows: clean test error; the standard suite (APGD-CE, APGD-T, FAB-T,
  Square) on the first `--eval_examples` test images at the training epsilon
  (train.main's report) and on the first `--other_eval_examples` at the
  other radii of `--report_epsilons` (evaluated here on the saved model);
  training wall time (the sum of the epochs' training seconds) with the
  machine's load average before, during and after; the report's flags;
  seeds `--seeds` for the two rows the target compares (`--two_seed_rows`).

Runs go through `experiments.jobs` (as `experiments.reproduce`'s do): one
workdir per run under `--workdir`, finished runs are read and not repeated,
an interrupted run resumes; the evaluations made here are cached in the
run's workdir. `--parallel=N` trains N runs at a time as subprocesses (the wall
times are then not those of a run alone on the machine); `--selection_only`
runs the selection runs, logs each row's choice and adds the selection
records to the results (if there are any), so that they can share the
machine while the final runs, whose wall times the table reports, wait for
it to be free. A row whose selection record the results already hold (same
epsilon) uses its choice and runs no selection (`--reselect` runs it); a
recorded plain row gives later rows their error limit: a later sitting,
even on a machine without the workdir, trains its final run directly. Writes
`<name>.json`, `<name>.md` and `<name>.png` to `--results_dir`
(experiments/README.md documents the JSON) and the table between
`--results_page`'s markers; `--render` writes the Markdown again from the JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags, logging

from experiments import jobs as jobs_lib
from experiments import mnist_table
from keras_gradreg.robustness.report import WORST_CASE, find_row
from train import config as config_lib
from train.recording import error_percent

FLAGS = flags.FLAGS
NAME = "against_adversarial_training"
PAGE_START = "<!-- against-adversarial-training-table:start -->"  # --results_page's markers.
PAGE_END = "<!-- against-adversarial-training-table:end -->"
PRESET = "mnist_cnn"
# train.main's flags this command passes on to every run (the rows set the others).
DATA_FLAGS = ("dataset", "data_npz", "tfds_data_dir", "steps_per_epoch")
EVAL_FLAGS = ("eval_examples", "eval_apgd_steps", "eval_square_queries")
jobs_lib.define_binary_flags(DATA_FLAGS + EVAL_FLAGS, __name__)
jobs_lib.define_common_flags(__name__)

flags.DEFINE_list(
    "experiment_rows", [], "Rows to run (empty: the default set, see default_rows())."
)
flags.DEFINE_integer("training_epochs", 20, "Epochs of every final run.", lower_bound=1)
flags.DEFINE_integer(
    "selection_epochs", 0, "Epochs of every selection run (0: --training_epochs).", lower_bound=0
)
flags.DEFINE_list(
    "ramp_epochs",
    ["5"],
    "Epochs over which sigma rises linearly to its value (train.main's --sigma_warmup_epochs); "
    "several values: a choice on validation for every row.",
)
flags.DEFINE_float("threat_epsilon", 0.3, "L-inf radius every row is trained at.", lower_bound=0)
flags.DEFINE_list(
    "extra_epsilons", ["0.1"], "Radii the family's rows and PGD-AT are also trained at."
)
flags.DEFINE_list(
    "report_epsilons", ["0.1", "0.3", "0.4"], "L-inf radii every row is evaluated at."
)
flags.DEFINE_enum(
    "smooth_activation", "gelu", ["gelu", "softplus"], "The smooth activation of the rows."
)
flags.DEFINE_list("cnn_conv_channels", ["16", "32"], "The CNN's convolution widths.")
flags.DEFINE_integer("cnn_dense_units", 128, "The CNN's dense layer width.", lower_bound=1)
flags.DEFINE_list("fgsm_step_sizes", ["1.0", "1.25"], "Fast FGSM step sizes (relative to sigma).")
flags.DEFINE_list("trades_betas", ["1", "6"], "TRADES betas.")
flags.DEFINE_list("penalty_sigmas", ["0.5", "1", "2"], "Penalty sigmas, as multiples of epsilon.")
flags.DEFINE_list(
    "adversarial_sigmas", ["0.5", "1"], "Closed-form estimator sigmas, multiples of epsilon."
)
flags.DEFINE_list("adversarial_clean_weights", ["0", "0.5"], "Closed-form estimator clean weights.")
flags.DEFINE_list(
    "finite_difference_sigmas", ["0.5", "1", "2"], "Finite-difference sigmas, multiples of epsilon."
)
flags.DEFINE_enum(
    "every_method",
    "penalty",
    ["penalty", "adversarial", "finite_difference"],
    "The member the `every` rows compute every few steps.",
)
flags.DEFINE_list("every_values", ["2", "4"], "`every` values of the every rows.")
flags.DEFINE_list("every_sigmas", ["1", "2"], "Sigmas of the every rows, multiples of epsilon.")
flags.DEFINE_float(
    "validation_fraction", 10_000 / 60_000, "Training set share held out for selection."
)
flags.DEFINE_integer(
    "validation_eval_examples", 500, "Validation images attacked for selection.", lower_bound=1
)
flags.DEFINE_integer("validation_apgd_steps", 20, "APGD-CE steps of selection.", lower_bound=1)
flags.DEFINE_float(
    "error_factor", 2.0, "Admissible clean validation error, in multiples of plain's."
)
flags.DEFINE_integer(
    "other_eval_examples", 250, "Test images attacked at the radii a row was not trained at."
)
flags.DEFINE_list("seeds", ["0", "1"], "Seeds: the first for every row, all for --two_seed_rows.")
flags.DEFINE_list(
    "two_seed_rows",
    ["auto"],
    "Rows trained with every seed of --seeds. auto: PGD-AT (relu) at --threat_epsilon and the "
    "single-step row trained there with the highest validation robust accuracy.",
)
jobs_lib.define_keep_earlier_rows(__name__)
flags.DEFINE_bool(
    "validate_fixed_rows",
    False,
    "Also run a validation run for rows with one setting only (PGD-AT by default).",
)
flags.DEFINE_bool(
    "reselect",
    False,
    "Run the selection of rows whose selection record the results JSON in --results_dir "
    "already holds (same epsilon); by default their recorded choice is used.",
)
flags.DEFINE_float("load_interval", 15.0, "Seconds between load-average samples.", lower_bound=1)
flags.DEFINE_bool(
    "selection_only",
    False,
    "Run the rows' selection runs only (their times are reported apart, so they may share "
    "the machine), log each row's choice and add the selection records to existing results "
    "(their rows are kept); no final run.",
)

LOAD_LOG = "load_samples.jsonl"  # Every sample of every sitting, in the workdir.
EVAL_BATCH_SIZE = 500  # train_lib's EVAL_BATCH_SIZE (the batch size here is 100).


# --------------------------------------------------------------------------- #
# Rows.
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class Kind:
    """A method: the binary's flags it fixes and what it counts as.

    Attributes:
        name: Its name in row names.
        label: How the table names it.
        flags: train.main flags every row of the kind sets.
        family: A member of the family (also trained at --extra_epsilons).
        single_step: Counts as single-step for issue 18's target.
    """

    name: str
    label: str
    flags: dict[str, Any]
    family: bool = False
    single_step: bool = False


BOX = (0.0, 1.0)
KINDS = {
    kind.name: kind
    for kind in (
        Kind("plain", "plain", {"sigma": 0.0}),
        Kind(
            "fgsm",
            "fast FGSM training",
            {"method": "adversarial", "steps": 1, "random_start": True, "clean_weight": 0.0,
             "clip": BOX},
            single_step=True,
        ),
        Kind(
            "pgd",
            "PGD-AT (10 steps of 0.25 eps)",
            {"method": "adversarial", "steps": 10, "step_size": 0.25, "random_start": True,
             "clean_weight": 0.0, "clip": BOX},
        ),
        Kind("trades", "TRADES", {"method": "trades", "steps": 10, "step_size": 0.25, "clip": BOX}),
        Kind("penalty", "penalty (exact)", {"method": "penalty"}, family=True, single_step=True),
        Kind(
            "adversarial",
            "adversarial estimator (closed form)",
            {"method": "adversarial", "steps": 1, "random_start": False},
            family=True,
            single_step=True,
        ),
        Kind(
            "finite_difference",
            "finite difference",
            {"method": "finite_difference"},
            family=True,
            single_step=True,
        ),
        Kind("every", "every", {}, family=True, single_step=True),
    )
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Row:
    """A kind, an activation and the training epsilon (None for plain)."""

    kind: str
    activation: str
    epsilon: float | None = None

    @property
    def name(self) -> str:
        suffix = "" if self.epsilon is None else f"_eps{self.epsilon:g}"
        return f"{self.kind}_{self.activation}{suffix}"


_ROW_NAME = re.compile(
    rf"^({'|'.join(sorted(KINDS, key=len, reverse=True))})_([a-z0-9]+)(?:_eps([0-9.]+))?$"
)


def parse_row(name: str) -> Row:
    """The row of a name such as `penalty_gelu_eps0.3` or `plain_relu`."""
    match = _ROW_NAME.match(name)
    if not match or (match.group(1) == "plain") != (match.group(3) is None):
        raise ValueError(
            "A row name is <kind>_<activation>_eps<epsilon> (plain: plain_<activation>), kind "
            f"one of {tuple(KINDS)}. Received: {name!r}"
        )
    epsilon = None if match.group(3) is None else float(match.group(3))
    return Row(match.group(1), match.group(2), epsilon)


def default_rows(threat: float, extra: Sequence[float], smooth: str) -> list[Row]:
    """Plain (both activations); FGSM, PGD-AT and TRADES with relu at `threat`; PGD-AT (relu)
    and the family (both activations) at every `extra` epsilon too."""
    rows = [Row("plain", "relu"), Row("plain", smooth)]
    for epsilon in (threat, *extra):
        baselines = ("fgsm", "pgd", "trades") if epsilon == threat else ("pgd",)
        rows += [Row(kind, "relu", epsilon) for kind in baselines]
        rows += [
            Row(kind, activation, epsilon)
            for kind in ("penalty", "adversarial", "finite_difference", "every")
            for activation in ("relu", smooth)
        ]
    return rows


@dataclasses.dataclass(frozen=True)
class Grids:
    """The settings each row chooses between (sigmas as multiples of the row's epsilon)."""

    ramp_epochs: tuple[int, ...] = (5,)
    fgsm_step_sizes: tuple[float, ...] = (1.0, 1.25)
    trades_betas: tuple[float, ...] = (1.0, 6.0)
    penalty_sigmas: tuple[float, ...] = (0.5, 1.0, 2.0)
    adversarial_sigmas: tuple[float, ...] = (0.5, 1.0)
    adversarial_clean_weights: tuple[float, ...] = (0.0, 0.5)
    finite_difference_sigmas: tuple[float, ...] = (0.5, 1.0, 2.0)
    every_method: str = "penalty"
    every_values: tuple[int, ...] = (2, 4)
    every_sigmas: tuple[float, ...] = (1.0, 2.0)


def candidates(row: Row, grids: Grids) -> list[dict[str, Any]]:
    """The row's settings to choose between: train.main flags, in grid order."""
    if row.kind == "plain":
        return [{}]
    eps = row.epsilon

    def sigmas(multiples):
        return [{"sigma": round(m * eps, 10)} for m in multiples]

    grid = {
        "fgsm": [{"sigma": eps, "step_size": s} for s in grids.fgsm_step_sizes],
        "pgd": [{"sigma": eps}],
        "trades": [{"sigma": eps, "beta": b} for b in grids.trades_betas],
        "penalty": sigmas(grids.penalty_sigmas),
        "adversarial": [
            {**s, "clean_weight": w}
            for s in sigmas(grids.adversarial_sigmas)
            for w in grids.adversarial_clean_weights
        ],
        "finite_difference": sigmas(grids.finite_difference_sigmas),
        "every": [
            {"method": grids.every_method, "every": e, **s}
            for e in grids.every_values
            for s in sigmas(grids.every_sigmas)
        ],
    }[row.kind]
    return [{**c, "sigma_warmup_epochs": r} for r in grids.ramp_epochs for c in grid]


_SHORT = {"sigma_warmup_epochs": "ramp", "step_size": "step", "clean_weight": "cw"}


def slug(candidate: dict[str, Any]) -> str:
    """A directory name for a setting, e.g. `sigma0.15_ramp5` (`default` for none)."""
    parts = [f"{_SHORT.get(k, k)}{_format(v)}" for k, v in candidate.items()]
    return "_".join(parts) or "default"


def describe(candidate: dict[str, Any]) -> str:
    """A setting for the table, e.g. `sigma=0.15, ramp=5`."""
    return ", ".join(f"{_SHORT.get(k, k)}={_format(v)}" for k, v in candidate.items()) or "-"


def _format(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------- #
# Runs.
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the runs depend on (from the flags)."""

    conv_channels: tuple[int, ...] = (16, 32)
    dense_units: int = 128
    epochs: int = 20
    selection_epochs: int = 20
    threat_epsilon: float = 0.3
    extra_epsilons: tuple[float, ...] = (0.1,)
    report_epsilons: tuple[float, ...] = (0.1, 0.3, 0.4)
    smooth_activation: str = "gelu"
    validation_fraction: float = 10_000 / 60_000
    validation_examples: int = 500
    validation_apgd_steps: int = 20
    error_factor: float = 2.0
    primary_examples: int = 1000
    other_examples: int = 250
    seeds: tuple[int, ...] = (0, 1)
    grids: Grids = Grids()
    validate_fixed_rows: bool = False
    data: tuple[tuple[str, Any], ...] = ()  # train.main data flags, passed on.
    evaluation: tuple[tuple[str, Any], ...] = ()  # train.main eval_apgd_steps, ...

    @property
    def training_epsilons(self) -> tuple[float, ...]:
        return (self.threat_epsilon, *self.extra_epsilons)


def row_flags(row: Row, settings: Settings) -> dict[str, Any]:
    """The train.main flags of a row before its chosen settings."""
    return {
        **dict(settings.data),
        "conv_channels": settings.conv_channels,
        "dense_units": settings.dense_units,
        "activation": row.activation,
        "p": math.inf,
        **KINDS[row.kind].flags,
    }


def selection_job(row: Row, candidate: dict[str, Any], settings: Settings) -> jobs_lib.Job:
    """One validation run: the training set without its last share, no test-set report."""
    overrides = {
        **row_flags(row, settings),
        **candidate,
        "validation_split": settings.validation_fraction,
        "epochs": settings.selection_epochs,
        "seed": settings.seeds[0],
        "eval_suite": "none",
        "eval_examples": 0,
        "pictures": False,
    }
    return jobs_lib.Job(f"select/{row.name}/{slug(candidate)}", PRESET, overrides)


def primary_epsilons(row: Row, settings: Settings) -> tuple[float, ...]:
    """Radii train.main's report covers (on --eval_examples images): the training epsilon
    (plain: every training epsilon)."""
    return (row.epsilon,) if row.epsilon is not None else tuple(sorted(settings.training_epsilons))


def other_epsilons(row: Row, settings: Settings) -> tuple[float, ...]:
    """The other radii of --report_epsilons (on --other_eval_examples images)."""
    primary = primary_epsilons(row, settings)
    return tuple(
        e for e in settings.report_epsilons if not any(math.isclose(e, p) for p in primary)
    )


def final_job(row: Row, candidate: dict[str, Any], seed: int, settings: Settings) -> jobs_lib.Job:
    """The run on the whole training set, with train.main's standard-suite report."""
    overrides = {
        **row_flags(row, settings),
        **candidate,
        "epochs": settings.epochs,
        "seed": seed,
        "eval_suite": "standard",
        "eval_examples": settings.primary_examples,
        "eval_epsilons_inf": primary_epsilons(row, settings),
        "eval_epsilons_2": (),
        **dict(settings.evaluation),
        "pictures": False,
    }
    return jobs_lib.Job(f"final/{row.name}/{slug(candidate)}_seed{seed}", PRESET, overrides)


def needs_selection(row: Row, settings: Settings) -> bool:
    """Whether the row has validation runs (several settings, or plain, or asked for)."""
    return (
        row.kind == "plain"
        or len(candidates(row, settings.grids)) > 1
        or settings.validate_fixed_rows
    )


def selection_epsilon(row: Row, settings: Settings) -> float:
    """The radius a row's validation robust accuracy is measured at."""
    return settings.threat_epsilon if row.epsilon is None else row.epsilon


# --------------------------------------------------------------------------- #
# Selection.
# --------------------------------------------------------------------------- #


SELECTION_RULE = (
    "the highest validation robust accuracy (APGD-CE) among settings with clean validation "
    "error <= error_factor x the plain model's (same activation); ties: the lower error, then "
    "the earlier setting; if none qualifies, the lowest validation error (marked)"
)


def choose(
    entries: Sequence[dict[str, Any]], reference_error: float, factor: float
) -> dict[str, Any]:
    """Applies the selection rule to validation results.

    Args:
        entries: One dict per setting, in grid order, with
            "validation_error_percent" and "validation_robust_percent".
        reference_error: The plain model's validation error (%).
        factor: The admissible error, in multiples of `reference_error`.

    Returns:
        {"index": the chosen entry's position, "admissible": whether it met the
        error limit, "error_limit_percent": the limit}.
    """
    limit = factor * reference_error
    indexed = list(enumerate(entries))
    admissible = [(i, e) for i, e in indexed if e["validation_error_percent"] <= limit]
    if admissible:
        index = max(
            admissible,
            key=lambda ie: (
                ie[1]["validation_robust_percent"],
                -ie[1]["validation_error_percent"],
                -ie[0],
            ),
        )[0]
    else:
        index = min(indexed, key=lambda ie: (ie[1]["validation_error_percent"], ie[0]))[0]
    return {"index": index, "admissible": bool(admissible), "error_limit_percent": limit}


def train_seconds(metrics: dict[str, Any]) -> float:
    """Training wall time of a run: its epochs' training seconds (no per-epoch evaluation)."""
    return float(sum(record["train_seconds"] for record in metrics["epochs"]))


def selection_entries(
    row: Row,
    settings: Settings,
    results: dict[str, dict[str, Any]],
    validation_robust: Callable[[str, float, int], float],
) -> list[dict[str, Any]]:
    """The validation results of a row's settings.

    `validation_robust(workdir, epsilon, seed)` is the robust accuracy (%) of
    the run's last model on the validation images.
    """
    epsilon = selection_epsilon(row, settings)
    entries = []
    for candidate in candidates(row, settings.grids):
        job = selection_job(row, candidate, settings)
        result = results[job.name]
        metrics = result["metrics"]
        last = metrics["epochs"][-1]
        entries.append(
            {
                "setting": candidate,
                "validation_error_percent": error_percent(last["validation/accuracy"]),
                "validation_robust_percent": validation_robust(
                    result["workdir"], epsilon, settings.seeds[0]
                ),
                "train_seconds": train_seconds(metrics),
                "command": result["command"],
            }
        )
    return entries


def selection_summary(
    row: Row, entries: list[dict[str, Any]], reference: dict[str, Any] | None, settings: Settings
) -> dict[str, Any]:
    """A row's selection record: its entries, the rule and the choice."""
    summary = {
        "row": row.name,
        "epsilon": selection_epsilon(row, settings),
        "epochs": settings.selection_epochs,
        "entries": entries,
    }
    if reference is None:  # The plain rows: nothing to choose.
        summary.update(chosen=0, admissible=True, error_limit_percent=None)
        return summary
    plain_error = reference["entries"][0]["validation_error_percent"]
    choice = choose(entries, plain_error, settings.error_factor)
    summary.update(
        plain_row=reference["row"],
        chosen=choice["index"],
        admissible=choice["admissible"],
        error_limit_percent=choice["error_limit_percent"],
    )
    return summary


def selection_line(record: dict[str, Any]) -> str:
    """One line on a row's selection: each setting's validation figures and the choice."""
    settings = "; ".join(
        f"{describe(entry['setting'])}: error {entry['validation_error_percent']:.2f}%, "
        f"robust {entry['validation_robust_percent']:.1f}%"
        for entry in record["entries"]
    )
    chosen = describe(record["entries"][record["chosen"]]["setting"])
    admissible = "" if record["admissible"] else " (none admissible)"
    return f"{record['row']} at {record['epsilon']:g}: {settings}; chosen: {chosen}{admissible}"


# --------------------------------------------------------------------------- #
# Evaluation of saved models (TensorFlow imported on first use).
# --------------------------------------------------------------------------- #


def cached_report(
    workdir: str,
    filename: str,
    settings: dict[str, Any],
    compute: Callable[[], dict[str, Any]],
) -> dict[str, Any]:
    """`compute()` (a report's dict), stored in `workdir/filename` with its settings and
    read from there while the settings are the same."""
    path = os.path.join(workdir, filename)
    if os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
        if stored.get("settings") == settings:
            return stored["report"]
    report = compute()
    with open(path + ".tmp", "w") as f:
        json.dump({"settings": settings, "report": report}, f, indent=2)
    os.replace(path + ".tmp", path)
    return report


def evaluate_saved(
    workdir: str,
    images: Any,
    labels: Any,
    epsilons: Sequence[float],
    seed: int,
    attacks: tuple[str, ...] | None,
    apgd_steps: int,
    square_queries: int,
) -> dict[str, Any]:
    """`kgr.evaluate_robustness` of the run's last model, as a report dict."""
    import keras
    import numpy as np

    import keras_gradreg as kgr

    model = keras.models.load_model(os.path.join(workdir, "checkpoints", "last.keras"))
    report = kgr.evaluate_robustness(
        model,
        (images.astype(np.float32) / 255.0, labels),
        epsilons={math.inf: list(epsilons)},
        attacks=attacks,
        suite="standard",
        apgd_steps=apgd_steps,
        square_queries=square_queries,
        batch_size=EVAL_BATCH_SIZE,
        seed=seed,
        verbose=0,
    )
    return report.to_dict()


def worst_case(report: dict[str, Any] | None, epsilon: float) -> float | None:
    """The robust accuracy (%) of a report's dict at L-inf `epsilon`, or None."""
    row = find_row((report or {}).get("rows", []), WORST_CASE, math.inf, epsilon)
    return None if row is None else 100.0 * row["accuracy"]


# --------------------------------------------------------------------------- #
# Wall time and load.
# --------------------------------------------------------------------------- #


class LoadSampler:
    """Samples the 1-minute load average every `interval` seconds in a daemon thread.

    With `log_path`, every sample is also appended to that file (one JSON
    line each), so a run's sittings keep their samples when the process that
    took them has stopped before it closed them.
    """

    def __init__(self, interval: float, log_path: str | None = None):
        self.interval = interval
        self.log_path = log_path
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> LoadSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            sample = (time.time(), os.getloadavg()[0])
            self.samples.append(sample)
            if self.log_path is not None:
                with open(self.log_path, "a") as f:
                    f.write(json.dumps(sample) + "\n")
            self._stop.wait(self.interval)

    def between(self, start: float, end: float) -> list[float]:
        """Loads sampled from `start` to `end`: the log's (any process's), else this one's."""
        samples = list(self.samples)
        if self.log_path is not None and os.path.exists(self.log_path):
            with open(self.log_path) as f:
                samples = [_sample(line) for line in f]
        return [load for t, load in filter(None, samples) if start <= t <= end]


def _sample(line: str) -> tuple[float, float] | None:
    """A logged (time, load), or None for a line cut short (a write that was stopped)."""
    if not line.endswith("\n"):
        return None
    try:
        t, load = json.loads(line)
    except ValueError:
        return None
    return float(t), float(load)


def _timing_path(root: str, name: str) -> str:
    return os.path.join(root, f"{name}.timing.json")


def _read_json(path: str, default: Any) -> Any:
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def record_start(root: str, name: str, sampler: LoadSampler | None = None) -> None:
    """Notes a sitting of a run that has not finished: its start and the load before it.

    A sitting left open by a command stopped in the middle of the run is
    closed first, as `record_end` would (its end: when the run last wrote
    its metrics, after its last finished epoch).
    """
    metrics = _read_json(os.path.join(root, name, jobs_lib.METRICS_FILE), {})
    if metrics.get("status") == "done":
        return
    if sampler is not None:
        record_end(root, name, sampler)
    path = _timing_path(root, name)
    timing = _read_json(path, {"sittings": []})
    timing["sittings"].append({"start": time.time(), "load_before": list(os.getloadavg())})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(timing, f, indent=2)


def record_end(root: str, name: str, sampler: LoadSampler) -> None:
    """Closes the run's open sitting: its end, the load after it and the samples during it.

    A finished run's sitting ends when its metrics were written "done" (the
    file's modification time), not when this is called: a command stopped
    between a run's end and this call closes the sitting on its next call
    with the times of the run itself. An unfinished run's sitting (closed by
    `record_start` of the next sitting) ends when its metrics were last
    written.
    """
    path = _timing_path(root, name)
    timing = _read_json(path, {"sittings": []})
    if not timing["sittings"] or "end" in timing["sittings"][-1]:
        return
    sitting = timing["sittings"][-1]
    now = time.time()
    metrics_path = os.path.join(root, name, jobs_lib.METRICS_FILE)
    written = os.path.getmtime(metrics_path) if os.path.exists(metrics_path) else None
    done = _read_json(metrics_path, {}).get("status") == "done"
    if written is not None and sitting["start"] <= written <= now:
        end = written
    else:  # Nothing written in this sitting: a finished run's end is now, a stopped one's
        end = now if done else sitting["start"]  # start (it finished no epoch).
    sitting.update(end=end, load_samples=sampler.between(sitting["start"], end))
    if now - end <= 2 * sampler.interval:
        sitting["load_after"] = list(os.getloadavg())
    else:  # Closed late: a sample logged just after the end, if there is one.
        later = sampler.between(end, end + 2 * sampler.interval)
        if later:
            sitting["load_after"] = later[:1]
    with open(path, "w") as f:
        json.dump(timing, f, indent=2)


def load_summary(root: str, name: str) -> dict[str, Any]:
    """The load average around a run's sittings (1-minute averages; samples every few s)."""
    sittings = _read_json(_timing_path(root, name), {"sittings": []})["sittings"]
    samples = [s for sitting in sittings for s in sitting.get("load_samples", [])]
    return {
        "sittings": len(sittings),
        "before": [s["load_before"][0] for s in sittings],
        "after": [s["load_after"][0] for s in sittings if "load_after" in s],
        "during_mean": sum(samples) / len(samples) if samples else None,
        "during_max": max(samples) if samples else None,
        "samples": len(samples),
    }


# --------------------------------------------------------------------------- #
# The plan.
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class Plan:
    """The tasks of an experiment and what they produce, filled in as they run."""

    rows: list[Row]
    settings: Settings
    two_seed_rows: tuple[str, ...] | None  # None: auto.
    root: str
    sampler: LoadSampler | None = None
    validation_robust: Callable[[str, float, int], float] | None = None
    finals: dict[str, tuple[Row, dict[str, Any], int]] = dataclasses.field(default_factory=dict)
    job_names: dict[str, str] = dataclasses.field(default_factory=dict)
    selection_only: bool = False  # The selection runs' tasks only.
    # Row name -> selection record read from earlier results (`recorded_selections`).
    recorded: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def selection_rows(self) -> list[Row]:
        """Rows with validation runs to run (or read from the workdir), and the plain rows
        their error limits need; rows with a recorded selection have none."""
        chosen = [
            row
            for row in self.rows
            if needs_selection(row, self.settings) and row.name not in self.recorded
        ]
        plains = {Row("plain", row.activation) for row in chosen} - {
            row for row in map(parse_row, self.recorded) if row.kind == "plain"
        }
        extra = [row for row in sorted(plains, key=lambda r: r.name) if row not in chosen]
        return extra + chosen

    def auto_candidates(self) -> list[Row]:
        """Single-step rows at the threat epsilon that auto may give a second seed."""
        return [
            row
            for row in self.rows
            if KINDS[row.kind].single_step
            and row.epsilon == self.settings.threat_epsilon
            and needs_selection(row, self.settings)
        ]

    def summarize(self, row: Row) -> Callable[[dict[str, Any]], dict[str, Any]]:
        def run(results):
            return {
                "row": row.name,
                "entries": selection_entries(row, self.settings, results, self.validation_robust),
            }

        return run

    def selection(self, row: Row, summaries: dict[str, Any]) -> dict[str, Any] | None:
        """The selection record of a row (None without validation runs)."""
        if row.name in self.recorded:
            return self.recorded[row.name]
        key = f"select/{row.name}"
        if key not in summaries:
            return None
        plain = Row("plain", row.activation).name
        reference = (
            None if row.kind == "plain"
            else self.recorded.get(plain) or summaries[f"select/{plain}"]
        )  # fmt: skip
        return selection_summary(row, summaries[key]["entries"], reference, self.settings)

    def chosen(self, row: Row, summaries: dict[str, Any]) -> dict[str, Any]:
        record = self.selection(row, summaries)
        return candidates(row, self.settings.grids)[0 if record is None else record["chosen"]]

    def _needs(self, row: Row) -> tuple[str, ...]:
        if not needs_selection(row, self.settings) or row.name in self.recorded:
            return ()
        names = dict.fromkeys([row.name, Row("plain", row.activation).name])
        return tuple(f"select/{name}" for name in names if name not in self.recorded)

    def _final_task(self, stage: str, needs: tuple[str, ...], pick: Callable) -> jobs_lib.Task:
        """A final run; its own stage closes its timing when it has finished."""

        def make(summaries):
            row, seed = pick(summaries)
            candidate = self.chosen(row, summaries)
            job = final_job(row, candidate, seed, self.settings)
            self.finals[stage] = (row, candidate, seed)
            self.job_names[stage] = job.name
            record_start(self.root, job.name, self.sampler)
            return job

        return jobs_lib.Task(make, needs=needs, stage=stage)

    def tasks(self) -> tuple[list[jobs_lib.Task], dict[str, Callable]]:
        """Selection runs first (plain first), then the final runs, in row order."""
        tasks, summarize = [], {}
        for row in self.selection_rows():
            key = f"select/{row.name}"
            summarize[key] = self.summarize(row)
            for candidate in candidates(row, self.settings.grids):
                job = selection_job(row, candidate, self.settings)
                tasks.append(jobs_lib.Task(lambda _, job=job: job, stage=key))
        if self.selection_only:
            return tasks, summarize
        seeds = self.settings.seeds
        explicit = self.two_seed_rows or ()
        auto_rows = self.auto_candidates()
        for row in self.rows:
            for seed in seeds if row.name in explicit else seeds[:1]:
                stage = f"final/{row.name}/seed{seed}"
                tasks.append(
                    self._final_task(stage, self._needs(row), lambda _, r=row, s=seed: (r, s))
                )
        if self.two_seed_rows is None:
            pgd = Row("pgd", "relu", self.settings.threat_epsilon)
            for seed in seeds[1:] if pgd in self.rows else ():
                stage = f"final/{pgd.name}/seed{seed}"
                tasks.append(self._final_task(stage, self._needs(pgd), lambda _, s=seed: (pgd, s)))
            needs = tuple(dict.fromkeys(n for row in auto_rows for n in self._needs(row)))
            for seed in seeds[1:] if auto_rows else ():
                stage = f"final/auto_single_step/seed{seed}"
                pick = lambda summaries, s=seed: (self.best_single_step(summaries), s)  # noqa: E731
                tasks.append(self._final_task(stage, needs, pick))
        for task in tasks:
            if task.stage and task.stage.startswith("final/"):
                summarize[task.stage] = self._closer(task.stage)
        return tasks, summarize

    def _closer(self, stage: str) -> Callable[[dict[str, Any]], str]:
        def close(_results):
            name = self.job_names[stage]
            if self.sampler is not None:
                record_end(self.root, name, self.sampler)
            return name

        return close

    def best_single_step(self, summaries: dict[str, Any]) -> Row:
        """The single-step row at the threat epsilon whose chosen setting has the highest
        validation robust accuracy (ties: the earlier row)."""
        scored = []
        for index, row in enumerate(self.auto_candidates()):
            record = self.selection(row, summaries)
            entry = record["entries"][record["chosen"]]
            scored.append((entry["validation_robust_percent"], -index, row))
        return max(scored, key=lambda s: s[:2])[2]


# --------------------------------------------------------------------------- #
# Results.
# --------------------------------------------------------------------------- #


def row_record(
    row: Row,
    candidate: dict[str, Any],
    seed: int,
    result: dict[str, Any],
    other_report: dict[str, Any] | None,
    settings: Settings,
    load: dict[str, Any],
    hardware: str,
) -> dict[str, Any]:
    """The JSON record of one final run, trained on `hardware` (`jobs_lib.hardware()`)."""
    metrics = result["metrics"]
    primary = metrics.get("robustness")
    robust, examples = {}, {}
    for epsilon in settings.report_epsilons:
        for report in (primary, other_report):
            value = worst_case(report, epsilon)
            if value is not None:
                robust[f"{epsilon:g}"] = value
                examples[f"{epsilon:g}"] = report["num_examples"]
                break
    kind = KINDS[row.kind]
    return {
        "name": row.name,
        "kind": row.kind,
        "label": kind.label if row.kind != "every" else f"{candidate['method']}, every",
        "activation": row.activation,
        "train_epsilon": row.epsilon,
        "family": kind.family,
        "single_step": kind.single_step,
        "seed": seed,
        "setting": candidate,
        "epochs": len(metrics["epochs"]),
        "test_error_percent": metrics["final"]["test/error_percent"],
        "robust_percent": robust,
        "robust_examples": examples,
        "train_seconds": train_seconds(metrics),
        "seconds_with_epoch_evaluations": float(sum(r["seconds"] for r in metrics["epochs"])),
        "load_average": load,
        "hardware": hardware,
        "flags": {
            **{
                f"{k} (training epsilon)": v
                for k, v in ((primary or {}).get("flags") or {}).items()
            },
            **{
                f"{k} (other radii)": v
                for k, v in ((other_report or {}).get("flags") or {}).items()
            },
        },
        "command": result["command"],
        "workdir": result["workdir"],
    }


def add_time_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's training time over the plain row's (same activation, first seed)."""
    plain = {
        r["activation"]: r["train_seconds"]
        for r in rows
        if r["kind"] == "plain" and r["seed"] == min(x["seed"] for x in rows)
    }
    for record in rows:
        base = plain.get(record["activation"])
        record["time_vs_plain"] = record["train_seconds"] / base if base else None


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


Z_95 = 1.959963984540054  # The standard normal's 97.5% quantile.


def wilson_interval(correct: int, count: int, z: float = Z_95) -> tuple[float, float]:
    """The 95% Wilson score interval (in %) of an accuracy of `correct` of `count` images.

    It covers the sampling of the images attacked, not what a seed changes.
    """
    share, n = correct / count, count
    center = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100 * (center - half), 100 * (center + half)


def images_interval(runs: list[dict[str, Any]], key: str) -> list[float] | None:
    """`wilson_interval` of the runs' mean robust accuracy at `key` over the images one run
    attacks (the seeds attack the same images: their outcomes are not independent draws)."""
    counts = {r["robust_examples"].get(key) for r in runs}
    values = [r["robust_percent"].get(key) for r in runs]
    if not runs or None in counts or len(counts) > 1 or None in values:
        return None
    (count,) = counts
    return list(wilson_interval(round(_mean(values) * count / 100), count))


def time_versus(rows: list[dict[str, Any]], name: str, reference: str) -> float | None:
    """Row `name`'s training time over row `reference`'s: their times over the plain row
    of their own sitting (`time_vs_plain`, means over seeds), divided.

    Not wall times: rows trained in other sittings may come from other machines,
    which /proc/cpuinfo's model name does not tell apart (the closed-form
    estimator at 0.1 took 934 s on one "AMD EPYC" and 519 s on another). None if
    a run's sitting had no plain row of its activation. A gelu row's ratio is
    over plain gelu, PGD-AT's over plain relu.
    """
    runs = [r.get("time_vs_plain") for r in rows if r["name"] == name]
    references = [r.get("time_vs_plain") for r in rows if r["name"] == reference]
    if not runs or not references or None in runs + references:
        return None
    return _mean(runs) / _mean(references)


def targets(rows: list[dict[str, Any]], margin: float = 3.0, time_share: float = 1 / 3) -> list:
    """Issue 18's targets per training epsilon, from the rows (means over seeds).

    PGD-AT's robust accuracy at its training epsilon, and the single-step row
    with the highest robust accuracy among those trained in at most
    `time_share` of PGD-AT's time (`time_versus`: over each row's plain row; or,
    if none, the fastest one). Rows without a time ratio are not scored.
    """
    found = []
    for epsilon in sorted({r["train_epsilon"] for r in rows if r["kind"] == "pgd"}, reverse=True):
        key = f"{epsilon:g}"

        def mean_of(name, field, key=key):
            runs = [r for r in rows if r["name"] == name]
            values = [r[field].get(key) if field == "robust_percent" else r[field] for r in runs]
            return None if any(v is None for v in values) else _mean(values)

        pgd_name = next(
            r["name"] for r in rows if r["kind"] == "pgd" and r["train_epsilon"] == epsilon
        )
        pgd_robust = mean_of(pgd_name, "robust_percent")
        pgd_time = mean_of(pgd_name, "train_seconds")
        single = sorted(
            {r["name"] for r in rows if r["single_step"] and r["train_epsilon"] == epsilon}
        )
        scored = [
            (name, mean_of(name, "robust_percent"), time_versus(rows, name, pgd_name))
            for name in single
        ]
        scored = [s for s in scored if s[1] is not None and s[2] is not None]
        fast = [s for s in scored if s[2] <= time_share]
        best = (
            max(fast, key=lambda s: s[1]) if fast else min(scored, key=lambda s: s[2], default=None)
        )

        def interval_of(name, key=key):
            return images_interval([r for r in rows if r["name"] == name], key)

        entry = {
            "epsilon": epsilon,
            "pgd_row": pgd_name,
            "pgd_robust_percent": pgd_robust,
            "pgd_robust_ci95": interval_of(pgd_name),
            "pgd_train_seconds": pgd_time,
            "pgd_time_vs_plain": mean_of(pgd_name, "time_vs_plain"),
            "best_single_step": None,
        }
        if best is not None and pgd_robust is not None:
            entry["best_single_step"] = {
                "row": best[0],
                "robust_percent": best[1],
                "robust_ci95": interval_of(best[0]),
                "time_vs_pgd": best[2],
                "points_below_pgd": pgd_robust - best[1],
                "met": bool(fast) and pgd_robust - best[1] <= margin,
            }
        found.append(entry)
    return found


def _cell(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _interval(bounds: Sequence[float] | None) -> str:
    return "" if bounds is None else f" ({bounds[0]:.1f}-{bounds[1]:.1f})"


def hardware_text(results: dict[str, Any]) -> str:
    """The hardware the rows were trained on: one machine, or each with its rows."""
    rows_on: dict[str, list[str]] = {}
    for r in results["rows"]:
        rows_on.setdefault(r.get("hardware") or "not recorded", []).append(r["name"])
    if not rows_on or set(rows_on) == {"not recorded"}:  # Results written before rows had it.
        return results["hardware"]
    if len(rows_on) == 1:
        return next(iter(rows_on))
    return "; ".join(
        f"{machine} ({', '.join(dict.fromkeys(names))})" for machine, names in rows_on.items()
    )


def markdown(results: dict[str, Any]) -> str:
    """The results as Markdown: settings, the table, the targets and the selections."""
    s = results["settings"]
    radii = [f"{e:g}" for e in s["report_epsilons"]]
    lines = [
        f"MNIST-shaped data ({s['data']}), the CNN {'/'.join(map(str, s['conv_channels']))}/"
        f"{s['dense_units']} (epochs: {s['epochs']}; sigma ramped linearly over "
        f"{' or '.join(map(str, s['ramp_epochs']))} epochs), hardware: "
        f"{hardware_text(results)}.",
        f"Robust accuracy (%): the standard suite (APGD-CE, APGD-T, FAB-T, Square), the "
        f"worst case per image, on the first {s['primary_examples']} test images at the "
        f"training epsilon (plain: at every training epsilon) and the first "
        f"{s['other_examples']} at the other radii (image counts in parentheses). Settings "
        f"chosen on validation: {results['selection_rule']}. Training time: the wall time of "
        "the run's training epochs on its machine; load: the 1-minute load average during "
        f"the run ({results['cpu_count']} cores).",
        "",
        "| row | trained at | setting | seed | test error % | "
        + " | ".join(f"robust % at {r}" for r in radii)
        + " | training time | x plain | load | flags |",
        "| --- | --- | --- | --- | --- | "
        + " | ".join("---" for _ in radii)
        + " | --- | --- | --- | --- |",
    ]
    for r in results["rows"]:
        robust = [
            "-"
            if r["robust_percent"].get(e) is None
            else f"{r['robust_percent'][e]:.1f} ({r['robust_examples'][e]})"
            for e in radii
        ]
        load = r["load_average"]
        load_text = (
            "-" if load.get("during_mean") is None
            else f"{load['during_mean']:.1f} (max {load['during_max']:.1f})"
        )  # fmt: skip
        ratio = "-" if r.get("time_vs_plain") is None else f"{r['time_vs_plain']:.1f}x"
        lines.append(
            f"| {r['label']}, {r['activation']} | "
            + ("-" if r["train_epsilon"] is None else f"{r['train_epsilon']:g}")
            + f" | {describe(r['setting'])} | {r['seed']} | {r['test_error_percent']:.2f} | "
            + " | ".join(robust)
            + f" | {r['train_seconds'] / 60:.1f} min | {ratio} | {load_text} | "
            + (", ".join(sorted(r["flags"])) or "none")
            + " |"
        )
    lines += [
        "",
        "Targets (issue 18; means over seeds; in parentheses the 95% Wilson interval over the "
        "test images attacked, which does not cover seed-to-seed variation):",
        "",
    ]
    if not results["targets"]:
        lines.append("- No PGD-AT row: nothing to compare with.")
    for t in results["targets"]:
        best = t["best_single_step"]
        text = f"- L-inf {t['epsilon']:g}: PGD-AT {_cell(t['pgd_robust_percent'])}%" + _interval(
            t.get("pgd_robust_ci95")
        )
        if best is None:
            text += "; no single-step row."
        else:
            text += (
                f"; best single-step row within 1/3 of its time: {best['row']}, "
                f"{best['robust_percent']:.1f}%{_interval(best.get('robust_ci95'))} at "
                f"{best['time_vs_pgd']:.2f}x PGD-AT's time (each over its sitting's plain row), "
                f"{best['points_below_pgd']:.1f} points below: "
                + ("met." if best["met"] else "not met.")
            )
        lines.append(text)
    lines += ["", "Selection runs (validation; not part of the final rows' times):", ""]
    lines += [
        "| row | at | setting | validation error % | validation robust % | training time "
        "| chosen |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, record in results["selections"].items():
        for index, entry in enumerate(record["entries"]):
            mark = ""
            if index == record["chosen"]:
                mark = "yes" if record["admissible"] else "yes (none within the error limit)"
            lines.append(
                f"| {name} | {record['epsilon']:g} | {describe(entry['setting'])} | "
                f"{entry['validation_error_percent']:.2f} | "
                f"{entry['validation_robust_percent']:.1f} | "
                f"{entry['train_seconds'] / 60:.1f} min | {mark} |"
            )
    return "\n".join(lines) + "\n"


MARKERS = {
    "plain": "o", "fgsm": "v", "pgd": "s", "trades": "D", "penalty": "*",
    "adversarial": "^", "finite_difference": "P", "every": "X",
}  # fmt: skip


def plot(results: dict[str, Any], path: str) -> None:
    """Robust accuracy against training time, one panel per training epsilon."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epsilons = sorted({r["train_epsilon"] for r in results["rows"]} - {None}, reverse=True)
    figure, axes = plt.subplots(1, max(len(epsilons), 1), figsize=(8 * max(len(epsilons), 1), 4.5))
    axes = list(getattr(axes, "flat", [axes]))
    colors = {}
    for axis, epsilon in zip(axes, epsilons):
        key = f"{epsilon:g}"
        labelled = set()
        for r in results["rows"]:
            if (
                r["train_epsilon"] not in (None, epsilon)
                or r["robust_percent"].get(key) is None
                or r.get("time_vs_plain") is None
            ):
                continue
            color = colors.setdefault(r["activation"], f"C{len(colors)}")
            label = f"{KINDS[r['kind']].label}, {r['activation']}"
            axis.scatter(
                r["time_vs_plain"], r["robust_percent"][key], marker=MARKERS[r["kind"]],
                color=color, s=60, alpha=0.8, label=None if label in labelled else label,
            )  # fmt: skip
            labelled.add(label)
        for t in results["targets"]:
            if (
                t["epsilon"] == epsilon
                and t.get("pgd_time_vs_plain")
                and t["pgd_robust_percent"] is not None
            ):
                axis.axvline(t["pgd_time_vs_plain"] / 3, color="grey", linestyle=":")
                axis.axhline(t["pgd_robust_percent"] - 3, color="grey", linestyle=":")
        axis.set_xscale("log")
        axis.set_xlabel("training time over its sitting's plain row (x plain, log scale)")
        axis.set_ylabel(f"robust accuracy at L-inf {key} (%)")
        axis.set_title(f"trained and attacked at L-inf {key}")
        axis.set_ylim(-2, 102)
        axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    if results["targets"]:
        figure.suptitle("Dotted: 1/3 of PGD-AT's time and 3 points below its robust accuracy")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_results(results: dict[str, Any], directory: str, page: str = "") -> dict[str, str]:
    """<NAME>.json and .png in `directory`, and `write_markdown`'s files; returns their paths."""
    os.makedirs(directory, exist_ok=True)
    paths = {ext: os.path.join(directory, f"{NAME}.{ext}") for ext in ("json", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=2)
    write_markdown(results, directory, page)
    plot(results, paths["png"])
    return paths


def write_markdown(results: dict[str, Any], directory: str, page: str = "") -> str:
    """Writes <NAME>.md in `directory` and the text between `page`'s markers ('': no
    page); returns the text."""
    text = markdown(results)
    with open(os.path.join(directory, f"{NAME}.md"), "w") as f:
        f.write(text)
    if page:
        mnist_table.update_readme(page, text, PAGE_START, PAGE_END)
    return text


# --------------------------------------------------------------------------- #
# The command.
# --------------------------------------------------------------------------- #


def _numbers(values: Sequence[str], flag: str, convert: Callable = float) -> tuple:
    try:
        return tuple(convert(v) for v in values)
    except ValueError:
        raise app.UsageError(f"--{flag} must be a list of numbers. Received: {values}") from None


def settings_from_flags() -> Settings:
    data = tuple((name, FLAGS[name].value) for name in DATA_FLAGS if FLAGS[name].present)
    evaluation = tuple((name, FLAGS[name].value) for name in EVAL_FLAGS[1:] if FLAGS[name].present)
    grids = Grids(
        ramp_epochs=_numbers(FLAGS.ramp_epochs, "ramp_epochs", int),
        fgsm_step_sizes=_numbers(FLAGS.fgsm_step_sizes, "fgsm_step_sizes"),
        trades_betas=_numbers(FLAGS.trades_betas, "trades_betas"),
        penalty_sigmas=_numbers(FLAGS.penalty_sigmas, "penalty_sigmas"),
        adversarial_sigmas=_numbers(FLAGS.adversarial_sigmas, "adversarial_sigmas"),
        adversarial_clean_weights=_numbers(
            FLAGS.adversarial_clean_weights, "adversarial_clean_weights"
        ),
        finite_difference_sigmas=_numbers(
            FLAGS.finite_difference_sigmas, "finite_difference_sigmas"
        ),
        every_method=FLAGS.every_method,
        every_values=_numbers(FLAGS.every_values, "every_values", int),
        every_sigmas=_numbers(FLAGS.every_sigmas, "every_sigmas"),
    )
    return Settings(
        conv_channels=_numbers(FLAGS.cnn_conv_channels, "cnn_conv_channels", int),
        dense_units=FLAGS.cnn_dense_units,
        epochs=FLAGS.training_epochs,
        selection_epochs=FLAGS.selection_epochs or FLAGS.training_epochs,
        threat_epsilon=FLAGS.threat_epsilon,
        extra_epsilons=_numbers(FLAGS.extra_epsilons, "extra_epsilons"),
        report_epsilons=_numbers(FLAGS.report_epsilons, "report_epsilons"),
        smooth_activation=FLAGS.smooth_activation,
        validation_fraction=FLAGS.validation_fraction,
        validation_examples=FLAGS.validation_eval_examples,
        validation_apgd_steps=FLAGS.validation_apgd_steps,
        error_factor=FLAGS.error_factor,
        primary_examples=FLAGS.eval_examples,
        other_examples=FLAGS.other_eval_examples,
        seeds=_numbers(FLAGS.seeds, "seeds", int),
        grids=grids,
        validate_fixed_rows=FLAGS.validate_fixed_rows,
        data=data,
        evaluation=evaluation,
    )


def recorded_selections(
    earlier: dict[str, Any] | None, rows: Sequence[Row], settings: Settings
) -> dict[str, dict[str, Any]]:
    """The selection records of `earlier` results that `rows` can use instead of running
    their selection again (same epsilon; `earlier_results` has refused results of
    another grid or selection epochs, and the grid is checked again here). The plain
    rows' records are read whether or not they are in `rows`: a row selected now
    takes its error limit from the published plain record.
    """
    found = {}
    plains = {Row("plain", row.activation) for row in rows if needs_selection(row, settings)}
    for row in [*rows, *sorted(plains - set(rows), key=lambda r: r.name)]:
        record = ((earlier or {}).get("selections") or {}).get(row.name)
        if record is None or not needs_selection(row, settings):
            continue
        grid = json.loads(json.dumps(candidates(row, settings.grids)))  # As the JSON has it.
        if (
            [entry["setting"] for entry in record["entries"]] == grid
            and record["epochs"] == settings.selection_epochs
            and math.isclose(record["epsilon"], selection_epsilon(row, settings))
        ):
            found[row.name] = record
    return found


def check_plan(plan: Plan) -> None:
    """Validates every run's settings (train.main's checks) before any work."""
    settings = plan.settings
    if not settings.seeds:
        raise app.UsageError("--seeds must name at least one seed. Received: --seeds=")
    names = [row.name for row in plan.rows]
    if len(set(names)) != len(names):
        raise app.UsageError(f"--experiment_rows names a row twice. Received: {names}")
    unknown = sorted(set(plan.two_seed_rows or ()) - set(names))
    if unknown:
        raise app.UsageError(f"--two_seed_rows must name rows that run. Received: {unknown}")
    if not 0 < settings.validation_fraction < 1:
        raise app.UsageError(
            "--validation_fraction must be in (0, 1). "
            f"Received: --validation_fraction={settings.validation_fraction}"
        )
    if max(settings.grids.ramp_epochs) > settings.epochs:
        logging.warning(
            "A ramp (%s epochs) is longer than the runs (%d epochs): sigma never reaches its value",
            max(settings.grids.ramp_epochs),
            settings.epochs,
        )
    for row in plan.selection_rows() + plan.rows:
        for candidate in candidates(row, settings.grids):
            for job in (
                selection_job(row, candidate, settings),
                final_job(row, candidate, 0, settings),
            ):
                try:
                    config_lib.make_config(job.preset, **job.overrides)
                except ValueError as error:
                    raise app.UsageError(
                        f"Row {row.name}, {describe(candidate)}: {error}"
                    ) from None


def _check_flags() -> None:
    if not FLAGS.workdir:
        raise app.UsageError("--workdir must name the directory of the runs. Received: none")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    results_path = os.path.join(FLAGS.results_dir, f"{NAME}.json")
    if FLAGS.render:
        with open(results_path) as f:
            print(write_markdown(json.load(f), FLAGS.results_dir, FLAGS.results_page))
        return
    _check_flags()
    settings = settings_from_flags()
    try:
        rows = (
            [parse_row(name) for name in FLAGS.experiment_rows]
            if FLAGS.experiment_rows
            else default_rows(
                settings.threat_epsilon, settings.extra_epsilons, settings.smooth_activation
            )
        )
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    two_seed = None if FLAGS.two_seed_rows == ["auto"] else tuple(FLAGS.two_seed_rows)
    plan = Plan(rows, settings, two_seed, FLAGS.workdir, selection_only=FLAGS.selection_only)
    check_plan(plan)

    from train import data as data_lib

    arrays = data_lib.load(
        dict(settings.data).get("dataset", config_lib.PRESETS[PRESET]["dataset"]),
        data_npz=dict(settings.data).get("data_npz"),
        tfds_data_dir=dict(settings.data).get("tfds_data_dir"),
        validation_split=settings.validation_fraction,
    )
    settings_json = settings_record(settings, arrays.record)
    earlier = None
    if FLAGS.keep_earlier_rows:  # Checked before any run.
        earlier = earlier_results(results_path, settings_json)
    if not FLAGS.reselect:
        plan.recorded = recorded_selections(earlier, rows, settings)
        for record in plan.recorded.values():
            logging.info("Read from the results (--reselect runs it): %s", selection_line(record))
    x_val = arrays.x_validation[: settings.validation_examples]
    y_val = arrays.y_validation[: settings.validation_examples]

    def validation_robust(workdir: str, epsilon: float, seed: int) -> float:
        wanted = {
            "attack": "apgd-ce", "apgd_steps": settings.validation_apgd_steps, "epsilon": epsilon,
            "examples": len(x_val), "seed": seed, "split": "validation",
        }  # fmt: skip
        report = cached_report(
            workdir, "validation_robustness.json", wanted,
            lambda: evaluate_saved(
                workdir, x_val, y_val, [epsilon], seed, ("apgd-ce",),
                settings.validation_apgd_steps, 1,
            ),
        )  # fmt: skip
        return worst_case(report, epsilon)

    plan.validation_robust = validation_robust
    os.makedirs(FLAGS.workdir, exist_ok=True)
    plan.sampler = LoadSampler(FLAGS.load_interval, os.path.join(FLAGS.workdir, LOAD_LOG)).start()
    tasks, summarize = plan.tasks()
    results, summaries = jobs_lib.run_tasks(FLAGS.workdir, tasks, summarize, FLAGS.parallel)
    plan.sampler.stop()
    selections = {row.name: plan.selection(row, summaries) for row in plan.selection_rows()}
    if plan.selection_only:
        for record in selections.values():
            logging.info("%s", selection_line(record))
        if earlier is None:  # Results with no rows would blank the published table.
            logging.warning(
                "No results in %s to add the selections to: none written (the final runs "
                "read them from the workdir).", FLAGS.results_dir,
            )  # fmt: skip
            return
    evaluation = dict(settings.evaluation)
    machine = jobs_lib.hardware()
    records = []
    for stage, (row, candidate, seed) in plan.finals.items():
        result = results[summaries[stage]]
        radii = other_epsilons(row, settings)
        other = None
        if radii and settings.other_examples:
            count = min(settings.other_examples, len(arrays.x_test))
            wanted = {
                "suite": "standard", "epsilons": list(radii), "examples": count, "seed": seed,
                "apgd_steps": evaluation.get("eval_apgd_steps", 100),
                "square_queries": evaluation.get("eval_square_queries", 5000),
            }  # fmt: skip
            logging.info(
                "%s: the standard suite at L-inf %s on %d test images", row.name, radii, count
            )
            other = cached_report(
                result["workdir"], "other_radii_robustness.json", wanted,
                lambda result=result, wanted=wanted, count=count, seed=seed: evaluate_saved(
                    result["workdir"], arrays.x_test[:count], arrays.y_test[:count],
                    wanted["epsilons"], seed, None, wanted["apgd_steps"], wanted["square_queries"],
                ),
            )  # fmt: skip
        load = load_summary(FLAGS.workdir, summaries[stage])
        records.append(row_record(row, candidate, seed, result, other, settings, load, machine))
    add_time_ratios(records)  # Within this sitting: kept rows keep their own sitting's.
    if earlier is not None:  # Read again: another command may have written rows since.
        earlier = earlier_results(results_path, settings_json) or earlier
        records, selections = with_earlier_rows(earlier, settings_json, records, selections)
    defaults = default_rows(
        settings.threat_epsilon, settings.extra_epsilons, settings.smooth_activation
    )
    order = {name: i for i, name in enumerate(dict.fromkeys(r.name for r in defaults + rows))}
    records.sort(key=lambda r: (order[r["name"]], r["seed"]))
    results_json = {
        "experiment": NAME,
        "hardware": machine,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "selection_rule": SELECTION_RULE,
        "settings": settings_json,
        "rows": records,
        "targets": targets(records),
        "selections": selections,
    }
    paths = write_results(results_json, FLAGS.results_dir, FLAGS.results_page)
    print(markdown(results_json))
    logging.info("Wrote %s", ", ".join(paths.values()))


def earlier_results(path: str, settings_json: dict[str, Any]) -> dict[str, Any] | None:
    """The results at `path` to keep rows of, or None if there are none.

    Raises:
        app.UsageError: If their settings differ from `settings_json` (seeds apart).
    """
    if not os.path.exists(path):
        return None
    with open(path) as f:
        earlier = json.load(f)
    settings_json = json.loads(json.dumps(settings_json))  # Tuples as the JSON's lists.
    differing = sorted(
        key
        for key in set(settings_json) | set(earlier["settings"])
        if key != "seeds" and settings_json.get(key) != earlier["settings"].get(key)
    )
    if differing:
        raise app.UsageError(
            f"{path} holds results of other settings ({', '.join(differing)}): give another "
            "--results_dir, or --nokeep_earlier_rows to replace them. Received: "
            f"{', '.join(f'{k}={settings_json.get(k)!r}' for k in differing)}"
        )
    return earlier


def with_earlier_rows(
    earlier: dict[str, Any],
    settings_json: dict[str, Any],
    records: list[dict[str, Any]],
    selections: dict[str, Any],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`records` and `selections` with those of the `earlier` results that they lack.

    A row (name and seed) or selection this run produced replaces the earlier
    one; kept rows keep their `time_vs_plain` (their own sitting's plain
    row) and hardware; the seeds of `settings_json` become the union.

    Raises:
        app.UsageError: If a kept row (another seed) has another setting than
            this run's row of that name.
    """
    kept = jobs_lib.kept_earlier(earlier["rows"], records, key=lambda r: (r["name"], r["seed"]))
    settings_of = {r["name"]: r["setting"] for r in records}
    for record in kept:
        if settings_of.get(record["name"], record["setting"]) != record["setting"]:
            raise app.UsageError(
                f"--keep_earlier_rows: {record['name']} (seed {record['seed']}) of the earlier "
                "results was trained with another setting than this run's. Received: "
                f"{record['setting']} and {settings_of[record['name']]}"
            )
    settings_json["seeds"] = sorted(set(settings_json["seeds"]) | set(earlier["settings"]["seeds"]))
    return records + kept, {**earlier.get("selections", {}), **selections}


def settings_record(settings: Settings, data_record: dict[str, Any]) -> dict[str, Any]:
    """The JSON "settings" of the results."""
    evaluation = dict(settings.evaluation)
    return {
        "preset": PRESET,
        "conv_channels": list(settings.conv_channels),
        "dense_units": settings.dense_units,
        "epochs": settings.epochs,
        "selection_epochs": settings.selection_epochs,
        "steps_per_epoch": dict(settings.data).get("steps_per_epoch", 0),
        "ramp_epochs": list(settings.grids.ramp_epochs),
        "threat_epsilon": settings.threat_epsilon,
        "extra_epsilons": list(settings.extra_epsilons),
        "report_epsilons": list(settings.report_epsilons),
        "primary_examples": settings.primary_examples,
        "other_examples": settings.other_examples,
        "eval_apgd_steps": evaluation.get("eval_apgd_steps", 100),
        "eval_square_queries": evaluation.get("eval_square_queries", 5000),
        "validation": {
            "fraction": settings.validation_fraction,
            "examples": settings.validation_examples,
            "attack": "apgd-ce",
            "apgd_steps": settings.validation_apgd_steps,
            "error_factor": settings.error_factor,
        },
        "seeds": list(settings.seeds),
        "grids": dataclasses.asdict(settings.grids),
        "data": _data_name(data_record),
    }


def _data_name(record: dict[str, Any]) -> str:
    """The data as the runs' commands name it: the .npz relative to the checkout (and its
    SHA-256), or the TFDS name and version."""
    if record.get("source") == "npz":
        return f"{jobs_lib.checkout_relative(record['path'])} (sha256 {record['sha256'][:12]})"
    return f"tfds {record.get('name')} {record.get('version')}"


if __name__ == "__main__":
    app.run(main)
