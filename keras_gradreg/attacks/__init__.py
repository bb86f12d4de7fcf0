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

Each returns the adversarial batch; with `return_correct=True`, an
`AttackResult(x_adv, correct)` that also says whether each example is still
classified correctly at its point.
"""

import warnings

from keras_gradreg.attacks import auto_pgd as _auto_pgd
from keras_gradreg.attacks import common as _common
from keras_gradreg.attacks.auto_pgd import apgd, apgd_with_correct  # noqa: F401 (deprecated)
from keras_gradreg.attacks.common import AttackResult, correct_predictions, loss_from_logits
from keras_gradreg.attacks.fab_attack import fab, fab_with_correct  # noqa: F401 (deprecated)
from keras_gradreg.attacks.fab_projections import project_hyperplane
from keras_gradreg.attacks.projected import (  # noqa: F401 (the *_with_correct are deprecated)
    fgsm,
    fgsm_with_correct,
    pgd,
    pgd_with_correct,
)
from keras_gradreg.attacks.square_attack import square, square_with_correct  # noqa: F401
from keras_gradreg.balls import (
    BALL_NORMS,
    project_ball,
    project_l1,
    project_l2,
    project_linf,
    random_in_ball,
    random_on_sphere,
)

# Internal since 0.2.0; reachable here, with a warning, until 0.3.0.
_MOVED = {
    "checkpoints": (_auto_pgd, "keras_gradreg.attacks.auto_pgd"),
    "compiled_kernel": (_common, "keras_gradreg.attacks.common"),
}


def __getattr__(name: str):
    if name in _MOVED:
        module, path = _MOVED[name]
        warnings.warn(
            f"`kgr.attacks.{name}` is internal and deprecated; it leaves `kgr.attacks` in "
            f"keras_gradreg {_common.REMOVED_IN}. It stays in `{path}` (not public API).",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BALL_NORMS",
    "AttackResult",
    "apgd",
    "correct_predictions",
    "fab",
    "fgsm",
    "loss_from_logits",
    "pgd",
    "project_ball",
    "project_hyperplane",
    "project_l1",
    "project_l2",
    "project_linf",
    "random_in_ball",
    "random_on_sphere",
    "square",
]
