"""What the regularised term is: one entry per estimator, each with its formula.

`ESTIMATORS` maps `GradientRegularizer.method` to its entry, looked up once
per step by `objective.objective_branches`. Each entry's `objective` is
L(x) + scale * T on the batch (scale = `every`), and its `on_rows` is T on a
random subset's rows (`fraction < 1`). *When* the term is computed (the
`every`/`fraction` switch, sigma = 0) is `keras_gradreg.objective`'s part.

From `RegularizedModel.train_step` to the formula is 3 hops:

1. `RegularizedModel.train_step` calls `RegularizedModel.regularized_step`;
2. `regularized_step` calls `RegularizedModel._branch_gradients` (through
   its `tf.switch_case` over the step's branches, each an XLA computation
   with `jit_compile`);
3. `_branch_gradients` calls `branches.functions[index]()`, which for the
   regularised branch is the entry's `objective` (e.g.
   `Penalty.objective`), where the formula is.

With `fraction < 1` the third call is `objective.subset_objective`, and the
entry's `on_rows` is a fourth. `kgr.regularized_loss` in a custom loop
reaches the same `objective` through `objective.regularized_objective`.

The input gradient g is that of the *reduced* loss, so row i is
c_i * d l_i / d x_i with c_i the loss's weight of example i: the sum of the
rows' norms is the penalty reduced exactly like the loss.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import keras
import tensorflow as tf

from keras_gradreg import _hashing as hashing
from keras_gradreg._ascent import ascent_step, box
from keras_gradreg._kl import KLDivergence
from keras_gradreg._randomness import SharedRandomness
from keras_gradreg._subsets import batch_size_of
from keras_gradreg.balls import random_in_ball
from keras_gradreg.gradients import (
    concat_per_example,
    differentiate_inputs,
    floating_inputs,
    loss_from_logits,
    replace_floating_inputs,
    split_per_example,
)
from keras_gradreg.norms import dual_norm, worst_case_perturbation

Forward = Callable[..., tuple[Any, tf.Tensor]]
"""One forward pass: `forward(x, rows=None, example_scale=None) -> (predictions, loss)`.

The loss is reduced to a scalar.

With `GradientRegularizer(fraction < 1)` it is also called with `rows`, the
int32 indices of a subset of the batch: `x` is then those rows' input, and
the loss is that of those rows (of the targets and sample weights), reduced
over them. `example_scale`, one float32 per row of `x`, multiplies the
sample weights (`_subsets.scale_rows`): "finite_difference" differentiates
the loss with respect to it for each example's part of the loss.
"""

# The scale of TRADES's Gaussian start (Zhang et al.'s code).
TRADES_START_SCALE = 0.001


class RegularizedLossResult(NamedTuple):
    """The regularised objective of one batch and its parts.

    Losses are scalars reduced as the loss function reduces them (under a
    `tf.distribute` strategy, Keras's default reduction also divides by the
    number of replicas).

    Attributes:
        total: The objective to differentiate: `data_loss + penalty` for
            "penalty" and "finite_difference", `clean_weight * data_loss +
            (1 - clean_weight) * penalty` for "adversarial", `data_loss` when
            sigma is 0. With `every` or `fraction` (see
            `kgr.GradientRegularizer`), `data_loss + every * T_S` on the steps
            that compute the term T and `data_loss` on the others. Under loss
            scaling, when the input gradient overflowed, it is NaN and so are
            its parameter gradients (a `LossScaleOptimizer` then skips the step).
        data_loss: The clean loss L(x) of the whole batch.
        penalty: sigma * ||g||_q ("penalty"), its finite-difference estimate
            ("finite_difference"), the loss at x + r* ("adversarial"), each
            on the step's subset with `fraction < 1` (an unbiased estimate of
            the whole batch's) and not multiplied by `every`; 0 when sigma is
            0 and on the steps that skip the term.
        y_pred: The model's output on the clean x (for metrics).
    """

    total: tf.Tensor
    data_loss: tf.Tensor
    penalty: tf.Tensor
    y_pred: Any


class Passes(NamedTuple):
    """How one step runs its forward passes: what every estimator is given.

    Attributes:
        model: The model `forward` calls (its seed generators and
            non-trainable variables are the state the passes share or restore).
        forward: The forward pass (see `Forward`).
        loss_scale: The mixed-precision loss scale for the input gradient, or None.
        extra_state: More variables a forward pass changes that a probing
            pass must leave untouched (e.g. per-output loss trackers).
        divergence: The KL of "trades" (`Trades.divergence`); None otherwise.
    """

    model: keras.layers.Layer
    forward: Forward
    loss_scale: float | tf.Tensor | None = None
    extra_state: list | tuple = ()
    divergence: KLDivergence | None = None


class Rows(NamedTuple):
    """The random subset of a batch that `fraction < 1` computes the term on.

    Attributes:
        indices: The rows' indices in this replica's batch (int32).
        x: Their model input.
        batch: The whole batch's model input.
    """

    indices: tf.Tensor
    x: Any
    batch: Any

    def positions(self) -> tf.Tensor:
        """The rows' positions in the global batch (random starts are keyed by them)."""
        return global_positions(batch_size_of(self.batch), self.indices)


# ---------------------------------------------------------------------- #
# The estimators.
# ---------------------------------------------------------------------- #


class Estimator:
    """An estimator's entry: `objective` on the batch, `on_rows` on a subset."""

    # Whether the entry needs `Passes.divergence`.
    needs_divergence = False

    def objective(
        self, passes: Passes, x: Any, regularizer, scale: int = 1, clean_gradient: bool = True
    ) -> RegularizedLossResult:
        """L(x) + scale * T on the batch, with `penalty` T (`clean_gradient`: see `Adversarial`)."""
        raise NotImplementedError

    def on_rows(self, passes: Passes, rows: Rows, regularizer, loss: tf.Tensor) -> tuple:
        """`(penalty, term, overflow)` on `rows`; the step adds `every * term + overflow` to L."""
        raise NotImplementedError

    def logged(self, loss: RegularizedLossResult, regularizer, computed) -> tf.Tensor:
        """The objective L + T that `fit` logs as `loss` (the term not multiplied by `every`)."""
        del regularizer, computed
        return loss.data_loss + loss.penalty

    def skips_clean_gradient(self, regularizer) -> bool:
        """Whether clean_weight = 0 leaves the clean loss out of the differentiated total."""
        del regularizer
        return False

    def divergence(self, loss: Any, sample_weight: Any, name: str) -> KLDivergence | None:
        """What `Passes.divergence` holds for a model trained with `loss`."""
        del loss, sample_weight, name
        return None


class Penalty(Estimator):
    """Method "penalty": T = sigma * sum_i ||g_i||_q, g = grad_x L(x), exact.

    The input gradient g comes from an inner tape; differentiating `total`
    with an outer tape around the call differentiates through it (double
    backpropagation).
    """

    def objective(self, passes, x, regularizer, scale=1, clean_gradient=True):
        del clean_gradient  # The penalty and L share their pass.
        y_pred, loss, g = clean_pass_and_input_gradient(passes, x)
        penalty = self.term(g, regularizer, loss.dtype)
        total = loss + times(scale, penalty) + nan_gradient_unless_finite(penalty, loss)
        return RegularizedLossResult(total, loss, penalty, y_pred)

    def on_rows(self, passes, rows, regularizer, loss):
        _, _, g = clean_pass_and_input_gradient(passes, rows.x)
        penalty = self.term(g, regularizer, loss.dtype)
        return penalty, penalty, nan_gradient_unless_finite(penalty, loss)

    @staticmethod
    def term(g: tf.Tensor, regularizer, dtype) -> tf.Tensor:
        """sigma * the sum of the rows' dual norms (each row already weighted by the loss)."""
        norms = dual_norm(g, regularizer.p)
        return tf.cast(regularizer.sigma_tensor() * tf.reduce_sum(norms), dtype)


class _Moved(Estimator):
    """The estimators with a second pass at x + r, r held constant (see `clean_and_moved_passes`).

    r is the closed-form r*(g) of radius `radius`, or the last iterate of
    the ascent from `start` on `ascent_value` (multi-step "adversarial",
    "trades").
    """

    def radius(self, regularizer) -> float | tf.Tensor:
        raise NotImplementedError

    def rows_passes(self, passes: Passes, rows: Rows, regularizer):
        """`clean_and_moved_passes` on a subset's rows, starts keyed by their positions."""
        return clean_and_moved_passes(passes, rows.x, regularizer, self, rows.positions())


class FiniteDifference(_Moved):
    """Method "finite_difference": T = (sigma / h) sum_i |c_i (l_i(x + h r*) - l_i(x))|.

    h is `fd_step`, c_i l_i example i's part of the reduced loss (its weight, the batch
    mean's 1 / n and the replicas' division in c_i). r* = argmax_{||r||_p <= 1}
    g . r is the direction of steepest ascent, so each difference estimates
    h c_i ||g_i||_q with one more forward pass and no double backpropagation.
    The absolute value, per example, keeps L + T bounded below for any
    sigma: without it the objective is (1 - sigma/h) L(x) + (sigma/h) L(x + h r*),
    which training drives to minus infinity once sigma > h (docs/method.md).
    """

    def objective(self, passes, x, regularizer, scale=1, clean_gradient=True):
        del clean_gradient
        y_pred, loss, parts = self._passes_and_parts(passes, x, regularizer)
        penalty = self.term(regularizer, *parts, loss.dtype)
        return RegularizedLossResult(loss + times(scale, penalty), loss, penalty, y_pred)

    def on_rows(self, passes, rows, regularizer, loss):
        _, rows_loss, parts = self._passes_and_parts(passes, rows.x, regularizer)
        penalty = self.term(regularizer, *parts, rows_loss.dtype)
        return penalty, penalty, tf.zeros_like(loss)

    def radius(self, regularizer):
        return regularizer.fd_step

    def _passes_and_parts(self, passes, x, regularizer):
        """`(y_pred, loss, (clean_parts, moved_parts))`: each example's part of both losses.

        Example i's part is d loss / d s_i at s = 1 where the sample weights
        are multiplied by s (`Forward`), for a reduction linear in the
        weights (`objective.check_loss_reduction`). This tape records only the loss's
        weighting, not the model.
        """
        example_scale = tf.ones([batch_size_of(x)])
        # Every pass is weighted by this step's `example_scale`.
        forward = functools.partial(passes.forward, example_scale=example_scale)
        with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
            tape.watch(example_scale)
            (y_pred, loss), (_, moved_loss) = clean_and_moved_passes(
                passes._replace(forward=forward), x, regularizer, self
            )
        parts = tuple(tape.gradient(value, example_scale) for value in (loss, moved_loss))
        if any(part is None for part in parts):  # Found when the step is traced.
            raise ValueError(
                'method="finite_difference" reads each example\'s part of the loss '
                "through its sample weight, and this loss does not use `sample_weight` "
                "(a `compute_loss` override must pass it to the loss). Received: a loss "
                "that does not depend on sample_weight"
            )
        return y_pred, loss, parts

    @staticmethod
    def term(regularizer, clean_parts: tf.Tensor, moved_parts: tf.Tensor, dtype) -> tf.Tensor:
        """(sigma / h) * the sum of the examples' absolute differences."""
        difference = tf.reduce_sum(tf.abs(moved_parts - clean_parts))
        sigma = tf.cast(regularizer.sigma_tensor(), difference.dtype)
        return tf.cast(sigma * difference / regularizer.fd_step, dtype)


class Adversarial(_Moved):
    """Method "adversarial": total = clean_weight * L(x) + (1 - clean_weight) * L(x + r).

    r = r*(g) = argmax_{||r||_p <= sigma} g . r in closed form (one step),
    or the last iterate of `steps` ascent steps on L from x or from a
    random point of the ball (`random_start`), projected into the ball and
    the `clip` box. `penalty` is L(x + r).
    """

    def objective(self, passes, x, regularizer, scale=1, clean_gradient=True):
        (y_pred, loss), (_, moved_loss) = clean_and_moved_passes(passes, x, regularizer, self)
        clean_weight, moved_weight = _adversarial_weights(regularizer, scale, loss.dtype)
        total = moved_weight * moved_loss
        if clean_gradient:  # False only at clean_weight 0, so that L(x) is not differentiated.
            total = clean_weight * loss + total
        return RegularizedLossResult(total, loss, moved_loss, y_pred)

    def on_rows(self, passes, rows, regularizer, loss):
        (_, rows_loss), (_, moved_loss) = self.rows_passes(passes, rows, regularizer)
        weight = 1.0 - tf.cast(regularizer.clean_weight_tensor(), loss.dtype)
        return moved_loss, weight * (moved_loss - rows_loss), tf.zeros_like(loss)

    def logged(self, loss, regularizer, computed):
        weight = tf.cast(regularizer.clean_weight_tensor(), loss.data_loss.dtype)
        mixed = weight * loss.data_loss + (1.0 - weight) * loss.penalty
        return tf.where(computed, mixed, loss.data_loss)

    def skips_clean_gradient(self, regularizer):
        return regularizer.every == 1 and regularizer.fraction == 1.0

    def radius(self, regularizer):
        return regularizer.sigma_tensor()

    @staticmethod
    def start(seed, x_flat, size, positions, regularizer, sigma, low, high) -> tf.Tensor:
        """A uniform point of the ball around x, then into the box."""
        del size
        start = random_in_ball(tf.shape(x_flat), regularizer.p, sigma, seed, positions=positions)
        return box(x_flat + start, low, high)

    @staticmethod
    def ascent_value(ascent: _Ascent, y_pred: Any, loss: tf.Tensor) -> tf.Tensor:
        """What the ascent climbs: the loss L(x + r)."""
        del ascent, y_pred
        return tf.cast(loss, tf.float32)


class Trades(_Moved):
    """Method "trades": T = beta * KL(f(x) || f(x + r)), reduced like the loss.

    r is the last iterate of `steps` ascent steps on the summed KL from
    x + 0.001 N(0, 1) (Zhang et al.'s code), projected into the ball of
    radius sigma and the `clip` box.
    """

    needs_divergence = True

    def objective(self, passes, x, regularizer, scale=1, clean_gradient=True):
        del clean_gradient
        (y_pred, loss), (moved_pred, _) = clean_and_moved_passes(passes, x, regularizer, self)
        penalty = self.term(regularizer, passes.divergence, y_pred, moved_pred, loss.dtype)
        return RegularizedLossResult(loss + times(scale, penalty), loss, penalty, y_pred)

    def on_rows(self, passes, rows, regularizer, loss):
        (rows_pred, _), (moved_pred, _) = self.rows_passes(passes, rows, regularizer)
        divergence = passes.divergence
        penalty = self.term(
            regularizer, divergence, rows_pred, moved_pred, loss.dtype, rows.indices
        )
        return penalty, penalty, tf.zeros_like(loss)

    def divergence(self, loss, sample_weight, name):
        return trades_divergence(loss, sample_weight, name)

    @staticmethod
    def term(regularizer, divergence, clean_pred, moved_pred, dtype, rows=None) -> tf.Tensor:
        kl = divergence.reduced(clean_pred, moved_pred, rows)
        return tf.cast(regularizer.beta * kl, dtype)

    @staticmethod
    def start(seed, x_flat, size, positions, regularizer, sigma, low, high) -> tf.Tensor:
        """The reference code's start: x + 0.001 N(0, 1), not projected."""
        del regularizer, sigma, low, high
        return x_flat + TRADES_START_SCALE * hashing.normal(seed, positions, size)

    @staticmethod
    def ascent_value(ascent: _Ascent, y_pred: Any, loss: tf.Tensor) -> tf.Tensor:
        """What the ascent climbs: the summed KL(f(x) || f(x + r))."""
        del loss
        return tf.reduce_sum(ascent.passes.divergence.per_example(ascent.clean_pred, y_pred))


ESTIMATORS: dict[str, Estimator] = {
    "penalty": Penalty(),
    "finite_difference": FiniteDifference(),
    "adversarial": Adversarial(),
    "trades": Trades(),
}


def trades_divergence(loss: Any, sample_weight: Any, name: str = "loss") -> KLDivergence:
    """The KL of "trades" for a model trained with `loss` (which says whether outputs are logits).

    Raises:
        ValueError: If `loss` does not say whether it takes logits.
    """
    return KLDivergence(trades_from_logits(loss, name), sample_weight)


def trades_from_logits(loss: Any, name: str) -> bool:
    """Whether `loss` takes logits, read from its `from_logits`; raises if it does not say."""
    from_logits = loss_from_logits(None, loss)
    if from_logits is None:
        raise ValueError(
            'method="trades" needs to know whether the model outputs logits or '
            "probabilities: use a loss with a `from_logits` setting (e.g. "
            "keras.losses.SparseCategoricalCrossentropy(from_logits=True)). "
            f"Received: {name}={loss!r}"
        )
    return from_logits


# ---------------------------------------------------------------------- #
# The passes.
# ---------------------------------------------------------------------- #


def clean_pass_and_input_gradient(passes: Passes, x: Any):
    """The clean pass and the per-example gradient of its reduced loss, float32.

    Returns `(y_pred, loss, rows)`: row i of `rows` is the gradient of the
    reduced loss with respect to example i's floating inputs, flattened and
    concatenated, unscaled.
    """
    forward, loss_scale = passes.forward, passes.loss_scale

    def scaled_loss(inputs):
        y_pred, loss = forward(inputs)
        target = loss if loss_scale is None else loss * tf.cast(loss_scale, loss.dtype)
        return target, (y_pred, loss)

    gradients, (y_pred, loss) = differentiate_inputs(scaled_loss, x)
    rows = concat_per_example(gradients)
    if loss_scale is not None:
        rows = rows / tf.cast(loss_scale, rows.dtype)
    return y_pred, loss, rows


def clean_and_moved_passes(passes: Passes, x: Any, regularizer, estimator: _Moved, positions=None):
    """The clean pass and the pass at x + r, same masks, no trace: ((y_pred, loss), moved).

    `moved` is the pair (predictions, loss) at x + r. Every pass after the
    clean one (the ascent's and the moved one) redraws the clean pass's
    dropout masks, and they leave no trace in the model's state (BatchNorm
    statistics) or in `extra_state`. A NaN r (overflowed input gradient)
    makes the moved loss, hence the parameter gradients, NaN.

    Args:
        positions: The rows' positions in the global batch (random starts
            are keyed by them); None: this replica's rows of the batch.
    """
    forward = passes.forward
    with SharedRandomness(passes.model, passes.extra_state) as shared:
        if regularizer.draws_starts:  # The ascent does not start at x: no gradient there.
            (y_pred, loss), rows = forward(x), None
        else:
            y_pred, loss, rows = clean_pass_and_input_gradient(passes, x)
        shared.keep_state()

        def replay(inputs):
            shared.replay()
            return forward(inputs)

        inputs = floating_inputs(x)
        if regularizer.ascends:
            if positions is None:
                positions = global_positions(batch_size_of(x))
            ascent = _Ascent(replay, x, regularizer, passes, y_pred, estimator)
            r = ascent.run(rows, positions)
        else:
            r = _closed_form_perturbation(rows, inputs, regularizer, estimator.radius(regularizer))
        steps = split_per_example(tf.stop_gradient(r), inputs)
        x_moved = replace_floating_inputs(x, [t + step for t, step in zip(inputs, steps)])
        moved = replay(x_moved)
    return (y_pred, loss), moved


def _closed_form_perturbation(rows, inputs, regularizer, radius) -> tf.Tensor:
    """r* of `radius`, then into the box (flat rows)."""
    r = worst_case_perturbation(rows, regularizer.p, radius)
    if regularizer.clip is None:
        return r
    x_flat = concat_per_example(inputs)
    low, high = _clip_bounds(regularizer)
    return box(x_flat + r, low, high) - x_flat


class _Ascent:
    """The ascent of multi-step "adversarial" and "trades" on flat per-example rows.

    Args:
        replay: A forward pass with the step's masks.
        x: The clean batch.
        regularizer: The settings.
        passes: The step's passes (the loss scale scales the ascent's
            objective; the divergence is that of "trades").
        clean_pred: f(x), the KL's fixed first argument.
        estimator: Its `start` and `ascent_value`.
    """

    def __init__(self, replay, x, regularizer, passes, clean_pred, estimator):
        self.replay, self.x, self.regularizer = replay, x, regularizer
        self.passes, self.estimator = passes, estimator
        self.clean_pred = tf.nest.map_structure(tf.stop_gradient, clean_pred)
        self.inputs = floating_inputs(x)

    def run(self, first_gradient, positions) -> tf.Tensor:
        """r: the last iterate minus x, float32, shape (batch, input size)."""
        regularizer = self.regularizer
        x_flat = concat_per_example(self.inputs)
        sigma = regularizer.sigma_tensor()
        low, high = _clip_bounds(regularizer)
        x_adv, gradient = x_flat, first_gradient
        if regularizer.draws_starts:
            seed = regularizer.start_seed_generator().next()
            size = tf.shape(x_flat)[1]
            start = self.estimator.start(
                seed, x_flat, size, positions, regularizer, sigma, low, high
            )
            x_adv, gradient = start, None
        step_length = regularizer.step_size * sigma
        for _ in range(regularizer.steps):
            if gradient is None:
                gradient = self._gradient(x_adv)
            x_adv = ascent_step(
                x_flat, x_adv, gradient, regularizer.p, step_length, sigma, low, high
            )
            gradient = None
        return x_adv - x_flat

    def _gradient(self, x_adv: tf.Tensor) -> tf.Tensor:
        """The gradient of the ascent's objective at `x_adv` (flat rows, float32)."""
        point = replace_floating_inputs(self.x, split_per_example(x_adv, self.inputs))
        loss_scale = self.passes.loss_scale

        def objective(inputs):
            y_pred, loss = self.replay(inputs)
            value = self.estimator.ascent_value(self, y_pred, loss)
            if loss_scale is not None:
                value = value * tf.cast(loss_scale, value.dtype)
            return value, None

        gradients, _ = differentiate_inputs(objective, point)
        return concat_per_example(gradients)


# ---------------------------------------------------------------------- #
# Pieces.
# ---------------------------------------------------------------------- #


def global_positions(batch_size, rows: tf.Tensor | None = None) -> tf.Tensor:
    """Each row's position in the global batch (int32): replica index * batch + row.

    Random starts are keyed by it, so 1 replica and 2 draw the same numbers
    (a strategy splits the global batch into equal consecutive parts).

    Args:
        batch_size: This replica's batch size.
        rows: The rows of this replica's batch to place; None: all of them.
    """
    context = tf.distribute.get_replica_context()
    replica = 0 if context is None else context.replica_id_in_sync_group
    offset = tf.cast(replica, tf.int32) * tf.cast(batch_size, tf.int32)
    local = tf.range(batch_size) if rows is None else tf.cast(rows, tf.int32)
    return offset + local


def _clip_bounds(regularizer):
    """The ascent's box as float32 tensors, or (None, None)."""
    if regularizer.clip is None:
        return None, None
    return tuple(tf.constant(bound, tf.float32) for bound in regularizer.clip)


def _adversarial_weights(regularizer, scale: int, dtype):
    """Weights of L(x) and L(x + r*): (clean_weight, 1 - clean_weight), moved one times `scale`.

    The clean weight makes the two sum to 1, so that the step minimises
    L(x) + scale * (1 - clean_weight) * (L(x + r*) - L(x)).
    """
    clean_weight = tf.cast(regularizer.clean_weight_tensor(), dtype)
    if scale == 1:
        return clean_weight, 1.0 - clean_weight
    moved_weight = scale * (1.0 - clean_weight)
    return 1.0 - moved_weight, moved_weight


def times(scale: int, value: tf.Tensor) -> tf.Tensor:
    """`scale * value`, with no op when `scale` is 1."""
    return value if scale == 1 else scale * value


def nan_gradient_unless_finite(penalty: tf.Tensor, loss: tf.Tensor) -> tf.Tensor:
    """0 while `penalty` is finite; NaN, with NaN parameter gradients, otherwise.

    For p = 1 and p = inf the gradient of a NaN norm row (an overflowed
    loss-scaled input gradient) is 0, not NaN; this term makes it NaN so a
    `LossScaleOptimizer` skips the step and lowers its scale. It costs a
    scalar: backprop meets `loss` once.
    """
    overflow = tf.cast(tf.where(tf.math.is_finite(penalty), 0.0, float("nan")), loss.dtype)
    return overflow * tf.where(tf.math.is_finite(loss), loss, tf.zeros_like(loss))
