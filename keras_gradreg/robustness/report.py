"""`RobustnessReport`: what `evaluate_robustness` measured, and how."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from keras_gradreg import _checks
from keras_gradreg.norms import canonical_p

# Rows that are not attacks: the per-example worst case and the noise baseline.
WORST_CASE = "worst_case"
NOISE = "noise"


def p_label(p: Any) -> float | int | str:
    """A norm exponent as stored in reports: "inf", or an int when whole."""
    p = canonical_p(p)
    return int(p) if p.is_integer() else _checks.inf_as_text(p)


def find_row(
    rows: Iterable[Mapping[str, Any]], attack: str, p: Any, epsilon: float
) -> dict[str, Any] | None:
    """The row of `attack` at (p, epsilon) in a report's rows, or None.

    The one matching rule for report rows: `p` as a number, `math.inf` or
    "inf" (compared as `p_label` stores it), `epsilon` with `math.isclose`
    (a radius read back from JSON or a flag may differ in the last bit).
    """
    label = p_label(p)
    for row in rows:
        if row["attack"] == attack and row["p"] == label and math.isclose(row["epsilon"], epsilon):
            return row
    return None


@dataclasses.dataclass
class RobustnessReport:
    """Results of `evaluate_robustness`.

    Attributes:
        num_examples: Examples evaluated.
        clean_accuracy: Accuracy on the unperturbed inputs.
        rows: One dict per attack, norm and radius: `{"attack", "p",
            "epsilon", "accuracy", "broken", "attacked"}`. In a cascade
            (`settings["cascade"]`), "accuracy" is the robust accuracy once
            this attack and every earlier one have run; otherwise it is this
            attack's own accuracy. "broken" counts the examples this attack
            broke that no earlier attack in the list had, "attacked" those
            it ran on. Two more rows per norm and radius: "worst_case" (an
            example counts only if no attack broke it: the robust accuracy)
            and "noise" (random points of p-norm epsilon, a baseline).
        gradient_norms: Mean over examples of the dual norm ||g||_q of each
            example's input gradient, keyed by the perturbation norm p as a
            string ("inf" means ||g||_1).
        zero_gradient_share: Share of examples whose input gradient is
            exactly zero everywhere.
        flags: Checks that failed, name -> explanation; empty if all passed.
        settings: How the evaluation was run: attacks and their iterations,
            restarts, targets and queries, cascade, seed, box, the attacks
            skipped (with why), and the loss: "loss" is "given", "compiled"
            or "cross-entropy" (a model without a compiled loss),
            "loss_from_logits" its `from_logits`, and "outputs" how the
            outputs looked on the evaluated examples ("probabilities" or
            "logits").
        seconds: Wall time of each attack, summed over norms and radii.
    """

    num_examples: int
    clean_accuracy: float
    rows: list[dict[str, Any]]
    gradient_norms: dict[str, float]
    zero_gradient_share: float
    flags: dict[str, str]
    settings: dict[str, Any]
    seconds: dict[str, float] = dataclasses.field(default_factory=dict, compare=False)
    per_example: dict[str, np.ndarray] | None = dataclasses.field(
        default=None, compare=False, repr=False
    )

    @property
    def ok(self) -> bool:
        """True if no sanity check fired."""
        return not self.flags

    def row(self, attack: str, p: Any, epsilon: float) -> dict[str, Any]:
        """The row of `attack` at (p, epsilon) (`find_row`'s rule); KeyError if none."""
        found = find_row(self.rows, attack, p, epsilon)
        if found is None:
            raise KeyError(f"No row for attack={attack!r}, p={p_label(p)!r}, epsilon={epsilon!r}")
        return found

    def accuracy(self, attack: str, p: Any, epsilon: float) -> float:
        """The "accuracy" of one row (raises KeyError if there is none)."""
        return self.row(attack, p, epsilon)["accuracy"]

    def robust_accuracy(self, p: Any, epsilon: float) -> float:
        """Share of examples no attack broke at (p, epsilon): the worst case."""
        return self.accuracy(WORST_CASE, p, epsilon)

    def examples(self, p: Any, epsilon: float) -> dict[str, np.ndarray]:
        """Per example (bool arrays), at (p, epsilon): "clean" correctness, each
        attack's row (as "accuracy" counts it) and "worst_case".

        Only for a report fresh from `evaluate_robustness` (not saved to JSON).
        """
        if self.per_example is None:
            raise ValueError("This report holds no per-example results (it was loaded from JSON).")
        prefix = f"{p_label(p)}/{epsilon!r}/"
        found = {k[len(prefix) :]: v for k, v in self.per_example.items() if k.startswith(prefix)}
        if not found:
            raise KeyError(f"No results for p={p_label(p)!r}, epsilon={epsilon!r}")
        return {"clean": self.per_example["clean"], **found}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of all fields but `per_example`."""
        fields = {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if field.name != "per_example"
        }
        return json.loads(json.dumps(fields, default=_json_default))

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> RobustnessReport:
        """Inverse of `to_dict`."""
        names = [f.name for f in dataclasses.fields(cls) if f.name != "per_example"]
        return cls(**{name: config[name] for name in names if name in config})

    def save_json(self, path: str) -> None:
        """Writes `to_dict()` as JSON to `path`."""
        with open(path, "w") as file:
            json.dump(self.to_dict(), file, indent=2)

    @classmethod
    def load_json(cls, path: str) -> RobustnessReport:
        """Reads a report written by `save_json`."""
        with open(path) as file:
            return cls.from_dict(json.load(file))

    def plot(self, path: str) -> None:
        """Draws accuracy against epsilon, one panel per norm, as a PNG.

        The worst case is drawn bold and black, the noise baseline dashed.
        """
        from keras_gradreg.robustness.plot import plot_report  # matplotlib only when plotting

        styles = {WORST_CASE: ("k-", 2.5), NOISE: ("x--", 1.0)}
        plot_report(self.to_dict(), path, styles)

    def attack_names(self) -> list[str]:
        """The attacks in the rows, in run order, then "worst_case" and "noise"."""
        return list(dict.fromkeys(r["attack"] for r in self.rows))

    def __str__(self) -> str:
        names = self.attack_names()
        cascade = self.settings.get("cascade")
        lines = [
            f"Robustness report: {self.num_examples} examples, "
            f"clean accuracy {100 * self.clean_accuracy:.2f}%",
            "mean dual norm of input gradients: "
            + ", ".join(f"p={p}: {v:.4g}" for p, v in self.gradient_norms.items())
            + f"; exactly-zero gradients: {100 * self.zero_gradient_share:.1f}%",
            "attacks: " + describe_attacks(self.settings),
            "accuracy (%)"
            + (" after each attack of the cascade" if cascade else " under each attack")
            + " [examples it broke that earlier attacks had not]",
            "",
            f"{'p':>5} {'epsilon':>9}" + "".join(f" {name:>16}" for name in names),
        ]
        points = list(dict.fromkeys((r["p"], r["epsilon"]) for r in self.rows))
        for p, epsilon in points:
            cells = []
            for name in names:
                try:
                    row = self.row(name, p, epsilon)
                except KeyError:
                    cells.append(f" {'-':>16}")
                    continue
                cell = f"{100 * row['accuracy']:.2f}"
                if row.get("broken") is not None and name not in (WORST_CASE, NOISE):
                    cell += f" [{row['broken']}]"
                cells.append(f" {cell:>16}")
            lines.append(f"{p!s:>5} {epsilon:>9.4g}" + "".join(cells))
        for name, reason in self.settings.get("skipped", {}).items():
            lines.append(f"skipped {name}: {reason}")
        lines.append("")
        if not self.flags:
            lines.append("sanity checks: all passed")
        for name, detail in self.flags.items():
            lines.append(f"FLAG {name}: {detail}")
        return "\n".join(lines)


def describe_attacks(settings: Mapping[str, Any]) -> str:
    """One line naming each attack with its budget, e.g. "apgd-ce (100 steps)"."""
    apgd = f"{settings.get('apgd_steps')} steps x {settings.get('apgd_restarts')} restarts"
    budget = {
        "fgsm": "1 step",
        "pgd": f"{settings.get('steps')} steps x {settings.get('restarts')} restarts"
        + (", random start" if settings.get("random_start") else ", from x"),
        "apgd-ce": apgd,
        "apgd-dlr": apgd,
        "apgd-t": f"{apgd} x {settings.get('target_classes')} targets",
        "fab-t": f"{settings.get('fab_steps')} steps x {settings.get('fab_restarts')} restarts"
        f" x {settings.get('target_classes')} targets",
        "square": f"{settings.get('square_queries')} queries",
    }
    parts = [f"{name} ({budget.get(name, '?')})" for name in settings.get("attacks", [])]
    order = "cascade" if settings.get("cascade") else "each on every example"
    return ", ".join(parts) + f"; {order}"


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"Not JSON serializable: {type(value).__name__}")
