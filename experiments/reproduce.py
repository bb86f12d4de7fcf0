r"""Reproduces the paper's MNIST table: sigma chosen on validation, then 60k runs.

    python -m experiments.reproduce --table=mnist --data_npz=../shared/data/mnist.npz \
        --workdir=runs/reproduce_mnist [--parallel=2]

1. Selection (never on the test set; the last 10k training images are the
   validation split): the p=2 penalty maxout MLP for `--select_epochs` for
   each sigma of `--select_sigmas`; with `--long_sigmas`, each method of
   `--long_methods` for `--long_epochs`; with `--conv_sigmas`, the conv
   maxout network for `--conv_select_epochs`. Each stage picks the sigma
   with the lowest final validation error.
2. Final runs: every row trained on all 60k and evaluated on the test set
   (error and the robustness report, by default the standard attack suite);
   with `--long_sigmas`, the `--long_rows` again for `--long_epochs`, each
   with the sigma chosen for its own method.

Every run is a `train.main` run in its own workdir, so an interrupted
reproduction started again resumes where it stopped and finished runs are not
repeated; `--parallel=N` runs N at a time as subprocesses. `--data_npz`,
`--eval_examples`, `--eval_suite`, `--eval_apgd_steps` and
`--eval_square_queries` are passed on to train.main; the rows set its other
flags.
Writes `results/mnist.json`, `results/mnist.md`, the validation curves and the
r* pictures, the table between `--results_page`'s mnist-table markers and its
headline rows between `--readme`'s mnist-headline markers. `--render` writes
the Markdown again from `results/mnist.json` and runs nothing:

    python -m experiments.reproduce --render
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from absl import app, flags, logging

from experiments import jobs as jobs_lib
from experiments import mnist_table
from train import config as config_lib

FLAGS = flags.FLAGS
# The train.main flags a reproduction passes on to every final run.
SHARED_FLAGS = ("data_npz", "eval_examples", "eval_suite", "eval_apgd_steps", "eval_square_queries")
jobs_lib.define_binary_flags(SHARED_FLAGS, __name__)
jobs_lib.define_common_flags(__name__, readme=True)
flags.DEFINE_enum("table", "mnist", ["mnist"], "Which table to reproduce.")
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
flags.DEFINE_list(
    "long_methods",
    ["penalty", "adversarial"],
    "Methods whose sigma the long stage chooses, each on its own validation runs; a long "
    "row with a method uses that method's choice.",
)
flags.DEFINE_list(
    "conv_sigmas",
    [],
    "Sigmas of the conv maxout network chosen between on validation at "
    "--conv_select_epochs (empty: the preset's sigma).",
)
flags.DEFINE_integer("conv_select_epochs", 1, "Epochs of each conv selection run.", lower_bound=1)
flags.DEFINE_bool(
    "conv_jit_compile",
    False,
    "XLA for the conv network's runs (off by default: on CPU, XLA's convolutions were "
    "slower than oneDNN's; bench/README.md).",
)
jobs_lib.define_keep_earlier_rows(__name__)

VALIDATION_SPLIT = 10_000 / 60_000


@dataclasses.dataclass(frozen=True)
class Options:
    """What the command line asks for (the flags of the same names).

    `passed` holds the train.main flags of `SHARED_FLAGS` given explicitly
    (but `data_npz`), passed on to every final run.
    """

    data_npz: str | None = None
    passed: dict[str, Any] = dataclasses.field(default_factory=dict)
    select_sigmas: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0)
    select_epochs: int = 5
    final_epochs: int = 5
    conv_epochs: int = 1
    conv_steps_per_epoch: int = 0
    conv_eval_examples: int = 0
    long_sigmas: tuple[float, ...] = ()
    long_epochs: int = 200
    long_methods: tuple[str, ...] = ("penalty", "adversarial")
    conv_sigmas: tuple[float, ...] = ()
    conv_select_epochs: int = 1
    conv_jit_compile: bool = False

    @classmethod
    def from_flags(cls) -> Options:
        """The options of the parsed flags."""
        numbers = ("select_sigmas", "long_sigmas", "conv_sigmas")
        values = {
            f.name: tuple(float(v) for v in FLAGS[f.name].value) if f.name in numbers
            else tuple(FLAGS[f.name].value) if f.name == "long_methods"
            else FLAGS[f.name].value
            for f in dataclasses.fields(cls) if f.name != "passed"
        }  # fmt: skip
        return cls(**values, passed=jobs_lib.given_binary_flags(SHARED_FLAGS[1:]))


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the table: a preset and the settings that differ from it.

    `selection` names the stage whose chosen sigma the row uses ("screen" for
    the p=2 MLP rows, "conv" for the conv row), None for a fixed sigma.
    """

    name: str
    label: str
    preset: str
    overrides: dict[str, Any]
    selection: str | None = None
    conv: bool = False

    @property
    def method(self) -> str:
        return self.overrides.get("method", "penalty")


ROWS = (
    Row("maxout_plain", "maxout MLP, plain (sigma=0)", "mnist_maxout_mlp", {"sigma": 0.0}),
    Row(
        "maxout_p2_penalty",
        "maxout MLP, p=2, penalty",
        "mnist_maxout_mlp",
        {"p": 2.0, "method": "penalty"},
        selection="screen",
    ),
    Row(
        "maxout_p2_adversarial",
        "maxout MLP, p=2, adversarial",
        "mnist_maxout_mlp",
        {"p": 2.0, "method": "adversarial", "clean_weight": 0.0},
        selection="screen",
    ),
    Row(
        "maxout_p2_finite_difference",
        "maxout MLP, p=2, finite difference",
        "mnist_maxout_mlp",
        {"p": 2.0, "method": "finite_difference"},
        selection="screen",
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
        selection="screen",
    ),
    Row(
        "conv_pinf_penalty",
        "conv maxout, p=inf, penalty",
        "mnist_conv_maxout",
        {"p": math.inf, "method": "penalty"},
        selection="conv",
        conv=True,
    ),
)
ROWS_BY_NAME = {row.name: row for row in ROWS}


@dataclasses.dataclass(frozen=True)
class Stage:
    """A selection stage: one validation run per sigma, the lowest final error wins."""

    key: str
    directory: str
    title: str
    preset: str
    overrides: dict[str, Any]
    sigmas: tuple[float, ...]
    epochs: int
    data_npz: str | None = None

    def jobs(self) -> list[jobs_lib.Job]:
        return [
            jobs_lib.Job(
                f"{self.directory}/sigma_{sigma:g}",
                self.preset,
                {
                    "data_npz": self.data_npz,
                    **self.overrides,
                    "sigma": sigma,
                    "validation_split": VALIDATION_SPLIT,
                    "epochs": self.epochs,
                    "eval_examples": 0,
                    "pictures": False,
                },
            )
            for sigma in self.sigmas
        ]

    def summarize(self, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The validation curves, the chosen sigma (ties: the smaller) and the commands."""
        curves, commands = {}, {}
        for job, sigma in zip(self.jobs(), self.sigmas):
            records = results[job.name]["metrics"]["epochs"]
            curves[f"{sigma:g}"] = [100.0 * (1.0 - r["validation/accuracy"]) for r in records]
            commands[f"{sigma:g}"] = results[job.name]["command"]
        chosen = min(curves, key=lambda s: (curves[s][-1], float(s)))
        return {
            "title": self.title,
            "metric": "validation error (%) after each epoch, 50k train / 10k validation",
            "epochs": self.epochs,
            "curves": curves,
            "chosen_sigma": float(chosen),
            "commands": commands,
        }


def stages(options: Options) -> list[Stage]:
    """The selection stages `options` ask for."""
    mlp = {"p": 2.0}
    found = [
        Stage(
            "screen", "select", "sigma for p=2", "mnist_maxout_mlp", {**mlp, "method": "penalty"},
            options.select_sigmas, options.select_epochs, options.data_npz,
        )
    ]  # fmt: skip
    for method in options.long_methods if options.long_sigmas else ():
        extra = {"clean_weight": 0.0} if method == "adversarial" else {}
        found.append(
            Stage(
                f"long_{method}",
                "long_select" if method == "penalty" else f"long_select_{method}",
                f"Long stage, p=2 {method.replace('_', ' ')}: sigma",
                "mnist_maxout_mlp",
                {**mlp, "method": method, **extra},
                options.long_sigmas,
                options.long_epochs,
                options.data_npz,
            )
        )
    if options.conv_sigmas:
        found.append(
            Stage(
                "conv", "conv_select", "Conv maxout, p=inf penalty: sigma", "mnist_conv_maxout",
                {"p": math.inf, "method": "penalty", "jit_compile": options.conv_jit_compile},
                options.conv_sigmas, options.conv_select_epochs, options.data_npz,
            )
        )  # fmt: skip
    return found


def final_job(row: Row, sigma: float, options: Options, long_stage: bool = False) -> jobs_lib.Job:
    """The 60k run of one row (`long_epochs` in final_long/ for the long stage)."""
    overrides = {"data_npz": options.data_npz, **row.overrides, "sigma": sigma}
    if long_stage:
        overrides["epochs"] = options.long_epochs
    else:
        overrides["epochs"] = options.conv_epochs if row.conv else options.final_epochs
    overrides.update(options.passed)
    if row.conv:
        overrides["jit_compile"] = options.conv_jit_compile
        if options.conv_steps_per_epoch:
            overrides["steps_per_epoch"] = options.conv_steps_per_epoch
        if options.conv_eval_examples:
            overrides["eval_examples"] = options.conv_eval_examples
    directory = "final_long" if long_stage else "final"
    return jobs_lib.Job(f"{directory}/{row.name}", row.preset, overrides)


def _stage_of(row: Row, long_stage: bool) -> str | None:
    """The selection stage whose sigma the row uses (None: the row's own sigma)."""
    return f"long_{row.method}" if long_stage and row.selection else row.selection


def _row_sigma(row: Row, selections: dict[str, Any], long_stage: bool) -> float:
    stage = _stage_of(row, long_stage)
    if stage in selections:
        return selections[stage]["chosen_sigma"]
    return config_lib.make_config(row.preset, **row.overrides).sigma


def plan(
    selection_stages: list[Stage], rows: list[tuple[Row, bool]], options: Options
) -> list[jobs_lib.Task]:
    """Every run as a task; a final run starts once the stage choosing its sigma is done.

    Start order, longest chains first: the conv selection and the conv row,
    the long stage's selections and rows, then the short screen and its rows.
    """
    known = {stage.key for stage in selection_stages}
    selection = {
        stage.key: [jobs_lib.Task(lambda _, job=job: job, stage=stage.key) for job in stage.jobs()]
        for stage in selection_stages
    }

    def final(row, long_stage):
        stage = _stage_of(row, long_stage)
        return jobs_lib.Task(
            lambda summaries: final_job(
                row, _row_sigma(row, summaries, long_stage), options, long_stage
            ),
            needs=(stage,) if stage in known else (),
        )

    conv = [final(row, long) for row, long in rows if row.conv]
    long_rows = [final(row, long) for row, long in rows if long and not row.conv]
    short_rows = [final(row, long) for row, long in rows if not long and not row.conv]
    order = selection.pop("conv", []) + conv
    for key in [key for key in selection if key.startswith("long_")]:
        order += selection.pop(key)
    return order + long_rows + selection.pop("screen", []) + short_rows


def _check_flags() -> None:
    if not FLAGS.workdir:
        raise app.UsageError("--workdir must name the directory of the runs. Received: none")
    for flag in ("rows", "long_rows"):
        unknown = sorted(set(FLAGS[flag].value) - set(ROWS_BY_NAME))
        if unknown:
            raise app.UsageError(f"Unknown --{flag} {unknown}. Known: {sorted(ROWS_BY_NAME)}")
    for name in FLAGS.long_rows if FLAGS.long_sigmas else ():
        row = ROWS_BY_NAME[name]
        if row.selection and row.method not in FLAGS.long_methods:
            raise app.UsageError(
                f"--long_rows={name} uses the sigma chosen for method {row.method!r}: add it "
                f"to --long_methods. Received: --long_methods={','.join(FLAGS.long_methods)}"
            )
    try:
        for value in FLAGS.select_sigmas + FLAGS.long_sigmas + FLAGS.conv_sigmas:
            config_lib.make_config("mnist_maxout_mlp", sigma=float(value))  # Validates each.
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    if FLAGS.data_npz is None:
        raise app.UsageError("--data_npz must name the MNIST .npz. Received: --data_npz=None")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.render:
        with open(os.path.join(FLAGS.results_dir, "mnist.json")) as f:
            print(write_markdown(json.load(f), FLAGS.results_dir, FLAGS.results_page, FLAGS.readme))
        return
    _check_flags()
    options = Options.from_flags()
    rows = [ROWS_BY_NAME[name] for name in FLAGS.rows] if FLAGS.rows else list(ROWS)
    planned = [(row, False) for row in rows]
    planned += [(ROWS_BY_NAME[name], True) for name in FLAGS.long_rows if FLAGS.long_sigmas]
    used = {_stage_of(row, long_stage) for row, long_stage in planned}
    selection_stages = [stage for stage in stages(options) if stage.key in used]
    ran, selections = jobs_lib.run_tasks(
        FLAGS.workdir,
        plan(selection_stages, planned, options),
        {stage.key: stage.summarize for stage in selection_stages},
        FLAGS.parallel,
    )
    records = []
    for row, long_stage in planned:
        sigma = _row_sigma(row, selections, long_stage)
        result = ran[final_job(row, sigma, options, long_stage).name]
        record = mnist_table.table_row(row, result, sigma)
        if long_stage:
            record["name"] += "_long"
            record["label"] += " (long stage)"
        records.append(record)
    logging.info("All runs finished; writing the results.")
    results = {
        "table": FLAGS.table,
        "hardware": jobs_lib.hardware(),
        "eval_examples": FLAGS.eval_examples,
        "selections": selections,
        "rows": records,
    }
    earlier_path = os.path.join(FLAGS.results_dir, "mnist.json")
    if FLAGS.keep_earlier_rows and os.path.exists(earlier_path):
        with open(earlier_path) as f:
            earlier = json.load(f)
        order = [row.name for row in ROWS] + [f"{row.name}_long" for row in ROWS]
        results = mnist_table.merge_earlier(earlier, results, order)
    write_results(results, FLAGS.results_dir, FLAGS.results_page, FLAGS.readme)


def write_results(results: dict[str, Any], results_dir: str, page: str, readme: str) -> None:
    """mnist.json, the validation plot, the pictures and `write_markdown`'s files."""
    os.makedirs(results_dir, exist_ok=True)
    with open(os.path.join(results_dir, "mnist.json"), "w") as f:
        json.dump(results, f, indent=2)
    mnist_table.plot_validation(results, os.path.join(results_dir, "mnist_validation.png"))
    mnist_table.publish_pictures(results["rows"], results_dir)
    print(write_markdown(results, results_dir, page, readme))


def write_markdown(results: dict[str, Any], results_dir: str, page: str, readme: str) -> str:
    """mnist.md, the table in `page` and the headline rows in `readme` ('': none); the table."""
    text = mnist_table.markdown(results)
    with open(os.path.join(results_dir, "mnist.md"), "w") as f:
        f.write(text)
    if page:
        mnist_table.update_readme(page, text)
    if readme:
        headline = mnist_table.headline_markdown(results)
        mnist_table.update_readme(
            readme, headline, mnist_table.HEADLINE_START, mnist_table.HEADLINE_END
        )
    return text


if __name__ == "__main__":
    app.run(main)
