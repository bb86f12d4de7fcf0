r"""Cheaper regularization on MNIST: `every` and `fraction` against the full term.

    python -m experiments.cheaper --data_npz=../shared/data/mnist.npz \
        --workdir=runs/cheaper_mnist [--parallel=2]

Trains the maxout MLP (preset `mnist_maxout_mlp`, all 60k images) once per
row, every row with the same p, sigma and epochs: plain, the full p=2
penalty, the penalty with `every` 4 and 16 and with `fraction` 0.25, and the
adversarial estimator in full and with `every` 4. Each run is evaluated on
the test set (error, and the robustness report: by default the standard
attack suite). The step cost of each row is the bench's (`--bench_json`,
written by bench/step_time.py: the mean time per step over whole cycles of
`every` steps relative to the plain Keras step of the same bench run, the
median over its repetitions),
since the runs' own wall times are shared with other jobs.

Every run is a `train.main` run in its own workdir, so an interrupted run of
this script resumes. Writes `cheaper.json`, `cheaper.md` and
`cheaper_frontier.png` to `--results_dir`, and the table between
`--results_page`'s cheaper-table markers. `--render` writes the Markdown again
from `results/cheaper.json` and runs nothing:

    python -m experiments.cheaper --render
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from absl import app, flags, logging

from experiments import jobs as jobs_lib
from experiments import mnist_table

FLAGS = flags.FLAGS
# The train.main flags this command passes on to every run (the rows set the others).
SHARED_FLAGS = (
    "data_npz", "eval_examples", "eval_suite", "eval_apgd_steps", "eval_square_queries",
    "eval_epsilons_inf", "eval_epsilons_2",
)  # fmt: skip
jobs_lib.define_binary_flags(SHARED_FLAGS, __name__)
jobs_lib.define_common_flags(__name__)
flags.DEFINE_float("cheaper_sigma", 0.3, "sigma of every regularized row.", lower_bound=0.0)
flags.DEFINE_integer("cheaper_epochs", 40, "Epochs of every row.", lower_bound=1)
flags.DEFINE_list("cheaper_rows", [], "Rows to run (empty: all). Names: see ROWS.")
flags.DEFINE_string(
    "bench_json",
    "bench/results/step_time_lazy_mlp.json",
    "bench/step_time.py output with the rows' step costs ('' for none).",
)

# The bench configuration that the binary's maxout MLP preset trains.
BENCH_CONFIG = "maxout_mlp_preset[FastDropout:auto]"
README_START = "<!-- cheaper-table:start -->"
README_END = "<!-- cheaper-table:end -->"


@dataclasses.dataclass(frozen=True)
class Options:
    """The MNIST file, every row's sigma and epochs, and the train.main flags given."""

    data_npz: str | None
    sigma: float = 0.3
    epochs: int = 40
    passed: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Row:
    """One row: a method and its `every` and `fraction`."""

    name: str
    method: str  # "plain", "penalty" or "adversarial".
    every: int = 1
    fraction: float = 1.0

    def _settings(self) -> list[str]:
        return [f"every={self.every}"] * (self.every != 1) + [f"fraction={self.fraction:g}"] * (
            self.fraction != 1.0
        )

    @property
    def label(self) -> str:
        if self.method == "plain":
            return "plain (sigma=0)"
        return ", ".join([f"p=2 {self.method}", *self._settings()])

    @property
    def bench_method(self) -> str:
        """The row's name in bench/step_time.py's output, e.g. "penalty every=4"."""
        return " ".join([self.method, *self._settings()])


ROWS = (  # In the order they run: the comparisons the issue asks for first.
    Row("penalty", "penalty"),
    Row("penalty_every4", "penalty", every=4),
    Row("penalty_every16", "penalty", every=16),
    Row("penalty_fraction0.25", "penalty", fraction=0.25),
    Row("adversarial_every4", "adversarial", every=4),
    Row("adversarial", "adversarial"),
    Row("plain", "plain"),
)
ROWS_BY_NAME = {row.name: row for row in ROWS}


def job(row: Row, options: Options) -> jobs_lib.Job:
    """The `train.main` run of one row."""
    overrides: dict[str, Any] = {"data_npz": options.data_npz, "p": 2.0}
    if row.method == "plain":
        overrides["sigma"] = 0.0
    else:
        overrides.update(method=row.method, sigma=options.sigma)
        if row.method == "adversarial":
            overrides["clean_weight"] = 0.0
        if row.every != 1:
            overrides["every"] = row.every
        if row.fraction != 1.0:
            overrides["fraction"] = row.fraction
    overrides.update(epochs=options.epochs, pictures=False, **options.passed)
    return jobs_lib.Job(row.name, "mnist_maxout_mlp", overrides)


def bench_ratios(path: str) -> dict[str, float]:
    """bench method name -> step cost relative to the plain step, for BENCH_CONFIG with XLA.

    The cost is the median over the bench's repetitions of the mean time per
    step over whole cycles of `every` steps. Empty without a file.
    """
    if not path:
        return {}
    with open(path) as f:
        bench = json.load(f)
    return {
        r["method"]: r["median_ratio_to_plain"]
        for r in bench["rows"]
        if r["xla"] == "on" and r["config"] == BENCH_CONFIG
    }


def record(row: Row, result: dict[str, Any], sigma: float, ratios: dict[str, float]) -> dict:
    """The table record of a finished row: the MNIST table's fields and the step cost."""
    table_row = mnist_table.table_row(row, result, 0.0 if row.method == "plain" else sigma)
    table_row["step_ratio"] = ratios.get(row.bench_method)
    return table_row


def markdown(results: dict[str, Any]) -> str:
    """The table of the rows as Markdown."""
    percent = mnist_table.percent
    lines = [
        "| row | test error % | robust % L-inf .1 | robust % L2 1 | step cost (bench) "
        "| train time | attacks (images) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["rows"]:
        ratio = "-" if r["step_ratio"] is None else f"{r['step_ratio']:.2f}x"
        lines.append(
            f"| {r['label']} | {r['test_error_percent']:.2f} | {percent(r.get('robust_inf_0.1'))} "
            f"| {percent(r.get('robust_2_1'))} | {ratio} | {r['train_seconds'] / 60:.1f} min "
            f"| {r['evaluation']} |"
        )
    commands = "\n".join(f"- {r['label']}: `{r['command']}`" for r in results["rows"])
    return (
        f"Maxout MLP on all 60k MNIST images, p=2, sigma={results['sigma']:g} for every "
        f"regularized row, {results['epochs']} epochs, one seed. Robust accuracy: the worst "
        "case per test image over the attacks named in the row, on the first test images. "
        "Step cost: the mean time per step over whole cycles of `every` steps relative to "
        f"the plain Keras step (median over repetitions), from {results['bench']} "
        f"({BENCH_CONFIG}, XLA on). Train time is wall time shared with other jobs, not a "
        f"cost comparison. Hardware: {results['hardware']}.\n\n"
        + "\n".join(lines)
        + f"\n\nCommands (with `--workdir=...`):\n\n{commands}\n"
    )


def plot_frontier(results: dict[str, Any], path: str) -> None:
    """Robust accuracy at L-inf 0.1 against the step cost, one point per row."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for r in results["rows"]:
        if r["step_ratio"] is None or r.get("robust_inf_0.1") is None:
            continue
        x, y = r["step_ratio"], 100 * r["robust_inf_0.1"]
        axes.scatter(x, y, color="tab:red" if "adversarial" in r["name"] else "tab:blue")
        axes.annotate(r["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    axes.set_xlabel("step cost relative to a plain step (bench, XLA on)")
    axes.set_ylabel("robust accuracy % at L-inf 0.1 (suite)")
    axes.set_title(f"Cheaper regularization, maxout MLP, {results['epochs']} epochs")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.render:
        with open(os.path.join(FLAGS.results_dir, "cheaper.json")) as f:
            print(write_markdown(json.load(f), FLAGS.results_dir, FLAGS.results_page))
        return
    unknown = sorted(set(FLAGS.cheaper_rows) - set(ROWS_BY_NAME))
    if unknown:
        raise app.UsageError(f"Unknown --cheaper_rows {unknown}. Known: {sorted(ROWS_BY_NAME)}")
    if FLAGS.data_npz is None or not FLAGS.workdir:
        raise app.UsageError(
            "--data_npz (the MNIST .npz) and --workdir are required. "
            f"Received: --data_npz={FLAGS.data_npz} --workdir={FLAGS.workdir}"
        )
    if FLAGS.bench_json and not os.path.isfile(FLAGS.bench_json):
        raise app.UsageError(f"--bench_json: no such file. Received: {FLAGS.bench_json}")
    options = Options(
        FLAGS.data_npz,
        FLAGS.cheaper_sigma,
        FLAGS.cheaper_epochs,
        jobs_lib.given_binary_flags(SHARED_FLAGS[1:]),
    )
    rows = [ROWS_BY_NAME[n] for n in FLAGS.cheaper_rows] if FLAGS.cheaper_rows else list(ROWS)
    ran = jobs_lib.run_jobs(FLAGS.workdir, [job(row, options) for row in rows], FLAGS.parallel)
    ratios = bench_ratios(FLAGS.bench_json)
    results = {
        "sigma": options.sigma,
        "epochs": options.epochs,
        "bench": FLAGS.bench_json or "no bench",
        "hardware": jobs_lib.hardware(),
        "rows": [record(row, ran[row.name], options.sigma, ratios) for row in rows],
    }
    logging.info("All runs finished; writing the results.")
    write_results(results, FLAGS.results_dir, FLAGS.results_page)


def write_results(results: dict[str, Any], results_dir: str, page: str) -> None:
    """cheaper.json, the frontier plot and `write_markdown`'s files."""
    os.makedirs(results_dir, exist_ok=True)
    with open(os.path.join(results_dir, "cheaper.json"), "w") as f:
        json.dump(results, f, indent=2)
    plot_frontier(results, os.path.join(results_dir, "cheaper_frontier.png"))
    print(write_markdown(results, results_dir, page))


def write_markdown(results: dict[str, Any], results_dir: str, page: str) -> str:
    """cheaper.md and the table between `page`'s markers ('': none); returns the table."""
    text = markdown(results)
    with open(os.path.join(results_dir, "cheaper.md"), "w") as f:
        f.write(text)
    if page:
        mnist_table.update_readme(page, text, README_START, README_END)
    return text


if __name__ == "__main__":
    app.run(main)
