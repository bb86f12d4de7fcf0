"""`GradientRegularizer`: the validated settings of one member of the family."""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_gradreg import _checks
from keras_gradreg.norms import PValue, canonical_p, dual_exponent

METHODS = ("penalty", "adversarial", "finite_difference")


@keras.saving.register_keras_serializable(package="keras_gradreg")
class GradientRegularizer:
    """Settings of the gradient-regularisation family (docs/method.md).

    Training minimises L(x, y) + sigma * ||grad_x L(x, y)||_q, the linearised
    worst case of the loss over the ball ||r||_p <= sigma, estimated by one of
    three methods:

    - `"penalty"`: the exact penalty by double backpropagation.
    - `"adversarial"`: `clean_weight * L(x) + (1 - clean_weight) * L(x + r*)`
      with r* the closed-form worst-case perturbation, held constant. With
      `p=inf` and `clean_weight=0.5` this is Goodfellow et al.'s FGSM
      adversarial training with eps = sigma.
    - `"finite_difference"`: `L(x) + sigma * (L(x + h d) - L(x)) / h` with
      d = r* / sigma held constant and h = `fd_step`.

    Each is the clean loss L(x) plus a term T: sigma ||g||_q, its finite
    difference, or (1 - clean_weight) (L(x + r*) - L(x)) for "adversarial".

    **Cheaper regularization.** `every` and `fraction` compute T less often
    or on fewer examples, scaled so that the expected objective (over steps
    and subsets) stays L + T. On step t (the optimizer's `iterations` before
    the step's update, so the first step counts) the loss differentiated is

        L(x)                    if t % every != 0  (a plain step)
        L(x) + every * T_S      if t % every == 0

    where T_S is T computed on a random subset S of m = ceil(fraction * batch)
    examples, reduced like the loss over S (Keras's default reduction divides
    by m and by the number of replicas, so E[T_S] = T); L(x) always uses the
    whole batch. For "adversarial" the counted step therefore minimises
    (1 - every * (1 - clean_weight)) L(x) + every * (1 - clean_weight)
    L(x + r*) (on S for the second part's clean term too): the moved loss's
    weight is scaled by `every` and the clean loss's weight makes up the
    rest, which is negative when every * (1 - clean_weight) > 1. With
    `every=1, fraction=1` all three are exactly the forms above.

    `sigma` and `clean_weight` live in variables read by the compiled step:
    assigning them (`model.regularizer.sigma = 0.3`, or
    `kgr.callbacks.RegularizerSchedule`) takes effect on the next step with no
    retracing. The other fields are fixed: to change them, give the model a
    new regularizer (its step is then rebuilt).

    Args:
        p: Norm of the perturbation ball: a number >= 1, `math.inf` or "inf".
        sigma: Radius of the ball, >= 0. `sigma=0` trains like a plain model.
        method: One of "penalty", "adversarial", "finite_difference".
        clean_weight: Weight of the clean loss in "adversarial", in [0, 1].
        fd_step: Step h of "finite_difference", > 0, in input units along a
            direction of unit p-norm.
        every: Compute the regularised term on every `every`-th step only,
            multiplied by `every` (the other steps are plain steps); an
            integer >= 1.
        fraction: Compute the term on a random ceil(fraction * batch)
            examples of each batch, scaled to the full batch's expectation;
            in (0, 1].
    """

    def __init__(
        self,
        p: PValue = 2.0,
        sigma: float = 0.1,
        method: str = "penalty",
        clean_weight: float = 0.0,
        fd_step: float = 0.01,
        every: int = 1,
        fraction: float = 1.0,
    ):
        self._p = canonical_p(p)
        self._sigma = _checks.check_nonnegative(sigma, "sigma")
        self._method = _checks.check_choice(method, "method", METHODS)
        self._clean_weight = _checks.check_unit_interval(clean_weight, "clean_weight")
        self._fd_step = _checks.check_positive(fd_step, "fd_step")
        self._every = _checks.check_count(every, "every")
        self._fraction = _checks.check_fraction(fraction, "fraction")
        self._state: _State | None = None

    p = property(lambda self: self._p, doc="Perturbation norm p (float, inf allowed).")
    method = property(lambda self: self._method, doc="The estimator's name.")
    fd_step = property(lambda self: self._fd_step, doc="Finite-difference step h.")
    every = property(lambda self: self._every, doc="The term is computed every `every` steps.")
    fraction = property(lambda self: self._fraction, doc="Share of each batch the term uses.")

    @property
    def sigma(self) -> float:
        """Radius of the perturbation ball; assignable between steps (no retracing)."""
        return self._sigma

    @sigma.setter
    def sigma(self, value: float) -> None:
        self._sigma = _checks.check_nonnegative(value, "sigma")
        if self._state is not None:
            self._state.sigma.assign(self._sigma)

    @property
    def clean_weight(self) -> float:
        """Clean-loss weight of "adversarial"; assignable between steps (no retracing)."""
        return self._clean_weight

    @clean_weight.setter
    def clean_weight(self, value: float) -> None:
        self._clean_weight = _checks.check_unit_interval(value, "clean_weight")
        if self._state is not None:
            self._state.clean_weight.assign(self._clean_weight)

    @property
    def q(self) -> float:
        """The dual exponent used by the penalty, q = p / (p - 1)."""
        return dual_exponent(self._p)

    def get_config(self) -> dict[str, Any]:
        return {
            "p": "inf" if math.isinf(self._p) else self._p,
            "sigma": self._sigma,
            "method": self._method,
            "clean_weight": self._clean_weight,
            "fd_step": self._fd_step,
            "every": self._every,
            "fraction": self._fraction,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GradientRegularizer:
        return cls(**config)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GradientRegularizer) and self.get_config() == other.get_config()

    def __hash__(self) -> int:
        # The fixed fields only: sigma and clean_weight may change (equal
        # regularizers still hash alike), and tf.function keys its traces of a
        # regularizer argument on its hash and identity.
        return hash((self._p, self._method, self._fd_step, self._every, self._fraction))

    # ------------------------------------------------------------------ #
    # Variables read by compiled steps.
    # ------------------------------------------------------------------ #

    def build(self, strategy: tf.distribute.Strategy | None = None) -> None:
        """Creates the variables compiled steps read, in `strategy`'s scope.

        `kgr.RegularizedModel` calls it with its own strategy. A custom loop
        calls it before tracing its step, like `optimizer.build`: the first
        `kgr.regularized_loss` would create them otherwise, which a
        `tf.function` allows only in its first trace (under a
        `tf.distribute` strategy, call it inside `strategy.scope()`).
        Building again under another strategy moves them there (their values
        kept); steps traced before read the old ones, so rebuild those.

        Args:
            strategy: The strategy whose scope to create them in; None: the
                current one.
        """
        strategy = strategy or tf.distribute.get_strategy()
        if self._state is not None and self._state.strategy is strategy:
            return
        seed_state = None if self._state is None else self._state.seed_state()
        self._state = _State(self, strategy, seed_state)

    def _variables(self) -> _State:
        """The variables, created in the current scope if missing."""
        if self._state is None:
            self._state = _State(self, tf.distribute.get_strategy())
        return self._state

    def sigma_tensor(self) -> tf.Tensor:
        """sigma as a float32 tensor read from its variable (what compiled steps use)."""
        return tf.convert_to_tensor(self._variables().sigma)

    def clean_weight_tensor(self) -> tf.Tensor:
        """clean_weight as a float32 tensor read from its variable."""
        return tf.convert_to_tensor(self._variables().clean_weight)

    def subset_seed_generator(self) -> keras.random.SeedGenerator:
        """The `SeedGenerator` that draws the subsets of `fraction < 1`."""
        return self._variables().seed_generator

    def save_state(self) -> dict[str, np.ndarray]:
        """sigma, clean_weight and the subset seed state, as arrays (float64 values are exact)."""
        state = {
            "sigma": np.asarray(self._sigma, np.float64),
            "clean_weight": np.asarray(self._clean_weight, np.float64),
        }
        if self._fraction < 1.0:
            state["subset_seed"] = np.asarray(self._variables().seed_generator.state.numpy())
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        """Restores what `save_state` returned (missing keys are left alone)."""
        if "sigma" in state:
            self.sigma = float(np.asarray(state["sigma"]))
        if "clean_weight" in state:
            self.clean_weight = float(np.asarray(state["clean_weight"]))
        if "subset_seed" in state and self._fraction < 1.0:
            self._variables().seed_generator.state.assign(np.asarray(state["subset_seed"]))

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.get_config().items())
        return f"GradientRegularizer({args})"


def as_regularizer(regularizer: Any) -> GradientRegularizer:
    """A `GradientRegularizer` from itself, a dict of its arguments, a saved config, or None.

    Raises:
        ValueError: For anything else, or a dict with unknown keys.
    """
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


class _State:
    """The variables of one `GradientRegularizer`, created in one strategy's scope."""

    def __init__(self, regularizer: GradientRegularizer, strategy, seed_state=None):
        self.strategy = strategy
        # init_scope: created eagerly even when first needed inside a traced step
        # (also in a replica context, where the strategy's scope is already in effect).
        current = tf.distribute.get_strategy() is strategy
        with tf.init_scope(), contextlib.nullcontext() if current else strategy.scope():
            self.sigma = _scalar(regularizer.sigma, "sigma")
            self.clean_weight = _scalar(regularizer.clean_weight, "clean_weight")
            self.seed_generator = None
            if regularizer.fraction < 1.0:
                self.seed_generator = keras.random.SeedGenerator(name="subset_seed")
                if seed_state is not None:
                    self.seed_generator.state.assign(seed_state)

    def seed_state(self):
        return None if self.seed_generator is None else self.seed_generator.state.numpy()


def _scalar(value: float, name: str) -> keras.Variable:
    return keras.Variable(
        value, dtype="float32", trainable=False, name=name, aggregation="only_first_replica"
    )
