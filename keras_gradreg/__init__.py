"""keras_gradreg: gradient regularisation against adversarial examples for Keras 3.

Lyu, Huang and Liang (2015): train on L + sigma * ||grad_x L||_q, the
linearised worst case of the loss over a p-norm ball of radius sigma.
"""

from keras_gradreg import _internals, attacks, callbacks, layers, networks, objective, visualize
from keras_gradreg.gradients import LossAndGradient, input_gradients, loss_and_input_gradient
from keras_gradreg.model import RegularizedModel, regularize
from keras_gradreg.norms import dual_exponent, dual_norm, worst_case_perturbation
from keras_gradreg.objective import RegularizedLoss, regularized_loss
from keras_gradreg.regularizer import GradientRegularizer
from keras_gradreg.robustness import RobustnessReport, evaluate_robustness

_internals.check_versions()

__version__ = "0.1.0"

__all__ = [
    "GradientRegularizer",
    "LossAndGradient",
    "RegularizedLoss",
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
    "objective",
    "regularize",
    "regularized_loss",
    "visualize",
    "worst_case_perturbation",
]
