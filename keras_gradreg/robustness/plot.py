"""A report's accuracy against epsilon, one panel per norm (matplotlib's Agg canvas, no pyplot)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from keras_gradreg.robustness.report import NOISE, WORST_CASE

if TYPE_CHECKING:
    from keras_gradreg.robustness.report import RobustnessReport

_STYLES = {WORST_CASE: dict(fmt="k-", linewidth=2.5), NOISE: dict(fmt="x--", linewidth=1.0)}


def plot_report(report: RobustnessReport, path: str) -> None:
    """Accuracy against epsilon per norm (clean accuracy at 0), as a PNG.

    One line per attack row (cumulative in a cascade), the worst case in
    bold black and the noise baseline dashed; flags in the title.
    """
    norms = list(dict.fromkeys(row["p"] for row in report.rows))
    figure = Figure(figsize=(4.6 * len(norms), 3.6))
    axes = figure.subplots(1, len(norms), squeeze=False)[0]
    for axis, p in zip(axes, norms):
        for attack in report.attack_names():
            points = sorted(
                (row["epsilon"], row["accuracy"])
                for row in report.rows
                if row["p"] == p and row["attack"] == attack
            )
            if not points:
                continue
            style = _STYLES.get(attack, dict(fmt="o-", linewidth=1.2))
            eps, acc = zip(*[(0.0, report.clean_accuracy), *points])
            axis.plot(
                eps, np.asarray(acc) * 100, style["fmt"], linewidth=style["linewidth"], label=attack
            )
        axis.set_title(f"p = {p} ({report.num_examples} examples)")
        axis.set_xlabel("epsilon")
        axis.set_ylabel("accuracy (%)")
        axis.set_ylim(-2, 102)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    if report.flags:
        figure.suptitle("flags: " + ", ".join(report.flags), color="red", fontsize=9)
    figure.tight_layout()
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=100)
