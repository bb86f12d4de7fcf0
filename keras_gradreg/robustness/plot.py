"""A report's accuracy against epsilon, one panel per norm (matplotlib's Agg canvas, no pyplot).

It draws from the report's data (`RobustnessReport.to_dict()`), so it needs
nothing from report.py; `RobustnessReport.plot` calls it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_DEFAULT_STYLE = ("o-", 1.2)


def plot_report(
    data: Mapping[str, Any], path: str, styles: Mapping[str, tuple[str, float]] | None = None
) -> None:
    """Accuracy against epsilon per norm (clean accuracy at 0), as a PNG.

    One line per attack row (cumulative in a cascade); flags in the title.

    Args:
        data: A report as `RobustnessReport.to_dict()` gives it: its
            "rows", "clean_accuracy", "num_examples" and "flags".
        path: Where to write the PNG.
        styles: Row name -> (matplotlib format, line width), for the rows
            drawn differently from the attacks (`RobustnessReport.plot`
            draws the worst case bold and the noise baseline dashed).
    """
    styles = dict(styles or {})
    rows = data["rows"]
    norms = list(dict.fromkeys(row["p"] for row in rows))
    figure = Figure(figsize=(4.6 * len(norms), 3.6))
    axes = figure.subplots(1, len(norms), squeeze=False)[0]
    for axis, p in zip(axes, norms):
        for attack in dict.fromkeys(row["attack"] for row in rows):
            points = sorted(
                (row["epsilon"], row["accuracy"])
                for row in rows
                if row["p"] == p and row["attack"] == attack
            )
            if not points:
                continue
            fmt, linewidth = styles.get(attack, _DEFAULT_STYLE)
            eps, acc = zip(*[(0.0, data["clean_accuracy"]), *points])
            axis.plot(eps, np.asarray(acc) * 100, fmt, linewidth=linewidth, label=attack)
        axis.set_title(f"p = {p} ({data['num_examples']} examples)")
        axis.set_xlabel("epsilon")
        axis.set_ylabel("accuracy (%)")
        axis.set_ylim(-2, 102)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    if data.get("flags"):
        figure.suptitle("flags: " + ", ".join(data["flags"]), color="red", fontsize=9)
    figure.tight_layout()
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=100)
