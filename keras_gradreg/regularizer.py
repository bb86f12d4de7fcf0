"""`GradientRegularizer`: the validated settings of one member of the family."""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np

from keras_gradreg.norms import PValue, canonical_p, dual_exponent

METHODS = ("penalty", "adversarial", "finite_difference")


def _check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"`{name}` must be a number. Received: {name}={value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"`{name}` must not be NaN. Received: {name}={value!r}")
    return value


@keras.saving.register_keras_serializable(package="keras_gradreg")
class GradientRegularizer:
    """Settings of the gradient-regularisation family (PAPER.md).

    Training minimises L(x, y) + sigma * ||grad_x L(x, y)||_q, the linearised
    worst case of the loss over the ball ||r||_p <= sigma, estimated by one of
    three methods:

    - `"penalty"`: the exact penalty by double backpropagation.
    - `"adversarial"`: `clean_weight * L(x) + (1 - clean_weight) * L(x + r*)`
      with r* the closed-form worst-case perturbation, held constant. With
      `p=inf` and `clean_weight=0.5` this is Goodfellow et al.'s FGSM
      adversarial training with eps = sigma.
    - `"finite_difference"`: `L(x) + sigma * (L(x + h d) - L(x)) / h` with
      d = r* / sigma held constant and h = `fd_step`.

    Args:
        p: Norm of the perturbation ball: a number >= 1, `math.inf` or "inf".
        sigma: Radius of the ball, >= 0. `sigma=0` trains like a plain model.
        method: One of "penalty", "adversarial", "finite_difference".
        clean_weight: Weight of the clean loss in "adversarial", in [0, 1].
        fd_step: Step h of "finite_difference", > 0, in input units along a
            direction of unit p-norm.
    """

    def __init__(
        self,
        p: PValue = 2.0,
        sigma: float = 0.1,
        method: str = "penalty",
        clean_weight: float = 0.0,
        fd_step: float = 0.01,
    ):
        self._p = canonical_p(p)
        sigma = _check_number("sigma", sigma)
        if sigma < 0 or math.isinf(sigma):
            raise ValueError(f"`sigma` must be a finite number >= 0. Received: sigma={sigma!r}")
        if method not in METHODS:
            raise ValueError(f"`method` must be one of {METHODS}. Received: method={method!r}")
        clean_weight = _check_number("clean_weight", clean_weight)
        if not 0.0 <= clean_weight <= 1.0:
            raise ValueError(
                f"`clean_weight` must be in [0, 1]. Received: clean_weight={clean_weight!r}"
            )
        fd_step = _check_number("fd_step", fd_step)
        if not 0.0 < fd_step < math.inf:
            raise ValueError(
                f"`fd_step` must be a finite number > 0. Received: fd_step={fd_step!r}"
            )
        self._sigma = sigma
        self._method = method
        self._clean_weight = clean_weight
        self._fd_step = fd_step

    p = property(lambda self: self._p, doc="Perturbation norm p (float, inf allowed).")
    sigma = property(lambda self: self._sigma, doc="Radius of the perturbation ball.")
    method = property(lambda self: self._method, doc="The estimator's name.")
    clean_weight = property(lambda self: self._clean_weight, doc="Clean-loss weight.")
    fd_step = property(lambda self: self._fd_step, doc="Finite-difference step h.")

    @property
    def q(self) -> float:
        """The dual exponent used by the penalty, q = p / (p - 1)."""
        return dual_exponent(self._p)

    def get_config(self) -> dict[str, Any]:
        return {
            "p": "inf" if math.isinf(self._p) else self._p,
            "sigma": self._sigma,
            "method": self._method,
            "clean_weight": self._clean_weight,
            "fd_step": self._fd_step,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GradientRegularizer:
        return cls(**config)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GradientRegularizer) and self.get_config() == other.get_config()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.get_config().items())))

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.get_config().items())
        return f"GradientRegularizer({args})"
