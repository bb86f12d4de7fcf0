"""The signs of a broken evaluation, each a check that names what it saw.

A weak or fooled evaluation makes any model look robust. The checks follow
the published warning signs (Carlini et al. 2019, Croce and Hein 2020):
accuracy that does not fall with epsilon or does not reach 0 when the ball
covers the whole box, a gradient-free attack that succeeds where gradient
attacks failed (masked gradients), a model whose outputs change between two
identical calls (a randomised defence), vanishing input gradients, and
outputs read with the wrong `from_logits`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from keras_gradreg.norms import canonical_p
from keras_gradreg.robustness.report import NOISE, WORST_CASE, find_row


@dataclasses.dataclass(frozen=True)
class Evidence:
    """What the checks look at, besides the rows of the report.

    Attributes:
        clean_accuracy: Accuracy at x.
        cascade: Whether attacks ran as a cascade.
        tolerance: Accuracy differences up to this are not flagged.
        zero_share: Share of examples with an exactly-zero input gradient.
        zero_threshold: Flag above this share.
        from_logits: The loss's `from_logits` (None if unknown).
        probability_share: Share of outputs that look like probabilities.
        outside_unit_share: Share of outputs with a value outside [0, 1].
        masked: (p, epsilon) -> share of all examples that a gradient-free
            attack broke although every gradient attack had missed them.
        masking_threshold: Flag above this share.
        output_change: Relative difference between two identical calls.
        large_epsilon: (epsilon, accuracy, examples) of the check at the box
            diameter, or None if it was not run.
    """

    clean_accuracy: float
    cascade: bool
    tolerance: float
    zero_share: float
    zero_threshold: float
    from_logits: bool | None
    probability_share: float
    outside_unit_share: float
    masked: dict[tuple[Any, float], float]
    masking_threshold: float
    output_change: float
    large_epsilon: tuple[float, float, int] | None


def _accuracy(rows, name, p, epsilon):
    row = find_row(rows, name, p, epsilon)
    return None if row is None else row["accuracy"]


def _points(rows) -> list[tuple[Any, float]]:
    def order(point):
        p, epsilon = point
        return (canonical_p(p), epsilon)

    return sorted({(r["p"], r["epsilon"]) for r in rows}, key=order)


def _not_decreasing(rows, evidence: Evidence) -> list[str]:
    problems = []
    names = [n for n in dict.fromkeys(r["attack"] for r in rows) if n != NOISE]
    points = _points(rows)
    for name in names:
        for p in dict.fromkeys(p for p, _ in points):
            previous_eps, previous = 0.0, evidence.clean_accuracy
            for _, epsilon in (t for t in points if t[0] == p):
                value = _accuracy(rows, name, p, epsilon)
                if value is None:
                    continue
                if value > previous + evidence.tolerance:
                    problems.append(
                        f"{name} p={p}: {100 * previous:.2f}% at epsilon={previous_eps:g} "
                        f"but {100 * value:.2f}% at epsilon={epsilon:g}"
                    )
                previous_eps, previous = epsilon, value
    return problems


def _pgd_weaker(rows, evidence: Evidence) -> list[str]:
    names = {r["attack"] for r in rows}
    if evidence.cascade or not {"fgsm", "pgd"} <= names:
        return []
    problems = []
    for p, epsilon in _points(rows):
        fgsm, pgd = _accuracy(rows, "fgsm", p, epsilon), _accuracy(rows, "pgd", p, epsilon)
        if pgd > fgsm + evidence.tolerance:
            problems.append(
                f"p={p} epsilon={epsilon:g}: pgd {100 * pgd:.2f}% > fgsm {100 * fgsm:.2f}%"
            )
    return problems


def _noise_stronger(rows, evidence: Evidence) -> list[str]:
    problems = []
    for p, epsilon in _points(rows):
        noise = _accuracy(rows, NOISE, p, epsilon)
        strongest = _accuracy(rows, WORST_CASE, p, epsilon)
        if noise is None or strongest is None:
            continue
        if noise < strongest - evidence.tolerance:
            problems.append(
                f"p={p} epsilon={epsilon:g}: noise {100 * noise:.2f}% < "
                f"best attack {100 * strongest:.2f}%"
            )
    return problems


def _masking(evidence: Evidence) -> list[str]:
    return [
        f"p={p} epsilon={epsilon:g}: {100 * share:.2f}% of examples"
        for (p, epsilon), share in evidence.masked.items()
        if share > evidence.masking_threshold
    ]


def sanity_flags(rows: list[dict[str, Any]], evidence: Evidence) -> dict[str, str]:
    """The checks of a sound evaluation that failed, name -> explanation."""
    flags = {}
    listed = {
        "accuracy_not_decreasing": _not_decreasing(rows, evidence),
        "pgd_weaker_than_fgsm": _pgd_weaker(rows, evidence),
        "noise_stronger_than_attack": _noise_stronger(rows, evidence),
    }
    flags.update({name: "; ".join(items) for name, items in listed.items() if items})
    masked = _masking(evidence)
    if masked:
        flags["gradient_masking"] = (
            "the gradient-free attack broke examples that every gradient attack missed ("
            + "; ".join(masked)
            + f"; threshold {100 * evidence.masking_threshold:.2f}%): the gradients "
            "are masked or obfuscated, and gradient attacks overstate robustness."
        )
    if evidence.output_change > 1e-5:
        flags["randomized_outputs"] = (
            "two identical inference calls gave different outputs (largest relative "
            f"difference {evidence.output_change:.3g}): the model is randomised (dropout "
            "or noise at inference?), so these numbers are not comparable; evaluate it "
            "with Expectation over Transformation, or make inference deterministic."
        )
    if evidence.large_epsilon is not None:
        epsilon, accuracy, count = evidence.large_epsilon
        if accuracy > 0.0:
            flags["large_epsilon_not_broken"] = (
                f"APGD-CE at L-inf epsilon={epsilon:g} (the whole box) left "
                f"{100 * accuracy:.2f}% of {count} examples correct; any input is "
                "reachable there, so the attack should succeed everywhere: gradients are "
                "masked, or the model's prediction cannot change."
            )
    if evidence.zero_share > evidence.zero_threshold:
        flags["zero_gradients"] = (
            f"{100 * evidence.zero_share:.1f}% of examples have an exactly-zero input "
            f"gradient (threshold {100 * evidence.zero_threshold:.1f}%): gradient attacks "
            "cannot move them, so their accuracy is not evidence of robustness (saturated "
            "or clipped outputs, a non-differentiable layer, or a wrong loss)."
        )
    if evidence.from_logits is True and evidence.probability_share > 0.99:
        flags["probabilities_with_logits_loss"] = (
            f"{100 * evidence.probability_share:.1f}% of outputs look like probabilities "
            "but the loss has from_logits=True: gradients are those of the wrong loss."
        )
    if evidence.from_logits is False and evidence.outside_unit_share > 0.01:
        flags["logits_with_probability_loss"] = (
            f"{100 * evidence.outside_unit_share:.1f}% of outputs lie outside [0, 1] but "
            "the loss has from_logits=False: the loss clips them, gradients vanish."
        )
    return flags
