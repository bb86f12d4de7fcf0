r"""Reproduces the paper's MNIST table: sigma chosen on validation, then 60k runs.

    python -m train.reproduce --table=mnist --data_npz=../shared/data/mnist.npz \
        --workdir=runs/reproduce_mnist

1. Selection: the maxout MLP with the p=2 penalty is trained for
   `--select_epochs` on 50k examples for each sigma of `--select_sigmas`; the
   other 10k (the last of the training set) are the validation split. The
   sigma with the best final validation accuracy is chosen. The test set is
   not looked at.
2. Final runs: every row of the table is trained on all 60k examples and
   evaluated on the test set (error and the robustness report).
3. Long stage (with `--long_sigmas`): selection again at `--long_epochs`
   among `--long_sigmas`, then the `--long_rows` trained on 60k for
   `--long_epochs` with the sigma chosen there, added to the table.

Every run is a `train.train_lib.train_and_evaluate` run in its own workdir, so
an interrupted reproduction started again resumes where it stopped and
finished runs are not repeated (`--workdir` holds one subdirectory per run;
`--data_npz` and `--eval_examples` as for `train.main`, whose other flags the
rows set themselves). Writes `results/mnist.json`,
`results/mnist.md` and the table between the README's markers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
import shutil
import time
from typing import Any

from absl import app, flags, logging

from train import config as config_lib
from train import main as main_lib  # noqa: F401  (defines --workdir, --data_npz, ...)
from train import train_lib

FLAGS = flags.FLAGS
flags.DEFINE_enum("table", "mnist", ["mnist"], "Which table to reproduce.")
flags.DEFINE_string("results_dir", "results", "Where mnist.json and mnist.md go.")
flags.DEFINE_string("readme", "README.md", "README whose table is replaced ('' for none).")
flags.DEFINE_list("select_sigmas", ["0.03", "0.1", "0.3", "1.0"], "p=2 sigmas to select from.")
flags.DEFINE_integer("select_epochs", 5, "Epochs of each selection run.", lower_bound=1)
flags.DEFINE_integer("final_epochs", 5, "Epochs of each MLP final run.", lower_bound=1)
flags.DEFINE_integer("conv_epochs", 1, "Epochs of the conv maxout final run.", lower_bound=1)
flags.DEFINE_integer(
    "conv_steps_per_epoch", 0, "Steps per conv epoch (0: the whole training set).", lower_bound=0
)
flags.DEFINE_integer(
    "conv_eval_examples",
    0,
    "Test examples attacked for the conv row (0: --eval_examples).",
    lower_bound=0,
)
flags.DEFINE_list("rows", [], "Final rows to run (empty: all). Names: see ROWS.")
flags.DEFINE_list(
    "long_sigmas",
    [],
    "p=2 sigmas of the long stage (empty: no long stage): selection and --long_rows "
    "at --long_epochs.",
)
flags.DEFINE_integer("long_epochs", 200, "Epochs of the long stage's runs.", lower_bound=1)
flags.DEFINE_list(
    "long_rows", ["maxout_plain", "maxout_p2_penalty"], "Rows trained again in the long stage."
)

VALIDATION_SPLIT = 10_000 / 60_000
README_START = "<!-- mnist-table:start -->"
README_END = "<!-- mnist-table:end -->"
EPSILONS = {"inf": (0.1, 0.2, 0.3), "2": (1.0, 2.0)}
# Where the data is and how the run executes: a finished run may be reused
# across them (train_lib resumes across them too).
RUN_LOCATION_FIELDS = frozenset(
    {"data_npz", "tfds_data_dir", "strategy", "jit_compile", "deterministic"}
)
PICTURE = "perturbations.png"  # Written by train_lib into each run's workdir.
PICTURES = {
    "maxout_plain": "mnist_perturbations_plain.png",
    "maxout_p2_penalty": "mnist_perturbations_p2_penalty.png",
}


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the table: a preset and the settings that differ from it."""

    name: str
    label: str
    preset: str
    overrides: dict[str, Any]
    uses_chosen_sigma: bool = False
    conv: bool = False


ROWS = (
    Row("maxout_plain", "maxout MLP, plain (sigma=0)", "mnist_maxout_mlp", {"sigma": 0.0}),
    Row(
        "maxout_p2_penalty",
        "maxout MLP, p=2, penalty",
        "mnist_maxout_mlp",
        {"p": 2.0, "method": "penalty"},
        uses_chosen_sigma=True,
    ),
    Row(
        "maxout_p2_adversarial",
        "maxout MLP, p=2, adversarial",
        "mnist_maxout_mlp",
        {"p": 2.0, "method": "adversarial", "clean_weight": 0.0},
        uses_chosen_sigma=True,
    ),
    Row(
        "maxout_p2_finite_difference",
        "maxout MLP, p=2, finite difference",
        "mnist_maxout_mlp",
        {"p": 2.0, "method": "finite_difference"},
        uses_chosen_sigma=True,
    ),
    Row(
        "maxout_pinf_fgsm",
        "maxout MLP, p=inf, FGSM training (clean_weight 0.5, eps 0.25)",
        "mnist_maxout_mlp",
        {"p": math.inf, "method": "adversarial", "clean_weight": 0.5, "sigma": 0.25},
    ),
    Row(
        "sigmoid_p2_penalty",
        "sigmoid MLP, p=2, penalty",
        "mnist_sigmoid_mlp",
        {"p": 2.0, "method": "penalty"},
        uses_chosen_sigma=True,
    ),
    Row(
        "conv_pinf_penalty",
        "conv maxout, p=inf, penalty, sigma=0.1",
        "mnist_conv_maxout",
        {"p": math.inf, "method": "penalty", "sigma": 0.1},
        conv=True,
    ),
)
ROWS_BY_NAME = {row.name: row for row in ROWS}


def hardware() -> str:
    """CPU model and core count (or what is known of the machine)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = re.findall(r"model name\s*:\s*(.+)", f.read())
        if names:
            model = names[0].strip()
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, no GPU"


CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH_FLAGS = frozenset({"data_npz", "tfds_data_dir"})


def checkout_relative(path: str) -> str:
    """`path` relative to the checkout (commands run there), e.g. ../shared/data/mnist.npz."""
    return os.path.relpath(os.path.abspath(path), CHECKOUT)


def command_line(preset: str, overrides: dict[str, Any]) -> str:
    """The `train.main` command that reproduces a run, run from the checkout.

    Paths (`--data_npz`, `--tfds_data_dir`) are written relative to the
    checkout, so the command works on another machine with the same layout.
    """
    parts = ["python -m train.main", f"--preset={preset}"]
    for key, value in overrides.items():
        if key in PATH_FLAGS and value:
            value = checkout_relative(value)
        if isinstance(value, float) and math.isinf(value):
            value = "inf"
        if isinstance(value, bool):
            parts.append(f"--{key}" if value else f"--no{key}")
        else:
            parts.append(f"--{key}={value}")
    return " ".join(parts)


def _check_same_settings(workdir: str, recorded: dict[str, Any], wanted: dict[str, Any]) -> None:
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


def run(name: str, preset: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Trains (or resumes, or reads a finished) run; returns its metrics and command."""
    workdir = os.path.join(FLAGS.workdir, name)
    overrides = {"data_npz": FLAGS.data_npz, **overrides}
    config = config_lib.make_config(preset, **overrides)
    path = os.path.join(workdir, train_lib.METRICS_FILE)
    if os.path.exists(path):
        with open(path) as f:
            done = json.load(f)
        _check_same_settings(workdir, done.get("flags", {}), dataclasses.asdict(config))
        if done.get("status") == "done":
            logging.info("%s: finished earlier, reading %s", name, path)
            return {"metrics": done, "command": command_line(preset, overrides), "workdir": workdir}
    logging.info("%s: training (%s)", name, command_line(preset, overrides))
    start = time.time()
    metrics = train_lib.train_and_evaluate(config, workdir)
    metrics["wall_seconds_this_process"] = time.time() - start
    return {"metrics": metrics, "command": command_line(preset, overrides), "workdir": workdir}


def select_sigma(stage: str, sigmas: list[str], epochs: int) -> dict[str, Any]:
    """Trains the p=2 penalty maxout MLP on 50k for each sigma; picks by validation.

    Args:
        stage: Subdirectory of `--workdir` for the runs (`select`, `long_select`).
        sigmas: Candidate sigmas (flag strings).
        epochs: Epochs of each run.

    Returns:
        The validation curves, the chosen sigma (lowest final validation
        error; ties go to the smaller sigma) and each run's command.
    """
    curves, runs = {}, {}
    for value in sigmas:
        sigma = float(value)
        result = run(
            f"{stage}/sigma_{sigma:g}",
            "mnist_maxout_mlp",
            {
                "p": 2.0,
                "method": "penalty",
                "sigma": sigma,
                "validation_split": VALIDATION_SPLIT,
                "epochs": epochs,
                "eval_examples": 0,
                "pictures": False,
            },
        )
        records = result["metrics"]["epochs"]
        curves[f"{sigma:g}"] = [100.0 * (1.0 - r["validation/accuracy"]) for r in records]
        runs[f"{sigma:g}"] = result["command"]
    chosen = min(curves, key=lambda s: (curves[s][-1], float(s)))
    return {
        "metric": "validation error (%) after each epoch, 50k train / 10k validation",
        "epochs": epochs,
        "curves": curves,
        "chosen_sigma": float(chosen),
        "commands": runs,
    }


def accuracy(robustness: dict[str, Any] | None, attack: str, p: str, epsilon: float):
    for row in (robustness or {}).get("rows", []):
        if row["attack"] == attack and str(row["p"]) == p and math.isclose(row["epsilon"], epsilon):
            return row["accuracy"]
    return None


def table_row(row: Row, result: dict[str, Any], sigma: float) -> dict[str, Any]:
    metrics = result["metrics"]
    epochs = metrics["epochs"]
    record = {
        "name": row.name,
        "label": row.label,
        "sigma": sigma,
        "epochs": len(epochs),
        "steps_per_epoch": metrics["flags"].get("steps_per_epoch", 0),
        "test_error_percent": metrics["final"]["test/error_percent"],
        "train_seconds": sum(r.get("seconds", 0.0) for r in epochs),
        "command": result["command"],
        "workdir": result.get("workdir"),
        "robustness_examples": (metrics.get("robustness") or {}).get("num_examples"),
        "flags": (metrics.get("robustness") or {}).get("flags"),
    }
    for attack in ("fgsm", "pgd"):
        for p, epsilons in EPSILONS.items():
            for epsilon in epsilons:
                record[f"{attack}_{p}_{epsilon:g}"] = accuracy(
                    metrics.get("robustness"), attack, p, epsilon
                )
    return record


def markdown(results: dict[str, Any]) -> str:
    def percent(value):
        return "-" if value is None else f"{100 * value:.1f}"

    header = (
        "| model | sigma | test error % | FGSM inf .1/.2/.3 | PGD inf .1/.2/.3 | "
        "FGSM L2 1/2 | PGD L2 1/2 | epochs | train time |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )
    lines = []
    for r in results["rows"]:
        label = r["label"]
        if r.get("robustness_examples") not in (None, results["eval_examples"]):
            label += f" (attacks on {r['robustness_examples']} images)"
        cells = [
            label,
            f"{r['sigma']:g}",
            f"{r['test_error_percent']:.2f}",
            "/".join(percent(r[f"fgsm_inf_{e:g}"]) for e in EPSILONS["inf"]),
            "/".join(percent(r[f"pgd_inf_{e:g}"]) for e in EPSILONS["inf"]),
            "/".join(percent(r[f"fgsm_2_{e:g}"]) for e in EPSILONS["2"]),
            "/".join(percent(r[f"pgd_2_{e:g}"]) for e in EPSILONS["2"]),
            f"{r['epochs']}"
            + (f" x {r['steps_per_epoch']} steps" if r.get("steps_per_epoch") else ""),
            f"{r['train_seconds'] / 60:.1f} min",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    flagged = "\n".join(
        f"- {r['label']}: " + "; ".join(f"{name}: {text}" for name, text in r["flags"].items())
        for r in results["rows"]
        if r.get("flags")
    )
    flag_text = f"\n\nSanity flags raised by the robustness report:\n\n{flagged}" if flagged else ""
    commands = "\n".join(f"- {r['label']}: `{r['command']}`" for r in results["rows"])
    return (
        f"Attack columns are accuracy (%) on the first {results['eval_examples']} test "
        f"images (PGD: {results['pgd_steps']} steps). Hardware: {results['hardware']}.\n\n"
        + header
        + "\n".join(lines)
        + flag_text
        + "\n\nTrain time is wall time on the hardware above, shared with other jobs during "
        "these runs, not a cost comparison (see the step-cost table)."
        + selection_text("sigma for p=2", results["selection"])
        + selection_text("Long stage: sigma", results.get("long_selection"))
        + f"\n\nCommands (with `--data_npz=...`, `--workdir=...`):\n\n{commands}\n"
    )


def selection_text(title: str, selection: dict[str, Any] | None, shown: int = 10) -> str:
    """One paragraph on a selection stage; long curves show `shown` evenly spaced epochs."""
    if not selection:
        return ""
    epochs = selection["epochs"]
    every = max(1, math.ceil(epochs / shown))
    picked = sorted({*range(every - 1, epochs, every), epochs - 1})
    parts = []
    for sigma, curve in selection["curves"].items():
        values = "/".join(f"{curve[i]:.2f}" for i in picked)
        best = min(range(len(curve)), key=lambda i: (curve[i], i))
        parts.append(f"sigma={sigma}: {values} (lowest {curve[best]:.2f} after epoch {best + 1})")
    which = "each epoch" if every == 1 else f"after epochs {', '.join(str(i + 1) for i in picked)}"
    return (
        f"\n\n{title} chosen on validation (50k/10k split of the training set, {epochs} "
        f"epochs, validation error % {which}): {'; '.join(parts)}; chosen sigma = "
        f"{selection['chosen_sigma']:g}."
    )


def plot_validation(results: dict[str, Any], path: str) -> None:
    """Writes the validation curves of every selection stage as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    stages = [s for s in (results["selection"], results.get("long_selection")) if s]
    figure, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.5), squeeze=False)
    for axis, selection in zip(axes[0], stages):
        for sigma, curve in selection["curves"].items():
            axis.plot(range(1, len(curve) + 1), curve, label=f"sigma={sigma}")
        axis.set(
            xlabel="epoch",
            ylabel="validation error (%)",
            title=f"{selection['epochs']}-epoch runs, chosen sigma={selection['chosen_sigma']:g}",
            ylim=(0, min(4.0, max(max(c) for c in selection["curves"].values()))),
        )
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def publish_pictures(records: list[dict[str, Any]], results_dir: str) -> list[str]:
    """Copies the r* pictures of the plain and p=2 penalty maxout MLPs to `results_dir`.

    Both come from the long stage when it trained both rows, else both from
    the first stage, so the two pictures compare models trained alike.

    Returns:
        The files written.
    """
    by_name = {r["name"]: r for r in records}
    suffix = "_long" if all(f"{name}_long" in by_name for name in PICTURES) else ""
    written = []
    for name, target in PICTURES.items():
        record = by_name.get(name + suffix)
        source = record and record.get("workdir") and os.path.join(record["workdir"], PICTURE)
        if not source or not os.path.exists(source):
            logging.warning("No %s for %s: %s not updated.", PICTURE, name + suffix, target)
            continue
        destination = os.path.join(results_dir, target)
        shutil.copyfile(source, destination)
        written.append(destination)
    return written


def update_readme(path: str, text: str) -> None:
    with open(path) as f:
        readme = f.read()
    if README_START not in readme or README_END not in readme:
        raise ValueError(f"{path} has no {README_START} ... {README_END} markers.")
    before, rest = readme.split(README_START, 1)
    _, after = rest.split(README_END, 1)
    with open(path, "w") as f:
        f.write(f"{before}{README_START}\n{text}{README_END}{after}")


def final_run(row: Row, chosen_sigma: float, long_stage: bool = False) -> dict[str, Any]:
    """Trains (or reads) one row on all 60k; returns its table record.

    Args:
        row: The table row.
        chosen_sigma: sigma for rows that use the selected one.
        long_stage: Train for `--long_epochs` in `final_long/` instead of the
            first stage's epochs in `final/`.
    """
    overrides = dict(row.overrides)
    if row.uses_chosen_sigma:
        overrides["sigma"] = chosen_sigma
    if long_stage:
        overrides["epochs"] = FLAGS.long_epochs
    else:
        overrides["epochs"] = FLAGS.conv_epochs if row.conv else FLAGS.final_epochs
    overrides["eval_examples"] = FLAGS.eval_examples
    if row.conv and FLAGS.conv_steps_per_epoch:
        overrides["steps_per_epoch"] = FLAGS.conv_steps_per_epoch
    if row.conv and FLAGS.conv_eval_examples:
        overrides["eval_examples"] = FLAGS.conv_eval_examples
    result = run(f"{'final_long' if long_stage else 'final'}/{row.name}", row.preset, overrides)
    record = table_row(row, result, overrides["sigma"])
    if long_stage:
        record["name"] += "_long"
        record["label"] += " (long stage)"
    return record


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    shared = {"data_npz", "eval_examples"}
    ignored = [f.name for f in config_lib.FIELDS if FLAGS[f.name].present and f.name not in shared]
    ignored += ["preset"] if FLAGS["preset"].present else []
    if ignored:
        raise app.UsageError(
            "train.reproduce sets the training settings of each row itself; of "
            "train.main's flags it takes --workdir, --data_npz and --eval_examples. "
            f"Received: {', '.join('--' + name for name in ignored)}"
        )
    unknown = sorted(set(FLAGS.rows) - set(ROWS_BY_NAME))
    if unknown:
        raise app.UsageError(f"Unknown --rows {unknown}. Known: {sorted(ROWS_BY_NAME)}")
    unknown = sorted(set(FLAGS.long_rows) - set(ROWS_BY_NAME))
    if unknown:
        raise app.UsageError(f"Unknown --long_rows {unknown}. Known: {sorted(ROWS_BY_NAME)}")
    for value in FLAGS.select_sigmas + FLAGS.long_sigmas:
        config_lib.make_config("mnist_maxout_mlp", sigma=float(value))  # Validates each.
    if FLAGS.data_npz is None or not os.path.isfile(FLAGS.data_npz):
        raise app.UsageError(f"--data_npz must name the MNIST .npz. Received: {FLAGS.data_npz}")

    selection = select_sigma("select", FLAGS.select_sigmas, FLAGS.select_epochs)
    rows = [ROWS_BY_NAME[name] for name in FLAGS.rows] if FLAGS.rows else list(ROWS)
    records = [final_run(row, selection["chosen_sigma"]) for row in rows]
    long_selection = None
    if FLAGS.long_sigmas:
        long_selection = select_sigma("long_select", FLAGS.long_sigmas, FLAGS.long_epochs)
        for name in FLAGS.long_rows:
            records.append(
                final_run(ROWS_BY_NAME[name], long_selection["chosen_sigma"], long_stage=True)
            )

    results = {
        "table": FLAGS.table,
        "hardware": hardware(),
        "eval_examples": FLAGS.eval_examples,
        "pgd_steps": config_lib.make_config("mnist_maxout_mlp").eval_pgd_steps,
        "selection": selection,
        "long_selection": long_selection,
        "rows": records,
    }
    os.makedirs(FLAGS.results_dir, exist_ok=True)
    with open(os.path.join(FLAGS.results_dir, "mnist.json"), "w") as f:
        json.dump(results, f, indent=2)
    plot_validation(results, os.path.join(FLAGS.results_dir, "mnist_validation.png"))
    publish_pictures(records, FLAGS.results_dir)
    text = markdown(results)
    with open(os.path.join(FLAGS.results_dir, "mnist.md"), "w") as f:
        f.write(text)
    if FLAGS.readme:
        update_readme(FLAGS.readme, text)
    print(text)


if __name__ == "__main__":
    app.run(main)
