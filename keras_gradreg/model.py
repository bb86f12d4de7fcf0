"""`RegularizedModel`: a `keras.Model` trained on the regularised objective."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import keras
import tensorflow as tf

from keras_gradreg import _internals
from keras_gradreg import _randomness as randomness
from keras_gradreg._estimators import ESTIMATORS, Passes
from keras_gradreg._subsets import gather_rows, scale_rows
from keras_gradreg._train_function import make_distributed_function
from keras_gradreg.objective import (
    RegularizedLoss,
    check_loss_reduction,
    logged_objective,
    objective_branches,
    unscale_for_replicas,
)
from keras_gradreg.regularizer import GradientRegularizer, as_regularizer

_EVAL_ONLY_EXCLUDED = ("data_loss", "penalty")
_SEED_STATE_KEY = "seed_generator_state_"
_REGULARIZER_KEY = "regularizer_"


class StepResult(NamedTuple):
    """One regularised forward/backward pass (per replica).

    Attributes:
        gradients: Parameter gradients of the loss-scaled `loss.total`, in
            the order of `trainable_weights`.
        loss: The `kgr.RegularizedLossResult` of the batch, as Keras computes
            losses: divided by the number of replicas under a strategy.
        objective: The value `fit` logs as `loss`: the objective L + T, the
            term not multiplied by `every` (`objective.logged_objective`).
        counted: Whether the step is one of the regularizer's `every`-th
            steps, whose `loss` and `penalty` `fit` logs (a bool tensor).
    """

    gradients: list
    loss: RegularizedLoss
    objective: tf.Tensor
    counted: tf.Tensor


def _batch_size(x) -> tf.Tensor:
    """Examples in a batch: the leading dimension of its first input tensor."""
    return tf.shape(next(t for t in tf.nest.flatten(x) if t is not None))[0]


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
            (cls, _internals.functional_class()),
            {"__module__": cls.__module__, "__qualname__": cls.__qualname__},
        )
        _internals.set_registered_name(variant, keras.saving.get_registered_name(cls))
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
    x + r* for "adversarial"). With the regularizer's `every` > 1, `loss`
    and `penalty` are means over the steps that compute the term (the
    optimizer's `iterations` % every == 0), not multiplied by `every`;
    `data_loss` is the mean over all steps. `evaluate` reports clean metrics
    only. All forward passes of one step share the step's dropout masks.

    Args:
        *args: As for `keras.Model` (`inputs, outputs` for a functional model).
        regularizer: A `kgr.GradientRegularizer`, a dict of its arguments, or
            None for the defaults.
        **kwargs: As for `keras.Model`.
    """

    def __new__(cls, *args, **kwargs):
        functional = _internals.functional_class()
        if _internals.is_functional_call(args, kwargs) and not issubclass(cls, functional):
            variant = _functional_variant(cls)
            return variant.__new__(variant, *args, **kwargs)
        return super().__new__(cls, *args, **kwargs)

    def __init__(self, *args, regularizer: Any = None, **kwargs):
        regularizer = as_regularizer(regularizer)
        if isinstance(self, _internals.functional_class()):
            _internals.init_functional(self, args, kwargs)
        else:
            keras.Model.__init__(self, *args, **kwargs)
        self._set_regularizer(regularizer)
        # (number of branches, branch) -> indices of the weights it has no gradient for.
        self._unused_weights: dict[tuple[int, int], set[int]] = {}
        self._data_loss_tracker = keras.metrics.Mean(name="data_loss")
        self._penalty_tracker = keras.metrics.Mean(name="penalty")

    @property
    def regularizer(self) -> GradientRegularizer:
        """The `kgr.GradientRegularizer` used by `fit`.

        Assigning its `sigma` or `clean_weight` (`model.regularizer.sigma =
        0.3`) changes the next step without retracing. Assigning a new
        regularizer rebuilds (retraces) the training step.
        """
        return self._regularizer

    @regularizer.setter
    def regularizer(self, value: Any) -> None:
        self._set_regularizer(as_regularizer(value))
        if self.train_function is not None:
            # Rebuilt, not dropped: `fit` calls `self.train_function` each step,
            # so a callback may change the regularizer between epochs.
            self.make_train_function(force=True)

    def _set_regularizer(self, regularizer: GradientRegularizer) -> None:
        # Its variables live in this model's strategy, as the model's own do.
        regularizer.build(self.distribute_strategy)
        self._regularizer = regularizer

    # ------------------------------------------------------------------ #
    # Training.
    # ------------------------------------------------------------------ #

    def make_train_function(self, force: bool = False):
        """Builds `fit`'s step; with `jit_compile`, XLA compiles each objective separately.

        The step's run-time choice between the plain and the regularised
        objective (sigma = 0, a step that `every` skips) is a `tf.switch_case`
        outside XLA, over one XLA computation per objective, each computing
        its loss and gradients with no conditional inside: XLA's CPU backend
        runs the convolutions of a conditional's branch as naive loops
        (bench/README.md). Without a strategy, each of these computations
        also applies the optimizer update and updates the loss trackers and
        metrics (one XLA launch per step: a separate update computation cost
        8% of a step of the bare maxout MLP). Under a tf.distribute strategy
        the gradient all-reduce and optimizer update run outside XLA; see
        `keras_gradreg._train_function`.
        """
        if self.train_function is not None and not force:
            return self.train_function
        self._compiled_branches = {}
        self._compiled_update = None
        self._compile_branches = bool(self.jit_compile) and not self.run_eagerly
        if _internals.is_default_strategy(self.distribute_strategy):
            if not self._compile_branches:
                return super().make_train_function(force=force)
            # Keras's step itself runs outside XLA; `train_step` calls the compiled parts.
            self.jit_compile = False
            try:
                function = super().make_train_function(force=force)
            finally:
                self.jit_compile = True
            self._compiled_update = self._update  # Inside each branch's XLA computation.
            return function
        self.train_function = make_distributed_function(self, self.train_step)
        return self.train_function

    def make_test_function(self, force: bool = False):
        """Builds `evaluate`'s step; under a strategy, XLA compiles each replica's forward pass.

        The loss and metrics are then computed outside XLA, as in `fit`.
        """
        if self.test_function is not None and not force:
            return self.test_function
        self._replica_forward = None
        if _internals.is_default_strategy(self.distribute_strategy):
            return super().make_test_function(force=force)
        if self.jit_compile and not self.run_eagerly:
            self._replica_forward = tf.function(
                self._inference_forward, jit_compile=True, reduce_retracing=True
            )
        self.test_function = make_distributed_function(self, self.test_step)
        return self.test_function

    def _inference_forward(self, x):
        return _internals.call_model(self, x, training=False)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Builds the model from one batch's shapes before distributed `fit`.

        Overrides a private Keras hook (see `_internals.OVERRIDDEN_HOOKS`):
        Keras 3.15 averages a distributed batch with `strategy.reduce` to get
        those shapes, which raises under `MultiWorkerMirroredStrategy` (even
        for a stock `keras.Model`). The first local replica's batch has the
        same structure and is all the build needs.
        """
        strategy = self.distribute_strategy
        if iterator is not None and not _internals.is_default_strategy(strategy):
            data_batch = tf.nest.map_structure(
                lambda t: _internals.first_replica_value(strategy, t),
                _internals.first_batch(iterator),
            )
            iterator = None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def fit(self, *args, **kwargs):
        self._check_has_loss()
        return super().fit(*args, **kwargs)

    def _check_has_loss(self) -> None:
        overrides_loss = type(self).compute_loss is not keras.Model.compute_loss
        if _internals.compiled_loss(self) is None and not overrides_loss:
            raise ValueError(
                "RegularizedModel penalises the gradient of the training loss, so "
                "it needs one: call `model.compile(loss=...)` with a loss before "
                "`fit`. Received: loss=None"
            )
        check_loss_reduction(self.loss, self._regularizer, "loss")

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        self._check_has_loss()
        if getattr(self, "_compiled_update", None) is not None:
            # Each branch's XLA computation applies the update itself.
            return self.regularized_step(x, y, sample_weight, _then=self._compiled_update)
        result = self.regularized_step(x, y, sample_weight)
        return self._update(x, y, sample_weight, result)

    def _update(self, x, y, sample_weight, result: StepResult):
        """Applies a step's gradients, adds its losses to the logs; the metrics' results."""
        self.optimizer.apply_gradients(zip(result.gradients, self.trainable_weights))
        self._log_losses(result, _batch_size(x))
        return self.compute_metrics(x, y, result.loss.y_pred, sample_weight=sample_weight)

    def regularized_step(self, x, y, sample_weight=None, _then=None) -> StepResult:
        """Computes the regularised loss and its gradients for one batch.

        The loss is `kgr.objective`'s regularised objective of the compiled
        loss (`Model.compute_loss`, with sample and class weights). Whether
        the step computes the term (sigma > 0, and with `every` > 1 the
        optimizer's `iterations` % every == 0) is decided at run time by a
        `tf.switch_case` whose branches each take their own gradients, so
        one trace serves every step and a plain step costs about what a
        plain Keras step does. With `jit_compile`, each branch is its own
        XLA computation and the choice is made outside XLA. Updates no
        weights (only the state a forward pass updates: seed generators,
        BatchNorm statistics, loss trackers), so the optimizer can be
        applied outside (per replica under a strategy).

        Args:
            x: Model input.
            y: Targets.
            sample_weight: Optional per-example weights.

        Returns:
            A `StepResult`. Its gradients are scaled like the loss by the
            optimizer (loss scaling under mixed precision). (With `_then`,
            private, and compiled branches: each branch's XLA computation
            ends with `_then(x, y, sample_weight, result)`, whose output is
            returned; `fit` applies its update there.)
        """
        branches = self._objective_branches(x, y, sample_weight)
        count = len(branches.functions)
        counted = tf.convert_to_tensor(branches.counted)
        compiled = getattr(self, "_compile_branches", False)

        def run(index):
            if compiled:
                key = (index, _then is not None)
                function = self._compiled_branches.get(key)
                if function is None:

                    def regularized_step_branch(x, y, sample_weight, counted, index=index):
                        gradients, loss = self._branch_gradients(x, y, sample_weight, index)
                        if _then is None:
                            return gradients, loss
                        # None for the weights this branch has no gradient for (the
                        # same weights in every branch: they differentiate one model).
                        unused = self._unused_weights[count, index]
                        gradients = [None if i in unused else g for i, g in enumerate(gradients)]
                        computed = tf.constant(index > 0)
                        objective = logged_objective(loss, self._regularizer, computed)
                        return _then(
                            x, y, sample_weight, StepResult(gradients, loss, objective, counted)
                        )

                    # XLA names the computation after it ("regularized_step_branch").
                    function = tf.function(
                        regularized_step_branch, jit_compile=True, reduce_retracing=True
                    )
                    self._compiled_branches[key] = function
                return lambda: function(x, y, sample_weight, counted)
            return functools.partial(self._branch_gradients, x, y, sample_weight, index, branches)

        functions = [run(index) for index in range(count)]
        if count == 1:
            outputs = functions[0]()
        else:
            outputs = tf.switch_case(branches.index, functions)
        if compiled and _then is not None:
            return outputs
        gradients, loss = outputs
        # The weights no branch has a gradient for (each branch records its own when traced).
        unused = [self._unused_weights.get((count, index)) for index in range(count)]
        never_used = set.intersection(*[u for u in unused if u is not None] or [set()])
        gradients = [None if i in never_used else g for i, g in enumerate(gradients)]
        computed = tf.greater(branches.index, 0)
        objective = logged_objective(loss, self._regularizer, computed)
        return StepResult(gradients, loss, objective, counted)

    def _objective_branches(self, x, y, sample_weight):
        def forward(inputs, rows=None, example_scale=None):
            targets, weights = gather_rows((y, sample_weight), rows)
            weights = scale_rows(weights, example_scale)
            y_pred = _internals.call_model(self, inputs, training=True)
            loss = _internals.compute_loss(self, inputs, targets, y_pred, weights, training=True)
            return y_pred, loss

        estimator = ESTIMATORS[self._regularizer.method]
        passes = Passes(
            self,
            forward,
            loss_scale=self._loss_scale(),
            extra_state=_internals.compiled_loss_variables(self),
            divergence=estimator.divergence(self.loss, sample_weight, "loss"),
        )
        step = None if self.optimizer is None else self.optimizer.iterations
        return objective_branches(passes, x, self._regularizer, step)

    def _branch_gradients(self, x, y, sample_weight, index, branches=None):
        """Objective `index` of the step's branches and its gradients (zeros where None)."""
        if branches is None:
            branches = self._objective_branches(x, y, sample_weight)
        count = len(branches.functions)
        with tf.GradientTape() as tape:
            # Branch 1 is the estimator's entry, where the formula is:
            # `_estimators.ESTIMATORS[method].objective` (`objective.term_function`).
            loss = branches.functions[index]()
            scaled = self._scale(loss.total)
        gradients = tape.gradient(scaled, self.trainable_weights)
        self._unused_weights[count, index] = {i for i, g in enumerate(gradients) if g is None}
        # Branches must return the same structure: zeros for now.
        zeros = [
            tf.zeros_like(w) if g is None else g for g, w in zip(gradients, self.trainable_weights)
        ]
        return zeros, loss

    def _log_losses(self, result: StepResult, batch_size: tf.Tensor) -> None:
        """Adds one step's losses to the epoch means, weighted by its batch size.

        `loss` and `penalty` leave out the steps that `every` skips, and
        steps the optimizer skips for an overflowed loss scale.
        """
        loss = result.loss
        left_out = tf.logical_not(result.counted)
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            # A loss-scaled input gradient that overflowed (the dynamic loss
            # scale's normal search) makes the penalty NaN while the clean loss
            # is finite; the optimizer skips the step and the loss and penalty
            # means leave it out. A non-finite clean loss is always shown.
            overflowed = tf.logical_and(
                tf.logical_not(tf.math.is_finite(loss.penalty)),
                tf.math.is_finite(loss.data_loss),
            )
            left_out = tf.logical_or(left_out, overflowed)
        for tracker, value, maskable in (
            (_internals.loss_tracker(self), result.objective, True),
            (self._data_loss_tracker, loss.data_loss, False),
            (self._penalty_tracker, loss.penalty, True),
        ):
            value = unscale_for_replicas(value)
            weight = tf.cast(batch_size, value.dtype)
            if maskable:
                value = tf.where(left_out, tf.zeros_like(value), value)
                weight = tf.where(left_out, tf.zeros_like(weight), weight)
            tracker.update_state(value, sample_weight=weight)

    def get_metrics_result(self):
        """The metrics' results; `loss` and `penalty` are NaN while no step has computed them.

        With `every` > 1 an epoch (or `steps_per_execution` window) may hold
        no counted step: its means are then undefined, not 0, which callbacks
        watching `loss` would take for the best value yet.
        """
        logs = super().get_metrics_result()
        for name, tracker in (
            ("loss", _internals.loss_tracker(self)),
            ("penalty", self._penalty_tracker),
        ):
            if name in logs:
                value = tf.convert_to_tensor(logs[name])
                logs[name] = tf.where(
                    tracker.count > 0, value, tf.constant(float("nan"), value.dtype)
                )
        return logs

    def test_step(self, data):
        forward = getattr(self, "_replica_forward", None)
        if forward is None:
            logs = super().test_step(data)
        else:
            # Keras's TensorFlowTrainer.test_step with the forward pass compiled.
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            y_pred = forward(x)
            loss = _internals.compute_loss(self, x, y, y_pred, sample_weight, training=False)
            _internals.loss_tracker(self).update_state(
                unscale_for_replicas(loss), sample_weight=_batch_size(x)
            )
            logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        return {k: v for k, v in logs.items() if k not in _EVAL_ONLY_EXCLUDED}

    def _scale(self, loss):
        return loss if self.optimizer is None else self.optimizer.scale_loss(loss)

    def _loss_scale(self) -> tf.Tensor:
        """The optimizer's loss scale (1 without mixed precision), float32."""
        return tf.cast(self._scale(tf.constant(1.0)), tf.float32)

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
        for name, value in self._regularizer.save_state().items():
            store[f"{_REGULARIZER_KEY}{name}"] = value

    def load_own_variables(self, store) -> None:
        extra = (_SEED_STATE_KEY, _REGULARIZER_KEY)
        own = {key: store[key] for key in store.keys() if not key.startswith(extra)}
        super().load_own_variables(own)
        for index, generator in enumerate(randomness.seed_generators(self, include_global=False)):
            key = f"{_SEED_STATE_KEY}{index}"
            if key in store.keys():
                generator.state.assign(store[key])
        self._regularizer.load_state(
            {
                key[len(_REGULARIZER_KEY) :]: store[key]
                for key in store.keys()
                if key.startswith(_REGULARIZER_KEY)
            }
        )

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["regularizer"] = keras.saving.serialize_keras_object(self._regularizer)
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects=None):
        config = dict(config)
        regularizer = as_regularizer(config.pop("regularizer", None))
        model = super().from_config(config, custom_objects=custom_objects)
        model._set_regularizer(regularizer)
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
