"""The inner maximisation: projected steepest ascent in a p-ball and a box.

One step moves by `step_length` along the steepest-ascent direction of the
p-norm (sign for inf, the normalised gradient for 2, the largest coordinate
for 1; the closed-form r* of `keras_gradreg.norms`), projects back onto the
ball around the clean point and clips to the box. `kgr.attacks.pgd` and the
multi-step members of the family ("adversarial" with `steps > 1` or a random
start, "trades") take the same step from the same random starts.
"""

from __future__ import annotations

import math

import tensorflow as tf

from keras_gradreg.balls import project_ball
from keras_gradreg.norms import PValue, worst_case_perturbation


def box(x: tf.Tensor, low, high) -> tf.Tensor:
    """`x` clipped to the box (unchanged without one: `low` None)."""
    return x if low is None else tf.clip_by_value(x, low, high)


def ascent_step(
    x: tf.Tensor,
    x_adv: tf.Tensor,
    gradient: tf.Tensor,
    p: PValue,
    step_length,
    radius,
    low=None,
    high=None,
) -> tf.Tensor:
    """One steepest-ascent step from `x_adv`, projected onto the p-ball around `x` and the box.

    For p = 1 and 2, coordinates that push against the box are left out of
    the step (they could not move).

    Args:
        x: The clean points, batch on axis 0.
        x_adv: The current points, shaped like `x`.
        gradient: The ascent objective's gradient at `x_adv`.
        p: 1, 2 or inf.
        step_length: The step's length in the p-norm.
        radius: The ball's radius.
        low: The box's lower bound, or None for no box.
        high: The box's upper bound.

    Returns:
        The next point, shaped like `x`.
    """
    if low is not None and not math.isinf(p):
        blocked = ((x_adv >= high) & (gradient > 0)) | ((x_adv <= low) & (gradient < 0))
        gradient = tf.where(blocked, tf.zeros_like(gradient), gradient)
    x_adv = x_adv + worst_case_perturbation(gradient, p, step_length)
    return box(x + project_ball(x_adv - x, p, radius), low, high)
