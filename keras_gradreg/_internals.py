"""The one door to Keras and TensorFlow internals.

Every use the library makes of `keras.src.*`, `tensorflow.python.*` or a
private attribute of a Keras or TensorFlow object is a small function here,
each with a comment saying which public API is missing. A Keras or
TensorFlow release that moves one of them makes that function raise
`InternalsChangedError`, naming the versions installed, instead of failing
somewhere deep in a training step; tests/test_internals.py calls every
function, so such a release fails there first.

Private methods that `RegularizedModel` overrides are listed in
`OVERRIDDEN_HOOKS` and checked by `check_overridden_hooks` at import, which
warns (naming the versions) if Keras no longer calls one.
"""

from __future__ import annotations

import functools
import inspect
import re
import warnings
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

SUPPORTED = "TensorFlow >= 2.16.2 with Keras >= 3.10.0 (tested up to TensorFlow 2.21, Keras 3.15)"
MINIMUM_VERSIONS = {"tensorflow": (2, 16, 2), "keras": (3, 10, 0)}


class InternalsChangedError(RuntimeError):
    """A Keras or TensorFlow internal that keras_gradreg relies on has moved."""


def versions() -> str:
    """The installed TensorFlow and Keras versions, for messages."""
    return f"TensorFlow {tf.__version__}, Keras {keras.__version__}"


def _version_tuple(version: str) -> tuple[int, ...]:
    """(2, 16, 2) for "2.16.2" or "2.16.2rc0"."""
    return tuple(int(re.match(r"\d*", part).group() or 0) for part in version.split(".")[:3])


def check_versions() -> None:
    """Raises ImportError below the supported TensorFlow and Keras versions.

    Under a tf.distribute strategy, Keras < 3.8 does not divide losses by
    the number of replicas and Keras < 3.10 does not synchronise metric
    variables on read: two replicas then do not train or log like one device
    (.ci/constraints-lowest.txt has what was measured).
    """
    found = {"tensorflow": tf.__version__, "keras": keras.__version__}
    for name, minimum in MINIMUM_VERSIONS.items():
        if _version_tuple(found[name]) < minimum:
            raise ImportError(
                f"keras_gradreg needs {name} >= {'.'.join(map(str, minimum))}. "
                f"Received: {name}=={found[name]} ({versions()}). Supported: {SUPPORTED}."
            )


def _changed(what: str, why: str, error: Exception) -> InternalsChangedError:
    return InternalsChangedError(
        f"keras_gradreg relies on {what} ({why}), which is not usable in {versions()}: "
        f"{type(error).__name__}: {error}. Supported: {SUPPORTED}."
    )


def _guarded(what: str, why: str) -> Callable:
    """Turns ImportError/AttributeError inside the function into `InternalsChangedError`."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (ImportError, AttributeError) as error:
                raise _changed(what, why, error) from error

        return wrapper

    return decorate


# ---------------------------------------------------------------------- #
# Functional models.
# ---------------------------------------------------------------------- #


@_guarded(
    "keras.src.models.functional.Functional",
    "no public class for a functional model: keras.Model(inputs, outputs) "
    "swaps its own class for it in __new__",
)
def functional_class() -> type:
    """Keras's `Functional` class, the base of every functional model."""
    from keras.src.models.functional import Functional

    return Functional


@_guarded(
    "keras.src.models.model.functional_init_arguments",
    "no public test of whether Model(...) arguments describe a functional model",
)
def is_functional_call(args: tuple, kwargs: dict) -> bool:
    """Whether `Model(*args, **kwargs)` builds a functional model (inputs, outputs)."""
    from keras.src.models.model import functional_init_arguments

    return functional_init_arguments(args, kwargs)


@_guarded(
    "keras.src.trainers.trainer.Trainer",
    "keras.Model.__init__ runs Trainer.__init__ and Functional.__init__ only for "
    "keras.Model's own functional class",
)
def trainer_class() -> type:
    """Keras's `Trainer`, the base of `keras.Model` that `fit` comes from."""
    from keras.src.trainers.trainer import Trainer

    return Trainer


def init_functional(model: keras.Model, args: tuple, kwargs: dict) -> None:
    """Initialises a `Model` subclass that also derives from `Functional`."""
    trainer_init, functional_init = trainer_class().__init__, functional_class().__init__
    trainer_init(model)
    functional_init(model, *args, **kwargs)


@_guarded(
    "keras.src.saving.object_registration.GLOBAL_CUSTOM_NAMES",
    "keras.saving.register_keras_serializable also registers the class for "
    "loading; there is no public way to give a class only a saved name",
)
def set_registered_name(cls: type, name: str) -> None:
    """Makes Keras save `cls` under `name` without registering it for loading."""
    from keras.src.saving import object_registration

    object_registration.GLOBAL_CUSTOM_NAMES[cls] = name


# ---------------------------------------------------------------------- #
# Trainer state and steps.
# ---------------------------------------------------------------------- #


@_guarded(
    "Model._call_has_training_arg",
    "no public way to ask whether a model's call() takes `training`; Keras's "
    "own train_step calls the model without it when it does not",
)
def call_has_training_arg(model: keras.layers.Layer) -> bool:
    """Whether `model.call` accepts a `training` argument."""
    return bool(model._call_has_training_arg)


def call_model(model: keras.layers.Layer, x: Any, training: bool) -> Any:
    """`model(x)` as Keras's own train and test steps call it."""
    if call_has_training_arg(model):
        return model(x, training=training)
    return model(x)


def compute_loss(model: keras.Model, x, y, y_pred, sample_weight, training: bool):
    """The model's training loss (compiled loss plus `model.losses`), as `fit` computes it."""
    return _compute_loss_method(model)(
        x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
    )


@_guarded(
    "Model._compute_loss",
    "the public Model.compute_loss may be overridden without a `training` "
    "argument; Keras's own steps call it through this adapter",
)
def _compute_loss_method(model: keras.Model) -> Callable:
    return model._compute_loss


@_guarded(
    "Model._compile_loss",
    "no public handle on the loss object built by compile() (`model.loss` is "
    "what was passed, not the compiled loss with its per-output trackers)",
)
def compiled_loss(model: keras.Model) -> Any:
    """The `CompileLoss` built by `compile(loss=...)`, or None before `compile`."""
    return model._compile_loss


def compiled_loss_variables(model: keras.Model) -> list:
    """Variables of the compiled loss's per-output loss trackers."""
    loss = compiled_loss(model)
    trackers = loss.metrics if loss is not None else []
    return [variable for tracker in trackers for variable in tracker.variables]


@_guarded(
    "Model._loss_tracker",
    "no public handle on the `loss` Mean metric that train_step updates",
)
def loss_tracker(model: keras.Model) -> keras.metrics.Metric:
    """The `Mean` metric behind `fit`'s and `evaluate`'s `loss` log."""
    return model._loss_tracker


# The class name of TensorFlow's default (no-op) strategy. tf.distribute has
# no public test for it: `tf.distribute.has_strategy()` only answers for the
# strategy in scope, not for the one a model captured when it was built.
DEFAULT_STRATEGY_CLASS = "_DefaultDistributionStrategy"


def is_default_strategy(strategy: tf.distribute.Strategy) -> bool:
    """Whether `strategy` is TensorFlow's default strategy (no distribution)."""
    return type(strategy).__name__ == DEFAULT_STRATEGY_CLASS


@_guarded(
    "tf.experimental.Optional._element_spec",
    "an Optional.empty(None) used as a tf.while_loop variable learns its "
    "element spec only when the loop body is traced; Keras's own trainer "
    "sets it the same way",
)
def set_element_spec(optional: tf.experimental.Optional, spec: Any) -> None:
    """Sets the element spec of an `Optional` made before its value's spec was known."""
    if not hasattr(optional, "_element_spec"):
        raise AttributeError("tf.experimental.Optional has no `_element_spec`")
    optional._element_spec = spec


# ---------------------------------------------------------------------- #
# Layers and randomness.
# ---------------------------------------------------------------------- #


@_guarded(
    "Layer._flatten_layers",
    "Model.layers lists direct children only; there is no public recursive walk",
)
def all_layers(model: keras.layers.Layer) -> list:
    """`model` and every layer nested in it, each once."""
    return list(model._flatten_layers(include_self=True, recursive=True))


@_guarded(
    "Layer._seed_generators",
    "layers track their keras.random.SeedGenerator objects only privately",
)
def layer_seed_generators(layer: keras.layers.Layer) -> list:
    """The `keras.random.SeedGenerator`s a layer owns (not its sublayers')."""
    return list(layer._seed_generators)


@_guarded(
    "keras.src.backend.common.global_state and the 'global_seed_generator' key",
    "keras.random.* with seed=None draws from a global SeedGenerator that has "
    "no public accessor (the private one would create it)",
)
def global_seed_generator() -> keras.random.SeedGenerator | None:
    """Keras's global seed generator if it exists yet, else None."""
    from keras.src.backend.common import global_state
    from keras.src.random import seed_generator

    # Keras < 3.11 spells the key out instead of naming the constant.
    key = getattr(seed_generator, "GLOBAL_SEED_GENERATOR", "global_seed_generator")
    return global_state.get_global_attribute(key)


@_guarded(
    "tensorflow.python.ops.control_flow_util.GraphOrParentsInXlaContext",
    "TensorFlow has no public way to ask whether the op being built will be compiled by XLA",
)
def in_xla_context() -> bool:
    """Whether the graph being built (or a parent) is compiled by XLA."""
    from tensorflow.python.framework import ops
    from tensorflow.python.ops import control_flow_util

    return bool(control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph()))


# ---------------------------------------------------------------------- #
# Private hooks RegularizedModel overrides.
# ---------------------------------------------------------------------- #

# name -> the parameters RegularizedModel's override expects Keras to pass.
OVERRIDDEN_HOOKS = {
    # Builds the model from one batch before a distributed `fit`: Keras
    # averages a distributed batch with strategy.reduce, which fails under
    # MultiWorkerMirroredStrategy; there is no public hook for the build.
    "_maybe_symbolic_build": ("iterator", "data_batch"),
}


def check_overridden_hooks() -> list[str]:
    """Warns, naming the versions, for each hook we override that Keras no longer calls.

    Run when keras_gradreg is imported: a Keras release that renames a hook
    does not stop the import (only what the hook does is lost), but says so.

    Returns:
        The warnings' messages (empty when every hook is in place).
    """
    problems = []
    for name, parameters in OVERRIDDEN_HOOKS.items():
        hook = getattr(keras.Model, name, None)
        if hook is None:
            error = AttributeError(f"keras.Model has no {name}")
            problems.append(
                _changed(f"keras.Model.{name}", "overridden by RegularizedModel", error)
            )
            continue
        found = tuple(inspect.signature(hook).parameters)
        if any(p not in found for p in parameters):
            error = TypeError(f"its parameters are now {found}")
            what = f"keras.Model.{name}{parameters}"
            problems.append(_changed(what, "overridden by RegularizedModel", error))
    for problem in problems:
        warnings.warn(str(problem), RuntimeWarning, stacklevel=2)
    return [str(problem) for problem in problems]


@_guarded(
    "iteration over Keras's TFEpochIterator",
    "no public way to peek at one batch of the data fit() is given",
)
def first_batch(epoch_iterator: Any) -> Any:
    """The first batch (per-replica values under a strategy) of `fit`'s epoch iterator."""
    # It yields (step, iterator) up to Keras 3.10, (first step, last step,
    # iterator) in later releases: tuples ending with a tf iterator over batches.
    for item in epoch_iterator:
        return next(item[-1])
    return None


def first_replica_value(strategy: tf.distribute.Strategy, value: Any) -> Any:
    """The first local replica's part of a distributed value (public API)."""
    if isinstance(value, tf.distribute.DistributedValues):
        return strategy.experimental_local_results(value)[0]
    return value
