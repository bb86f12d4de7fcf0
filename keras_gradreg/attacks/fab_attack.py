"""FAB-T (Croce and Hein, ICML 2020): the fast adaptive boundary attack, targeted.

FAB looks for the adversarial point closest to x. From the current point
x_k it linearises the decision boundary between the label y and a target
class t, f(x) = z_t(x) - z_y(x) ~ f(x_k) + grad f(x_k) . (x - x_k), and
projects both x_k and the original x onto that hyperplane inside the box
(`keras_gradreg.attacks.fab_projections`): moves d_k and d_0. The next point
overshoots both projections by eta and mixes them,

    x_{k+1} = clip((1 - a)(x_k + eta d_k) + a (x + eta d_0)),
    a = min(|d_k| / (|d_k| + |d_0|), alpha_max),

so that it stays close to x. Whenever x_{k+1} is misclassified it is kept
if closer to x than the best point so far, and the iterate steps back
towards x: x_{k+1} <- x + beta (x_{k+1} - x). AutoAttack's standard version
runs 100 iterations for each of the 9 classes other than the label with the
highest clean scores, one restart (from x itself), alpha_max = 0.1,
eta = 1.05, beta = 0.9. Later restarts start from a random point of the
sphere of radius epsilon / 2 around x, as the authors' code does.

An example counts as broken at radius epsilon when the closest
misclassified point found is within epsilon; a run stops early once every
example of its batch is broken.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import keras
import tensorflow as tf

from keras_gradreg import _checks
from keras_gradreg._checks import Clip
from keras_gradreg.attacks import scores
from keras_gradreg.attacks.auto_pgd import clean_scores, count_classes, random_start_point
from keras_gradreg.attacks.common import (
    AttackResult,
    RunOutcome,
    attack_result,
    bounds,
    box,
    check_inputs,
    compiled_kernel,
    deprecated_twin,
    keep_best_runs,
    loss_from_logits,
    seed_tensor,
)
from keras_gradreg.attacks.fab_projections import project_hyperplane
from keras_gradreg.balls import ball_norm, random_on_sphere
from keras_gradreg.gradients import differentiate_inputs
from keras_gradreg.norms import PValue

FAB_NORMS = (1.0, 2.0, math.inf)


class FabResult(NamedTuple):
    """One FAB run on a batch.

    Attributes:
        x_adv: The closest misclassified point found (x where none was).
        distance: Its p-distance to x (+inf where none was found).
    """

    x_adv: tf.Tensor
    distance: tf.Tensor


def distances(delta: tf.Tensor, p: float) -> tf.Tensor:
    """The p-norm of each row of `delta` (flattened per example), p in 1, 2, inf."""
    flat = tf.reshape(delta, [tf.shape(delta)[0], -1])
    if p == math.inf:
        return tf.reduce_max(tf.abs(flat), axis=1)
    if p == 2:
        return tf.norm(flat, axis=1)
    return tf.reduce_sum(tf.abs(flat), axis=1)


def _within(distance: tf.Tensor, epsilon: tf.Tensor) -> tf.Tensor:
    """Broken at radius epsilon: a misclassified point was found within it."""
    return tf.math.is_finite(distance) & (distance <= epsilon)


def _rows(mask: tf.Tensor, rank: int) -> tf.Tensor:
    return tf.reshape(mask, [-1] + [1] * (rank - 1))


class _FabLoop:
    """The FAB-T loop for one batch and one target (module docstring)."""

    def __init__(self, model_ref, from_logits, p, steps, alpha_max, eta, beta):
        self.model_ref, self.from_logits, self.p, self.steps = model_ref, from_logits, p, steps
        self.alpha_max, self.eta, self.beta = alpha_max, eta, beta

    def scores(self, x):
        return scores.class_scores(self.model_ref()(x, training=False), self.from_logits)

    def boundary(self, x, label, target):
        """f = z_t - z_y per example and its input gradient."""

        def summed(point):
            z = self.scores(point)
            f = tf.gather(z, target, batch_dims=1) - tf.gather(z, label, batch_dims=1)
            return tf.reduce_sum(f), f

        (gradient,), f = differentiate_inputs(summed, x)
        return tf.cast(f, x.dtype), gradient

    def step(self, x, x_k, label, target, low, high):
        """x_{k+1} from x_k: both projections onto the linearised boundary, mixed."""
        n = tf.shape(x)[0]
        f, gradient = self.boundary(x_k, label, target)
        w = tf.reshape(gradient, [n, -1])
        flat_k, flat_0 = tf.reshape(x_k, [n, -1]), tf.reshape(x, [n, -1])
        offset = tf.reduce_sum(w * flat_k, axis=1) - f
        if low is not None:
            low = tf.tile(tf.reshape(tf.broadcast_to(low, tf.shape(x)), [n, -1]), [2, 1])
            high = tf.tile(tf.reshape(tf.broadcast_to(high, tf.shape(x)), [n, -1]), [2, 1])
        moves = project_hyperplane(
            tf.concat([flat_k, flat_0], 0),
            tf.concat([w, w], 0),
            tf.concat([offset, offset], 0),
            self.p,
            low,
            high,
        )
        size = tf.maximum(distances(moves, self.p), 1e-8)
        a = tf.minimum(size[:n] / (size[:n] + size[n:]), self.alpha_max)[:, None]
        mixed = (1.0 - a) * (flat_k + self.eta * moves[:n]) + a * (flat_0 + self.eta * moves[n:])
        return tf.reshape(mixed, tf.shape(x))

    def run(self, x, label, target, epsilon, start_radius, low, high, seed) -> FabResult:
        rank = x.shape.rank
        epsilon = tf.cast(epsilon, x.dtype)
        start_radius = tf.cast(start_radius, x.dtype)
        if self.p == 1:
            noise = random_on_sphere(tf.shape(x), 1, start_radius, seed, x.dtype)
        else:
            noise = random_start_point(tf.shape(x), self.p, start_radius, seed, x.dtype)
        start = box(x + noise, low, high)
        n = tf.shape(x)[0]
        far = tf.fill([n], tf.constant(math.inf, x.dtype))

        def body(k, x_k, best, distance):
            x_next = box(self.step(x, x_k, label, target, low, high), low, high)
            z = self.scores(x_next)
            wrong = tf.not_equal(tf.argmax(z, axis=1, output_type=tf.int32), label)
            gap = distances(x_next - x, self.p)
            closer = wrong & (gap < distance)
            best = tf.where(_rows(closer, rank), x_next, best)
            distance = tf.where(closer, gap, distance)
            back = x + self.beta * (x_next - x)
            x_next = tf.where(_rows(wrong, rank), back, x_next)
            return k + 1, x_next, best, distance

        def cond(k, x_k, best, distance):
            undecided = tf.math.is_inf(epsilon) | ~tf.reduce_all(_within(distance, epsilon))
            return (k < self.steps) & undecided

        _, _, best, distance = tf.while_loop(cond, body, (tf.constant(0), start, x, far))
        return FabResult(best, distance)


def _fab_fn(model_ref, loss_fn, from_logits, p, steps, alpha_max, eta, beta):
    """Kernel builder: the FAB-T loop for one batch."""
    del loss_fn
    return _FabLoop(model_ref, from_logits, p, steps, alpha_max, eta, beta).run


def _check_fab(epsilon, p, targets, steps, restarts, clip, alpha_max, eta, beta):
    if not _checks.is_number(epsilon) or not float(epsilon) >= 0:
        raise ValueError(
            f"`epsilon` must be a number >= 0 (math.inf allowed). Received: epsilon={epsilon!r}"
        )
    epsilon = float(epsilon)
    p = ball_norm(p)
    targets = _checks.check_count(targets, "targets")
    steps = _checks.check_count(steps, "steps")
    restarts = _checks.check_count(restarts, "restarts")
    if restarts > 1 and math.isinf(epsilon):
        raise ValueError(
            "Restarts start at random points of radius epsilon / 2: they need a finite "
            f"`epsilon`. Received: epsilon={epsilon}, restarts={restarts}"
        )
    alpha_max = _checks.check_unit_interval(alpha_max, "alpha_max")
    eta = _checks.check_positive(eta, "eta")
    beta = _checks.check_unit_interval(beta, "beta")
    return epsilon, p, targets, steps, restarts, _checks.check_clip(clip), alpha_max, eta, beta


def fab(
    model: keras.Model,
    x: Any,
    y: Any,
    epsilon: float,
    p: PValue = math.inf,
    targets: int = 9,
    steps: int = 100,
    restarts: int = 1,
    clip: Clip = (0.0, 1.0),
    seed: Any = None,
    *,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    from_logits: bool | None = None,
    return_correct: bool = False,
    jit_compile: bool | None = None,
) -> tf.Tensor | AttackResult:
    """FAB-T (Croce and Hein 2020), targeted, on a batch of a classifier's inputs.

    For each of the `targets` classes other than the label with the highest
    clean scores in turn, and for each restart, runs `steps` FAB iterations
    (module docstring) on the examples no earlier run broke within
    `epsilon` (AutoAttack's protocol). Examples misclassified at x are not
    attacked. The defaults are AutoAttack's standard version.

    Args:
        model: A Keras classifier. Its outputs are read as logits, or as
            probabilities (through their logarithm) when `from_logits` is False.
        x: A batch of inputs (a single floating tensor).
        y: Integer labels (batch,) or (batch, 1), or one-hot targets.
        epsilon: The radius at which an example counts as broken, >= 0;
            `math.inf` keeps the first misclassified point found per example
            (the closest one of its run).
        p: 1, 2 or `math.inf` ("inf"): the norm FAB minimises.
        targets: How many target classes (at most classes - 1).
        steps: Iterations per run, >= 1.
        restarts: Runs per target, >= 1: the first from x, the others from a
            random point at distance epsilon / 2 (needs a finite epsilon).
        clip: The box (low, high) inputs live in, or None for no box.
        seed: Integer for reproducible restarts; None draws a fresh seed.
        alpha_max: The largest weight of the projection of x in a step.
        eta: The overshoot of each projection, >= 1 in practice.
        beta: The step back towards x after a misclassified iterate.
        from_logits: Whether the outputs are logits; None reads the compiled
            loss's `from_logits` (logits when there is none).
        return_correct: Also return whether the model still classifies each
            example correctly at its point.
        jit_compile: True/False to force XLA on or off; None uses XLA only
            for eager calls with a GPU visible.

    Returns:
        The adversarial batch, shaped like `x`: per example the closest
        misclassified point found if within `epsilon`, else x. With
        `return_correct`, `AttackResult(x_adv, correct)`.

    Raises:
        ValueError: On an invalid argument, before any work.
    """
    epsilon, p, targets, steps, restarts, clip, alpha_max, eta, beta = _check_fab(
        epsilon, p, targets, steps, restarts, clip, alpha_max, eta, beta
    )
    return_correct = _checks.check_bool(return_correct, "return_correct")
    seed = seed_tensor(seed)
    x, y = check_inputs(x, y)
    if from_logits is None:
        from_logits = loss_from_logits(model, None)
    classes = count_classes(model, x)
    rank = min(targets, classes - 1)
    clean = clean_scores(model, x, y, from_logits, classes, rank, jit_compile)
    kernel = compiled_kernel(
        model,
        None,
        _fab_fn,
        resolve=False,
        from_logits=from_logits,
        p=p,
        steps=steps,
        alpha_max=alpha_max,
        eta=eta,
        beta=beta,
    )
    low, high = bounds(clip, x)
    radius = tf.constant(epsilon, x.dtype)

    def run(active, target, restart, run_seed) -> RunOutcome:
        result = kernel(
            tf.gather(x, active),
            tf.gather(clean.labels, active),
            tf.gather(clean.ranking[:, target], active),
            radius,
            tf.constant(0.0 if restart == 0 else epsilon / 2, x.dtype),
            low,
            high,
            run_seed,
            jit_compile=jit_compile,
        )
        return RunOutcome(result.x_adv, ~_within(result.distance, radius))

    x_adv, correct = keep_best_runs(x, clean.correct, seed, restarts, run, rank)
    return attack_result(x_adv, correct, return_correct)


fab_with_correct = deprecated_twin(fab, "fab_with_correct")
