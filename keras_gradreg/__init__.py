"""keras_gradreg: gradient regularisation against adversarial examples for Keras 3.

Lyu, Huang and Liang (2015): train on L + sigma * ||grad_x L||_q, the
linearised worst case of the loss over a p-norm ball of radius sigma.
docs/api.md lists every public name.
"""

import importlib
import warnings

from keras_gradreg import _deprecated, _internals, attacks, callbacks, layers, networks, visualize
from keras_gradreg.gradients import LossAndGradient, input_gradients, loss_and_input_gradient
from keras_gradreg.model import RegularizedModel, regularize
from keras_gradreg.norms import dual_exponent, dual_norm, worst_case_perturbation
from keras_gradreg.objective import RegularizedLossResult, regularized_loss
from keras_gradreg.regularizer import GradientRegularizer
from keras_gradreg.robustness import RobustnessReport, evaluate_robustness

_internals.check_versions()
_internals.check_overridden_hooks()

__version__ = "0.2.0"

# Modules made internal in 0.2.0: importable under the old names, with a warning, until 0.3.0.
_MOVED_MODULES = ("ascent", "hashing", "kl", "randomness", "subsets", "train_function")
_RENAMED = {"RegularizedLoss": ("kgr.RegularizedLossResult", RegularizedLossResult)}


def __getattr__(name: str):
    if name in _MOVED_MODULES:
        message = _deprecated.moved_message(f"keras_gradreg.{name}", f"keras_gradreg._{name}")
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        return importlib.import_module(f"keras_gradreg._{name}")
    return _deprecated.renamed("keras_gradreg", _RENAMED, name)


__all__ = [
    "GradientRegularizer",
    "LossAndGradient",
    "RegularizedLossResult",
    "RegularizedModel",
    "RobustnessReport",
    "attacks",
    "callbacks",
    "dual_exponent",
    "dual_norm",
    "evaluate_robustness",
    "input_gradients",
    "layers",
    "loss_and_input_gradient",
    "networks",
    "regularize",
    "regularized_loss",
    "visualize",
    "worst_case_perturbation",
]
