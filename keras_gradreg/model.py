"""`RegularizedModel`: a `keras.Model` trained on the regularised objective."""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import keras
import tensorflow as tf
from keras.src.losses.loss import unscale_loss_for_distribution
from keras.src.models.functional import Functional
from keras.src.models.model import functional_init_arguments
from keras.src.saving import object_registration
from keras.src.trainers.trainer import Trainer

from keras_gradreg import randomness
from keras_gradreg.gradients import (
    concat_per_example,
    floating_inputs,
    replace_floating_inputs,
    split_per_example,
    zeros_for_missing,
)
from keras_gradreg.norms import dual_norm, worst_case_perturbation
from keras_gradreg.regularizer import GradientRegularizer
from keras_gradreg.train_function import make_distributed_function

_EVAL_ONLY_EXCLUDED = ("data_loss", "penalty")
_SEED_STATE_KEY = "seed_generator_state_"


class StepResult(NamedTuple):
    """What one regularised forward/backward pass produces (per replica).

    Losses are as Keras computes them: already divided by the number of
    replicas under a `tf.distribute` strategy.
    """

    gradients: list
    y_pred: Any
    total_loss: tf.Tensor
    data_loss: tf.Tensor
    penalty: tf.Tensor


def _batch_size(x) -> tf.Tensor:
    """Examples in a batch: the leading dimension of its first input tensor."""
    return tf.shape(next(t for t in tf.nest.flatten(x) if t is not None))[0]


def _as_regularizer(regularizer: Any) -> GradientRegularizer:
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


def _is_default_strategy(strategy) -> bool:
    return type(strategy).__name__ == "_DefaultDistributionStrategy"


_FUNCTIONAL_VARIANTS: dict[type, type] = {}


def _functional_variant(cls: type) -> type:
    """`cls` combined with `Functional`, made once and cached.

    Keras makes a `Model` subclass functional by rewriting the `__bases__` of
    the class and of all its parents, which would break every later
    subclassed use of `RegularizedModel` in the same process. A separate class
    leaves the original hierarchy untouched. It is saved under `cls`'s
    registered name, so loading goes back through `cls`.
    """
    variant = _FUNCTIONAL_VARIANTS.get(cls)
    if variant is None:
        variant = type(
            cls.__name__,
            (cls, Functional),
            {"__module__": cls.__module__, "__qualname__": cls.__qualname__},
        )
        object_registration.GLOBAL_CUSTOM_NAMES[variant] = object_registration.get_registered_name(
            cls
        )
        _FUNCTIONAL_VARIANTS[cls] = variant
    return variant


@keras.saving.register_keras_serializable(package="keras_gradreg")
class RegularizedModel(keras.Model):
    """A `keras.Model` whose `fit` minimises L + sigma * ||grad_x L||_q.

    Use it like `keras.Model`, functionally or by subclassing:

    ```python
    reg = kgr.GradientRegularizer(p=2, sigma=0.1, method="penalty")
    model = kgr.RegularizedModel(inputs, outputs, regularizer=reg)

    class Net(kgr.RegularizedModel):
        def __init__(self, **kwargs):
            super().__init__(regularizer=reg, **kwargs)
            self.dense = keras.layers.Dense(10)

        def call(self, x):
            return self.dense(x)
    ```

    The input gradient is the gradient of each example's own loss (the
    compiled loss, with sample and class weights) over every floating-point
    input, the norm running over all of them together. `fit` logs `loss`
    (the regularised objective), `data_loss` (the clean loss) and `penalty`
    (sigma * ||g||_q for "penalty" and "finite_difference"; the loss at
    x + r* for "adversarial"). `evaluate` reports clean metrics only. All
    forward passes of one step share the step's dropout masks.

    Args:
        *args: As for `keras.Model` (`inputs, outputs` for a functional model).
        regularizer: A `kgr.GradientRegularizer`, a dict of its arguments, or
            None for the defaults.
        **kwargs: As for `keras.Model`.
    """

    def __new__(cls, *args, **kwargs):
        if functional_init_arguments(args, kwargs) and not issubclass(cls, Functional):
            variant = _functional_variant(cls)
            return variant.__new__(variant, *args, **kwargs)
        return super().__new__(cls, *args, **kwargs)

    def __init__(self, *args, regularizer: Any = None, **kwargs):
        regularizer = _as_regularizer(regularizer)
        if isinstance(self, Functional):
            Trainer.__init__(self)
            Functional.__init__(self, *args, **kwargs)
        else:
            keras.Model.__init__(self, *args, **kwargs)
        self._regularizer = regularizer
        self._data_loss_tracker = keras.metrics.Mean(name="data_loss")
        self._penalty_tracker = keras.metrics.Mean(name="penalty")

    @property
    def regularizer(self) -> GradientRegularizer:
        """The `kgr.GradientRegularizer` used by `fit`."""
        return self._regularizer

    @regularizer.setter
    def regularizer(self, value: Any) -> None:
        self._regularizer = _as_regularizer(value)
        if self.train_function is not None:
            # Rebuilt, not dropped: `fit` calls `self.train_function` each step,
            # so a callback may change the regularizer between epochs.
            self.make_train_function(force=True)

    # ------------------------------------------------------------------ #
    # Training.
    # ------------------------------------------------------------------ #

    def make_train_function(self, force: bool = False):
        """Builds `fit`'s step; under a strategy, XLA compiles each replica.

        Without a strategy this is Keras's own (with `jit_compile=True`, XLA
        compiles the whole step). Under a tf.distribute strategy, each
        replica's forward and backward passes (`regularized_step`, nested
        tapes included) are one XLA computation when `jit_compile` is True,
        and the gradient all-reduce and optimizer update run outside it; see
        `keras_gradreg.train_function`.
        """
        if self.train_function is not None and not force:
            return self.train_function
        self._replica_step = None
        if _is_default_strategy(self.distribute_strategy):
            return super().make_train_function(force=force)
        if self.jit_compile and not self.run_eagerly:
            self._replica_step = tf.function(
                self.regularized_step, jit_compile=True, reduce_retracing=True
            )
        self.train_function = make_distributed_function(self, self.train_step)
        return self.train_function

    def make_test_function(self, force: bool = False):
        """Builds `evaluate`'s step; under a strategy, XLA compiles each replica's forward pass.

        The loss and metrics are then computed outside XLA, as in `fit`.
        """
        if self.test_function is not None and not force:
            return self.test_function
        self._replica_forward = None
        if _is_default_strategy(self.distribute_strategy):
            return super().make_test_function(force=force)
        if self.jit_compile and not self.run_eagerly:
            self._replica_forward = tf.function(
                self._inference_forward, jit_compile=True, reduce_retracing=True
            )
        self.test_function = make_distributed_function(self, self.test_step)
        return self.test_function

    def _inference_forward(self, x):
        return self(x, training=False) if self._call_has_training_arg else self(x)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Builds the model from one batch's shapes before distributed `fit`.

        Keras 3.15 averages a distributed batch with `strategy.reduce` to get
        those shapes, which raises under `MultiWorkerMirroredStrategy` (even
        for a stock `keras.Model`). The first local replica's batch has the
        same structure and is all the build needs.
        """
        if iterator is not None and self._distribute_strategy is not None:
            for _, _, it in iterator:
                batch = next(it)
                data_batch = tf.nest.map_structure(
                    lambda t: (
                        self._distribute_strategy.experimental_local_results(t)[0]
                        if isinstance(t, tf.distribute.DistributedValues)
                        else t
                    ),
                    batch,
                )
                break
            iterator = None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def fit(self, *args, **kwargs):
        self._check_has_loss()
        return super().fit(*args, **kwargs)

    def _check_has_loss(self) -> None:
        overrides_loss = type(self).compute_loss is not Trainer.compute_loss
        if getattr(self, "_compile_loss", None) is None and not overrides_loss:
            raise ValueError(
                "RegularizedModel penalises the gradient of the training loss, so "
                "it needs one: call `model.compile(loss=...)` with a loss before "
                "`fit`. Received: loss=None"
            )

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        self._check_has_loss()
        step = getattr(self, "_replica_step", None) or self.regularized_step
        result = step(x, y, sample_weight)
        self.optimizer.apply_gradients(zip(result.gradients, self.trainable_weights))
        batch_size = _batch_size(x)
        overflowed = None
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            # A loss-scaled input gradient that overflowed (the dynamic loss
            # scale's normal search) makes the penalty NaN while the clean loss
            # is finite; the optimizer skips the step and the loss and penalty
            # means leave it out. A non-finite clean loss is always shown.
            overflowed = tf.logical_and(
                tf.logical_not(tf.math.is_finite(result.penalty)),
                tf.math.is_finite(result.data_loss),
            )
        for tracker, value, maskable in (
            (self._loss_tracker, result.total_loss, True),
            (self._data_loss_tracker, result.data_loss, False),
            (self._penalty_tracker, result.penalty, True),
        ):
            value = unscale_loss_for_distribution(value)
            weight = tf.cast(batch_size, value.dtype)
            if overflowed is not None and maskable:
                value = tf.where(overflowed, tf.zeros_like(value), value)
                weight = tf.where(overflowed, tf.zeros_like(weight), weight)
            tracker.update_state(value, sample_weight=weight)
        return self.compute_metrics(x, y, result.y_pred, sample_weight=sample_weight)

    def test_step(self, data):
        forward = getattr(self, "_replica_forward", None)
        if forward is None:
            logs = super().test_step(data)
        else:
            # Keras's TensorFlowTrainer.test_step with the forward pass compiled.
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            y_pred = forward(x)
            loss = self._compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=False
            )
            self._loss_tracker.update_state(
                unscale_loss_for_distribution(loss), sample_weight=_batch_size(x)
            )
            logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        return {k: v for k, v in logs.items() if k not in _EVAL_ONLY_EXCLUDED}

    def regularized_step(self, x, y, sample_weight=None) -> StepResult:
        """Computes the regularised loss and its gradients for one batch.

        Updates no weights (only the state a forward pass updates: seed
        generators, BatchNorm statistics, loss trackers), so it can be
        compiled on its own (per replica) and the optimizer applied outside.

        Args:
            x: Model input.
            y: Targets.
            sample_weight: Optional per-example weights.

        Returns:
            A `StepResult`. Its gradients are scaled like the loss by the
            optimizer (loss scaling under mixed precision).
        """
        reg = self._regularizer
        if reg.sigma == 0.0:
            return self._plain_step(x, y, sample_weight)
        if reg.method == "penalty":
            return self._penalty_step(x, y, sample_weight)
        return self._perturbed_step(x, y, sample_weight)

    def _forward_loss(self, x, y, sample_weight):
        if self._call_has_training_arg:
            y_pred = self(x, training=True)
        else:
            y_pred = self(x)
        loss = self._compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
        )
        return y_pred, loss

    def _scale(self, loss):
        return loss if self.optimizer is None else self.optimizer.scale_loss(loss)

    def _loss_scale(self) -> tf.Tensor:
        """The optimizer's loss scale (1 without mixed precision), float32."""
        return tf.cast(self._scale(tf.constant(1.0)), tf.float32)

    def _input_gradient(self, inner_tape, scaled_loss, inputs) -> tf.Tensor:
        """Per-example gradient of the (reduced) loss, flattened, float32.

        Row i is c * w_i * d l_i / d x_i, with c the loss's reduction factor
        (1 / (batch * replicas) for Keras's default), so summing per-row norms
        reduces the penalty exactly like the loss.
        """
        gradients = inner_tape.gradient(scaled_loss, inputs)
        gradients = zeros_for_missing(gradients, inputs)
        return concat_per_example(gradients) / self._loss_scale()

    def _plain_step(self, x, y, sample_weight) -> StepResult:
        with tf.GradientTape() as tape:
            y_pred, loss = self._forward_loss(x, y, sample_weight)
            scaled = self._scale(loss)
        gradients = tape.gradient(scaled, self.trainable_weights)
        return StepResult(gradients, y_pred, loss, loss, tf.zeros_like(loss))

    def _penalty_step(self, x, y, sample_weight) -> StepResult:
        reg = self._regularizer
        inputs = self._differentiable_inputs(x)
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                inner.watch(inputs)
                y_pred, loss = self._forward_loss(x, y, sample_weight)
                scaled = self._scale(loss)
            flat_gradient = self._input_gradient(inner, scaled, inputs)
            penalty = reg.sigma * tf.reduce_sum(dual_norm(flat_gradient, reg.p))
            penalty = tf.cast(penalty, loss.dtype)
            total = loss + penalty
            # For p = 1 and p = inf the gradient of a NaN norm row (an
            # overflowed input gradient) is 0, not NaN. The term below is
            # exactly 0 otherwise; with a NaN penalty it makes the parameter
            # gradients NaN, so a LossScaleOptimizer skips the step and lowers
            # its scale. It costs a scalar: backprop meets `loss` once.
            overflow = tf.where(tf.math.is_finite(penalty), 0.0, float("nan"))
            objective = total + tf.cast(overflow, loss.dtype) * loss
            scaled_objective = self._scale(objective)
        gradients = outer.gradient(scaled_objective, self.trainable_weights)
        return StepResult(gradients, y_pred, total, loss, penalty)

    def _perturbed_step(self, x, y, sample_weight) -> StepResult:
        reg = self._regularizer
        adversarial = reg.method == "adversarial"
        inputs = self._differentiable_inputs(x)
        seed_states = [generator.state for generator in randomness.seed_generators(self)]
        step_randomness = randomness.snapshot(seed_states)
        # The clean pass needs parameter gradients unless its weight is 0.
        clean_in_objective = not adversarial or reg.clean_weight > 0.0
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                inner.watch(inputs)
                if clean_in_objective:
                    y_pred, loss = self._forward_loss(x, y, sample_weight)
                else:
                    with outer.stop_recording():
                        y_pred, loss = self._forward_loss(x, y, sample_weight)
                scaled = self._scale(loss)
            with outer.stop_recording():
                flat_gradient = self._input_gradient(inner, scaled, inputs)
                radius = reg.sigma if adversarial else reg.fd_step
                flat_step = tf.stop_gradient(worst_case_perturbation(flat_gradient, reg.p, radius))
                steps = split_per_example(flat_step, inputs)
            x_moved = replace_floating_inputs(x, [t + step for t, step in zip(inputs, steps)])
            # The moved pass is a probe: it redraws the clean pass's masks and
            # leaves no trace in the model's state (BatchNorm statistics) or in
            # Keras's per-output loss trackers.
            side_state = self._state_outside_seeds(seed_states)
            kept_state = randomness.snapshot(side_state)
            randomness.restore(seed_states, step_randomness)
            _, moved_loss = self._forward_loss(x_moved, y, sample_weight)
            randomness.restore(side_state, kept_state)
            if adversarial:
                penalty = moved_loss
                total = reg.clean_weight * loss + (1.0 - reg.clean_weight) * moved_loss
            else:
                penalty = reg.sigma * (moved_loss - loss) / reg.fd_step
                total = loss + penalty
            scaled_total = self._scale(total)
        # A NaN r* (overflowed input gradient) makes the moved loss, hence
        # these gradients, NaN: no extra term is needed as in _penalty_step.
        gradients = outer.gradient(scaled_total, self.trainable_weights)
        return StepResult(gradients, y_pred, total, loss, penalty)

    def _state_outside_seeds(self, seed_states: list) -> list:
        """Non-trainable model variables and loss trackers, seed states excluded."""
        seeds = {id(state) for state in seed_states}
        compile_loss = getattr(self, "_compile_loss", None)
        trackers = compile_loss.metrics if compile_loss is not None else []
        variables = [*self.non_trainable_variables]
        variables += [v for tracker in trackers for v in tracker.variables]
        return [v for v in variables if id(v) not in seeds]

    def _differentiable_inputs(self, x) -> list[tf.Tensor]:
        inputs = floating_inputs(x)
        if not inputs:
            raise ValueError(
                "RegularizedModel needs at least one floating-point input to "
                "differentiate the loss by. Received: input dtypes="
                f"{[t.dtype.name for t in tf.nest.flatten(x) if t is not None]}"
            )
        return inputs

    # ------------------------------------------------------------------ #
    # Serialization.
    # ------------------------------------------------------------------ #

    def save_own_variables(self, store) -> None:
        """Saves the model's variables and, unlike Keras, its dropout seed states.

        Stock Keras does not save `SeedGenerator` states, so a reloaded or
        resumed model (`BackupAndRestore` saves weights files) would draw new
        dropout masks and not continue training identically. A consequence:
        weights saved from a `RegularizedModel` load into a `RegularizedModel`;
        for the plain model that `kgr.regularize` wrapped, save that model's
        weights (they are the same layers).
        """
        super().save_own_variables(store)
        for index, generator in enumerate(randomness.seed_generators(self, include_global=False)):
            store[f"{_SEED_STATE_KEY}{index}"] = generator.state

    def load_own_variables(self, store) -> None:
        own = {key: store[key] for key in store.keys() if not key.startswith(_SEED_STATE_KEY)}
        super().load_own_variables(own)
        for index, generator in enumerate(randomness.seed_generators(self, include_global=False)):
            key = f"{_SEED_STATE_KEY}{index}"
            if key in store.keys():
                generator.state.assign(store[key])

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["regularizer"] = keras.saving.serialize_keras_object(self._regularizer)
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects=None):
        config = dict(config)
        regularizer = _as_regularizer(config.pop("regularizer", None))
        model = super().from_config(config, custom_objects=custom_objects)
        model._regularizer = regularizer
        return model


def regularize(model: keras.Model, regularizer: Any = None) -> RegularizedModel:
    """A `RegularizedModel` sharing the layers of a built Keras model.

    Turns an existing `keras.Sequential` or functional model into one that
    trains with the gradient penalty; both models keep the same weights.

    Args:
        model: A Keras model with defined inputs (e.g. a Sequential that
            starts with `keras.Input`, or any functional model).
        regularizer: As for `RegularizedModel`.

    Raises:
        ValueError: If the model has no defined inputs (a subclassed model,
            or a Sequential that was never built on an input).
    """
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
        inputs = outputs = None
    if not inputs or not outputs:
        raise ValueError(
            "`kgr.regularize` needs a model with defined inputs (functional, or a "
            "Sequential starting with keras.Input); subclass kgr.RegularizedModel "
            f"instead. Received: model={model.name!r} of type {type(model).__name__}"
        )
    return RegularizedModel(inputs, outputs, regularizer=regularizer, name=model.name)
