"""Robust accuracy, measured the way the field measures it, with checks on the evaluation.

`evaluate_robustness` runs an attack suite (by default AutoAttack's standard
version: APGD-CE, APGD-T, FAB-T, Square) at each norm and radius and returns a
`RobustnessReport`, whose flags fire on the published signs of a broken
evaluation.
"""

from keras_gradreg.robustness.evaluate import DEFAULT_EPSILONS, evaluate_robustness
from keras_gradreg.robustness.report import NOISE, WORST_CASE, RobustnessReport, p_label
from keras_gradreg.robustness.runner import ATTACKS, GRADIENT_FREE, SUITES

__all__ = [
    "ATTACKS",
    "DEFAULT_EPSILONS",
    "GRADIENT_FREE",
    "NOISE",
    "SUITES",
    "WORST_CASE",
    "RobustnessReport",
    "evaluate_robustness",
    "p_label",
]
