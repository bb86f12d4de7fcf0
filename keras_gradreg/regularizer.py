"""`GradientRegularizer`: the validated settings of one member of the family."""

from __future__ import annotations

import inspect
import math
from typing import Any

import keras

from keras_gradreg import _checks
from keras_gradreg.norms import PValue, canonical_p, dual_exponent

METHODS = ("penalty", "adversarial", "finite_difference")


@keras.saving.register_keras_serializable(package="keras_gradreg")
class GradientRegularizer:
    """Settings of the gradient-regularisation family (docs/method.md).

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
        self._sigma = _checks.check_nonnegative(sigma, "sigma")
        self._method = _checks.check_choice(method, "method", METHODS)
        self._clean_weight = _checks.check_unit_interval(clean_weight, "clean_weight")
        self._fd_step = _checks.check_positive(fd_step, "fd_step")

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


def as_regularizer(regularizer: Any) -> GradientRegularizer:
    """A `GradientRegularizer` from itself, a dict of its arguments, a saved config, or None.

    Raises:
        ValueError: For anything else, or a dict with unknown keys.
    """
    if regularizer is None:
        return GradientRegularizer()
    if isinstance(regularizer, GradientRegularizer):
        return regularizer
    if isinstance(regularizer, dict):
        if "class_name" in regularizer:
            return keras.saving.deserialize_keras_object(regularizer)
        known = set(inspect.signature(GradientRegularizer).parameters)
        unknown = sorted(set(regularizer) - known)
        if unknown:
            raise ValueError(
                f"`regularizer` has unknown keys {unknown}; known: {sorted(known)}. "
                f"Received: regularizer={regularizer!r}"
            )
        return GradientRegularizer(**regularizer)
    raise ValueError(
        "`regularizer` must be a kgr.GradientRegularizer, a dict of its "
        f"arguments, or None. Received: regularizer={regularizer!r}"
    )
