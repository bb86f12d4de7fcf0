"""The MNIST results table: records from finished runs, Markdown, pictures, page blocks.

Robustness columns hold each row's robust accuracy: the worst case per
example over the attacks of the strongest evaluation the run had (the
standard suite: APGD-CE, APGD-T, Square), and each row says which attacks
ran on how many images.
"""

from __future__ import annotations

import math
import operator
import os
import shutil
from typing import Any

from absl import logging

from experiments import jobs
from keras_gradreg.robustness.report import find_row

README_START = "<!-- mnist-table:start -->"  # The full table, in docs/results.md.
README_END = "<!-- mnist-table:end -->"
HEADLINE_START = "<!-- mnist-headline:start -->"  # Its headline rows, in README.md.
HEADLINE_END = "<!-- mnist-headline:end -->"
HEADLINE_ROWS = (
    "maxout_plain_long",
    "maxout_p2_penalty_long",
    "maxout_p2_adversarial_long",
    "conv_pinf_penalty",
)
EPSILONS = {"inf": (0.1, 0.2, 0.3), "2": (1.0, 2.0)}
PICTURE = "perturbations.png"  # Written by train_lib into each run's workdir.
PICTURES = {
    "maxout_plain": "mnist_perturbations_plain.png",
    "maxout_p2_penalty": "mnist_perturbations_p2_penalty.png",
}
ATTACK_NAMES = {
    "apgd-ce": "APGD-CE",
    "apgd-dlr": "APGD-DLR",
    "apgd-t": "APGD-T",
    "fab-t": "FAB-T",
    "square": "Square",
    "fgsm": "FGSM",
    "pgd": "PGD",
}


def accuracy(robustness: dict[str, Any] | None, attack: str, p: str, epsilon: float):
    """The accuracy of one row of a report's dict, or None."""
    row = find_row((robustness or {}).get("rows", []), attack, p, epsilon)
    return None if row is None else row["accuracy"]


def evaluation_label(robustness: dict[str, Any] | None) -> str:
    """Which attacks ran on how many images, e.g. "APGD-CE, APGD-T, Square (1000)"."""
    if not robustness:
        return "none"
    settings = robustness.get("settings", {})
    names = []
    for name in settings.get("attacks", []):
        label = ATTACK_NAMES.get(name, name)
        if name == "pgd":
            label += f"-{settings.get('steps')}"
        elif name == "square":
            label += f" {settings.get('square_queries')}q"
        names.append(label)
    return f"{', '.join(names)} ({robustness.get('num_examples')})"


def table_row(row, result: dict[str, Any], sigma: float) -> dict[str, Any]:
    """The table record of one finished run."""
    metrics = result["metrics"]
    epochs = metrics["epochs"]
    robustness = metrics.get("robustness")
    record = {
        "name": row.name,
        "label": row.label,
        "sigma": sigma,
        "epochs": len(epochs),
        "steps_per_epoch": metrics["flags"].get("steps_per_epoch", 0),
        "jit_compile": metrics["flags"].get("jit_compile", True),
        "test_error_percent": metrics["final"]["test/error_percent"],
        "train_seconds": sum(r.get("seconds", 0.0) for r in epochs),
        "command": result["command"],
        "workdir": result.get("workdir"),
        "robustness_examples": (robustness or {}).get("num_examples"),
        "evaluation": evaluation_label(robustness),
        "evaluation_seconds": sum((robustness or {}).get("seconds", {}).values()),
        "flags": (robustness or {}).get("flags"),
    }
    for p, epsilons in EPSILONS.items():
        for epsilon in epsilons:
            record[f"robust_{p}_{epsilon:g}"] = accuracy(robustness, "worst_case", p, epsilon)
    return record


def robust(record: dict[str, Any], p: str, epsilon: float) -> float | None:
    """The record's robust accuracy; results/mnist.json's rows of an earlier run
    (before the attack suite) hold PGD's."""
    key = f"robust_{p}_{epsilon:g}"
    return record[key] if key in record else record.get(f"pgd_{p}_{epsilon:g}")


def _evaluation(record: dict[str, Any], pgd_steps: Any) -> str:
    if "evaluation" not in record:  # Records of an earlier format: PGD alone.
        return f"PGD-{pgd_steps} alone ({record.get('robustness_examples')}), an earlier run"
    return record["evaluation"] + (", an earlier run" if record.get("earlier") else "")


def merge_earlier(earlier: dict[str, Any], results: dict[str, Any], order: list[str]) -> dict:
    """`results` with the rows and selections of `earlier` that it does not replace.

    Kept rows are marked as from an earlier run; rows are sorted by their
    name's place in `order` (names not in it last).
    """
    name = operator.itemgetter("name")
    rows = results["rows"] + jobs.kept_earlier(
        earlier.get("rows", []), results["rows"], key=name, mark=True
    )
    rank = {name: i for i, name in enumerate(order)}
    rows.sort(key=lambda r: rank.get(r["name"], len(order)))
    selections = {
        key: dict(selection, earlier=True)
        for key, selection in earlier.get("selections", {}).items()
        if key not in results["selections"]
    }
    merged = dict(results, rows=rows, selections={**selections, **results["selections"]})
    if "pgd_steps" in earlier and "pgd_steps" not in results:
        merged["pgd_steps"] = earlier["pgd_steps"]
    hardware = earlier.get("hardware")
    if hardware and hardware != results.get("hardware") and len(rows) > len(results["rows"]):
        merged["hardware"] = f"{results.get('hardware')}; rows of an earlier run: {hardware}"
    return merged


def percent(value: float | None) -> str:
    """An accuracy as a percentage with one decimal, "-" for None."""
    return "-" if value is None else f"{100 * value:.1f}"


def protocol(results: dict[str, Any]) -> str:
    """The paragraph that says what the robustness columns measure, and on what hardware."""
    return (
        "Robust accuracy (%) is the worst case per test image over the attacks named in the "
        "row, on the first images of the test set; the attacks column names each row's; these "
        "rows' standard suite is AutoAttack's standard cascade without FAB-T (APGD-CE and "
        "APGD-T with 100 steps, 9 targets, then Square), which `kgr.evaluate_robustness` ran "
        "before FAB-T joined it. "
        f"Hardware: {results['hardware']}.\n\n"
    )


def table(rows: list[dict[str, Any]], pgd_steps: Any) -> str:
    """The Markdown table of `rows`, without a final newline."""
    header = (
        "| model | sigma | epochs | test error % | robust % L-inf .1/.2/.3 | robust % L2 1/2 "
        "| attacks (images) | train time |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )
    lines = []
    for r in rows:
        epochs = f"{r['epochs']}" + (
            f" x {r['steps_per_epoch']} steps" if r.get("steps_per_epoch") else ""
        )
        cells = [
            r["label"] + ("" if r.get("jit_compile", True) else " (XLA off)"),
            f"{r['sigma']:g}",
            epochs,
            f"{r['test_error_percent']:.2f}",
            "/".join(percent(robust(r, "inf", e)) for e in EPSILONS["inf"]),
            "/".join(percent(robust(r, "2", e)) for e in EPSILONS["2"]),
            _evaluation(r, pgd_steps),
            f"{r['train_seconds'] / 60:.1f} min",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return header + "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    """The table, its flags, the selections and the commands, as Markdown."""
    flagged = "\n".join(
        f"- {r['label']}: " + "; ".join(f"{name}: {text}" for name, text in r["flags"].items())
        for r in results["rows"]
        if r.get("flags")
    )
    flag_text = f"\n\nSanity flags raised by the robustness report:\n\n{flagged}" if flagged else ""
    commands = "\n".join(f"- {r['label']}: `{r['command']}`" for r in results["rows"])
    selections = "".join(selection_text(title, s) for title, s in selection_stages(results))
    return (
        protocol(results)
        + table(results["rows"], results.get("pgd_steps"))
        + flag_text
        + "\n\nTrain time is wall time on the hardware above, shared with other jobs during "
        "these runs, not a cost comparison (see the step-cost table)."
        + selections
        + f"\n\nCommands (with `--data_npz=...`, `--workdir=...`):\n\n{commands}\n"
    )


def headline_markdown(results: dict[str, Any], names: tuple[str, ...] = HEADLINE_ROWS) -> str:
    """The README's short version: the protocol and the rows of `names` found in `results`."""
    by_name = {r["name"]: r for r in results["rows"]}
    rows = [by_name[name] for name in names if name in by_name]
    return protocol(results) + table(rows, results.get("pgd_steps")) + "\n"


def selection_stages(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(title, selection) of every selection stage of `results`."""
    return [
        (s["title"] + (" (an earlier run)" if s.get("earlier") else ""), s)
        for s in results.get("selections", {}).values()
        if s
    ]


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
    """Writes the validation curves of every selection stage as a PNG (none: no file)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stages = selection_stages(results)
    if not stages:
        return
    figure = Figure(figsize=(5 * len(stages), 3.5))
    axes = figure.subplots(1, len(stages), squeeze=False)[0]
    for axis, (title, selection) in zip(axes, stages):
        for sigma, curve in selection["curves"].items():
            axis.plot(range(1, len(curve) + 1), curve, label=f"sigma={sigma}")
        axis.set(
            xlabel="epoch",
            ylabel="validation error (%)",
            title=f"{title}: {selection['epochs']} epochs, chose {selection['chosen_sigma']:g}",
            ylim=(0, min(4.0, max(max(c) for c in selection["curves"].values()))),
        )
        axis.title.set_fontsize(9)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=80)


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


def update_readme(path: str, text: str, start: str = README_START, end: str = README_END) -> None:
    """Replaces the text of the Markdown page `path` between the markers `start` and `end`."""
    with open(path) as f:
        readme = f.read()
    if start not in readme or end not in readme:
        raise ValueError(f"{path} has no {start} ... {end} markers.")
    before, rest = readme.split(start, 1)
    _, after = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(f"{before}{start}\n{text}{end}{after}")
