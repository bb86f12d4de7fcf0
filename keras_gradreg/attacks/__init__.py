"""Attacks that measure robustness: FGSM, PGD, Auto-PGD, FAB-T and Square.

- `fgsm`, `pgd`: the family's closed-form step and its projected iteration
  (`keras_gradreg.attacks.projected`).
- `apgd`: Auto-PGD with the cross-entropy or DLR loss, untargeted or
  targeted (Croce and Hein 2020; `keras_gradreg.attacks.auto_pgd`).
- `fab`: FAB-T, the targeted fast adaptive boundary attack (Croce and Hein
  2020; `keras_gradreg.attacks.fab_attack`), which looks for the closest
  misclassified point.
- `square`: the gradient-free Square attack (Andriushchenko et al. 2020;
  `keras_gradreg.attacks.square_attack`).

Each has a `*_with_correct` variant that also returns whether each example
is still classified correctly at the returned point.
"""

from keras_gradreg.attacks.auto_pgd import apgd, apgd_with_correct, checkpoints
from keras_gradreg.attacks.common import (
    compiled_kernel,
    correct_predictions,
    loss_from_logits,
)
from keras_gradreg.attacks.fab_attack import fab, fab_with_correct
from keras_gradreg.attacks.fab_projections import project_hyperplane
from keras_gradreg.attacks.projected import fgsm, fgsm_with_correct, pgd, pgd_with_correct
from keras_gradreg.attacks.square_attack import square, square_with_correct
from keras_gradreg.balls import (
    BALL_NORMS,
    project_ball,
    project_l1,
    project_l2,
    project_linf,
    random_in_ball,
    random_on_sphere,
)

__all__ = [
    "BALL_NORMS",
    "apgd",
    "apgd_with_correct",
    "checkpoints",
    "compiled_kernel",
    "correct_predictions",
    "fab",
    "fab_with_correct",
    "fgsm",
    "fgsm_with_correct",
    "loss_from_logits",
    "pgd",
    "pgd_with_correct",
    "project_ball",
    "project_hyperplane",
    "project_l1",
    "project_l2",
    "project_linf",
    "random_in_ball",
    "random_on_sphere",
    "square",
    "square_with_correct",
]
