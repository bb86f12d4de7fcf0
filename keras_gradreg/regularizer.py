"""`GradientRegularizer`: the validated settings of one member of the family."""

from __future__ import annotations

import contextlib
import gc
import inspect
import weakref
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_gradreg import _checks
from keras_gradreg.balls import BALL_NORMS
from keras_gradreg.norms import PValue, canonical_p, dual_exponent

METHODS = ("penalty", "adversarial", "finite_difference", "trades")
# The methods that search for their perturbation by ascent steps in the ball.
ASCENT_METHODS = ("adversarial", "trades")
DEFAULT_CLEAN_WEIGHT = 0.0
DEFAULT_FD_STEP = 0.01
DEFAULT_BETA = 6.0
DEFAULT_TRADES_STEPS = 10
DEFAULT_TRADES_STEP_SIZE = 0.25
# Wong et al.'s fast FGSM training: one step of 1.25 sigma from a random start.
FAST_FGSM_STEP_SIZE = 1.25
# Madry et al.'s PGD: k steps of 2.5 sigma / k.
PGD_STEP_SIZE_TIMES_STEPS = 2.5


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
    - `"finite_difference"`: `L(x) + sigma * sum_i |c_i (l_i(x + h d) - l_i(x))| / h`
      with c_i l_i example i's part of the loss, d = r* / sigma held constant
      and h = `fd_step`.

    - `"trades"`: TRADES (Zhang et al. 2019), `L(x) + beta KL(f(x) || f(x + r))`
      with r found by `steps` ascent steps on the KL in the ball (and the
      `clip` box), started at 0.001 N(0, 1); the parameter gradient flows
      through both f(x) and f(x + r).

    **Multi-step ascent** (`"adversarial"`): with `steps=1` and no random start
    r is the closed-form r* above. Otherwise r is the last iterate of `steps`
    steps of projected steepest ascent on each example's loss in the p-ball
    of radius sigma (and the `clip` box), each step of length `step_size *
    sigma`, from x (or, with `random_start`, a uniform point of the ball).
    The ascent runs in training mode with the step's dropout masks, and r is
    held constant. With `p=inf`, `clean_weight=0` and `random_start=True` this
    is Madry et al.'s PGD adversarial training (`steps=1`: Wong et al.'s fast
    FGSM training, step 1.25 sigma).

    Each is the clean loss L(x) plus a term T: sigma ||g||_q, its finite
    difference, (1 - clean_weight) (L(x + r) - L(x)) for "adversarial", or
    beta KL(f(x) || f(x + r)) for "trades".

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
    `kgr.callbacks.RegularizerScheduler`) takes effect on the next step with no
    retracing. The other fields are fixed: to change them, give the model a
    new regularizer (its step is then rebuilt). In a custom loop,
    `kgr.regularized_loss`'s default fixes a zero sigma or clean_weight
    when it traces a step; the regularizer then refuses another value for
    it while that step exists (`fixed_settings=False` reads both at every
    step).

    Args:
        p: Norm of the perturbation ball: a number >= 1, `math.inf` or "inf".
        sigma: Radius of the ball, >= 0. `sigma=0` trains like a plain model.
        method: One of "penalty", "adversarial", "finite_difference", "trades".
        clean_weight: Weight of the clean loss in "adversarial", in [0, 1];
            None: 0. Not for "trades".
        fd_step: Step h of "finite_difference", > 0, in input units along a
            direction of unit p-norm; None: 0.01. Not for "trades". The
            term adds each example's |difference| / h (docs/method.md,
            section 2), so any sigma keeps the objective above L(x); the
            examples' parts are read through the loss's `sample_weight`, so
            the loss must use it (Keras's losses do).
        every: Compute the regularised term on every `every`-th step only,
            multiplied by `every` (the other steps are plain steps); an
            integer >= 1.
        fraction: Compute the term on a random ceil(fraction * batch)
            examples of each batch, scaled to the full batch's expectation;
            in (0, 1].
        steps: Ascent steps of "adversarial" and "trades", an integer >= 1;
            None: 1 ("adversarial"), 10 ("trades"). Above 1 needs p in {1, 2, inf}.
        step_size: Length of each ascent step relative to sigma, > 0; None:
            2.5 / steps, 1.25 for one step from a random start, 0.25 for "trades".
        random_start: Start the ascent of "adversarial" at a uniform random
            point of the ball (needs p in {1, 2, inf}).
        clip: The box (low, high) the perturbed inputs stay in during the
            ascent of "adversarial" and "trades", or None for no box.
        beta: Weight of the KL term of "trades", >= 0; None: 6.
    """

    def __init__(
        self,
        p: PValue = 2.0,
        sigma: float = 0.1,
        method: str = "penalty",
        clean_weight: float | None = None,
        fd_step: float | None = None,
        every: int = 1,
        fraction: float = 1.0,
        steps: int | None = None,
        step_size: float | None = None,
        random_start: bool = False,
        clip: tuple[float, float] | None = None,
        beta: float | None = None,
    ):
        self._p = canonical_p(p)
        self._sigma = _checks.check_nonnegative(sigma, "sigma")
        self._method = _checks.check_choice(method, "method", METHODS)
        _check_applies(self._method, clean_weight=clean_weight, fd_step=fd_step)
        _check_applies(self._method, steps=steps, step_size=step_size, clip=clip, beta=beta)
        _check_applies(self._method, random_start=random_start or None)
        self._clean_weight = _checks.check_unit_interval(
            DEFAULT_CLEAN_WEIGHT if clean_weight is None else clean_weight, "clean_weight"
        )
        self._fd_step = _checks.check_positive(
            DEFAULT_FD_STEP if fd_step is None else fd_step, "fd_step"
        )
        self._every = _checks.check_count(every, "every")
        self._fraction = _checks.check_fraction(fraction, "fraction")
        self._random_start = _checks.check_bool(random_start, "random_start")
        self._steps = _checks.check_count(_default_steps(self._method, steps), "steps")
        self._step_size = _checks.check_positive(
            _default_step_size(self._method, self._steps, self._random_start, step_size),
            "step_size",
        )
        self._clip = _checks.check_clip(clip)
        self._beta = _checks.check_nonnegative(DEFAULT_BETA if beta is None else beta, "beta")
        if self.ascends and self._p not in BALL_NORMS:
            raise ValueError(
                f"{self._ascent_description()} needs a ball with an exact projection: "
                f"p must be 1, 2 or inf. Received: p={p!r}"
            )
        self._state: _State | None = None
        # Per setting, the graphs of steps `kgr.regularized_loss` traced with
        # its work left out because it was 0 (`_note_left_out`).
        self._left_out: dict[str, weakref.WeakSet] = {
            "sigma": weakref.WeakSet(),
            "clean_weight": weakref.WeakSet(),
        }

    p = property(lambda self: self._p, doc="Perturbation norm p (float, inf allowed).")
    method = property(lambda self: self._method, doc="The estimator's name.")
    fd_step = property(lambda self: self._fd_step, doc="Finite-difference step h.")
    every = property(lambda self: self._every, doc="The term is computed every `every` steps.")
    fraction = property(lambda self: self._fraction, doc="Share of each batch the term uses.")
    steps = property(lambda self: self._steps, doc="Ascent steps (1 for the other methods).")
    step_size = property(lambda self: self._step_size, doc="Ascent step length / sigma.")
    random_start = property(lambda self: self._random_start, doc="Ascent from a random point.")
    clip = property(lambda self: self._clip, doc="The ascent's box (low, high), or None.")
    beta = property(lambda self: self._beta, doc='Weight of the KL term of "trades".')

    @property
    def ascends(self) -> bool:
        """Whether r comes from ascent steps rather than the closed-form r*.

        "trades" always; "adversarial" with `steps > 1` or a random start.
        """
        return self._method == "trades" or (
            self._method == "adversarial" and (self._steps > 1 or self._random_start)
        )

    @property
    def draws_starts(self) -> bool:
        """Whether the ascent starts at a random point (drawn from the step's seed)."""
        return self._method == "trades" or self._random_start

    def _ascent_description(self) -> str:
        if self._method == "trades":
            return 'method="trades"'
        return f"steps={self._steps}" if self._steps > 1 else "random_start=True"

    @property
    def sigma(self) -> float:
        """Radius of the perturbation ball; assignable between steps (no retracing).

        Raises:
            ValueError: On a value other than 0 while a step exists that
                `kgr.regularized_loss` (default `fixed_settings`) traced as
                the plain objective, because sigma was 0 then.
        """
        return self._sigma

    @sigma.setter
    def sigma(self, value: float) -> None:
        value = _checks.check_nonnegative(value, "sigma")
        self._check_reaches_traced_steps("sigma", value)
        self._sigma = value
        if self._state is not None:
            self._state.sigma.assign(self._sigma)

    @property
    def clean_weight(self) -> float:
        """Clean-loss weight of "adversarial"; assignable between steps (no retracing).

        Raises:
            ValueError: On a value other than 0 while a step exists that
                `kgr.regularized_loss` (default `fixed_settings`) traced with
                the clean loss left out, because clean_weight was 0 then.
        """
        return self._clean_weight

    @clean_weight.setter
    def clean_weight(self, value: float) -> None:
        value = _checks.check_unit_interval(value, "clean_weight")
        self._check_reaches_traced_steps("clean_weight", value)
        self._clean_weight = value
        if self._state is not None:
            self._state.clean_weight.assign(self._clean_weight)

    def _note_left_out(self, setting: str) -> None:
        """Records that the step being traced leaves out `setting`'s work (it is 0)."""
        self._left_out[setting].add(tf.compat.v1.get_default_graph())

    def _check_reaches_traced_steps(self, setting: str, value: float) -> None:
        if value == 0.0 or not self._left_out[setting]:
            return
        gc.collect()  # The graphs of steps whose functions are gone no longer count.
        if self._left_out[setting]:
            work = "the term" if setting == "sigma" else "the clean loss"
            raise ValueError(
                f"{setting} was 0 when `kgr.regularized_loss` traced a step with this "
                f"regularizer, and that step leaves {work} out (the default "
                f"`fixed_settings=None` fixes a zero {setting} when traced), so a new value "
                "would not reach it. Trace a new step (a new `tf.function`) after deleting "
                f"that one, or pass `fixed_settings=False` to `kgr.regularized_loss` to "
                f"schedule {setting} away from 0. Received: {setting}={value!r}"
            )

    @property
    def q(self) -> float:
        """The dual exponent used by the penalty, q = p / (p - 1)."""
        return dual_exponent(self._p)

    def get_config(self) -> dict[str, Any]:
        """The arguments; those a method does not take are left out (loading fills the defaults)."""
        config = {
            "p": _checks.inf_as_text(self._p),
            "sigma": self._sigma,
            "method": self._method,
            "clean_weight": self._clean_weight,
            "fd_step": self._fd_step,
            "every": self._every,
            "fraction": self._fraction,
            "steps": self._steps,
            "step_size": self._step_size,
            "random_start": self._random_start,
            "clip": None if self._clip is None else [np.asarray(b).tolist() for b in self._clip],
            "beta": self._beta,
        }
        taken = _ARGUMENTS_OF[self._method]
        return {key: value for key, value in config.items() if key in taken}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GradientRegularizer:
        return cls(**config)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GradientRegularizer) and self.get_config() == other.get_config()

    def __hash__(self) -> int:
        # The fixed fields only: sigma and clean_weight may change (equal
        # regularizers still hash alike), and tf.function keys its traces of a
        # regularizer argument on its hash and identity.
        config = self.get_config()
        fixed = [key for key in config if key not in ("sigma", "clean_weight")]
        return hash(tuple((key, repr(config[key])) for key in fixed))

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
        seed_states = None if self._state is None else self._state.seed_states()
        self._state = _State(self, strategy, seed_states)

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

    def start_seed_generator(self) -> keras.random.SeedGenerator:
        """The `SeedGenerator` that draws the ascent's random starts (see `draws_starts`)."""
        return self._variables().start_seed_generator

    def save_state(self) -> dict[str, np.ndarray]:
        """sigma, clean_weight and the subset seed state, as arrays (float64 values are exact)."""
        state = {
            "sigma": np.asarray(self._sigma, np.float64),
            "clean_weight": np.asarray(self._clean_weight, np.float64),
        }
        if self._fraction < 1.0:
            state["subset_seed"] = np.asarray(self._variables().seed_generator.state.numpy())
        if self.draws_starts:
            generator = self._variables().start_seed_generator
            state["start_seed"] = np.asarray(generator.state.numpy())
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        """Restores what `save_state` returned (missing keys are left alone)."""
        if "sigma" in state:
            self.sigma = float(np.asarray(state["sigma"]))
        if "clean_weight" in state:
            self.clean_weight = float(np.asarray(state["clean_weight"]))
        if "subset_seed" in state and self._fraction < 1.0:
            self._variables().seed_generator.state.assign(np.asarray(state["subset_seed"]))
        if "start_seed" in state and self.draws_starts:
            self._variables().start_seed_generator.state.assign(np.asarray(state["start_seed"]))

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

    def __init__(self, regularizer: GradientRegularizer, strategy, seed_states=None):
        self.strategy = strategy
        seed_states = seed_states or (None, None)
        # init_scope: created eagerly even when first needed inside a traced step
        # (also in a replica context, where the strategy's scope is already in effect).
        current = tf.distribute.get_strategy() is strategy
        with tf.init_scope(), contextlib.nullcontext() if current else strategy.scope():
            self.sigma = _scalar(regularizer.sigma, "sigma")
            self.clean_weight = _scalar(regularizer.clean_weight, "clean_weight")
            self.seed_generator = _seed_generator(
                regularizer.fraction < 1.0, "subset_seed", seed_states[0]
            )
            self.start_seed_generator = _seed_generator(
                regularizer.draws_starts, "start_seed", seed_states[1]
            )

    def seed_states(self) -> tuple:
        return tuple(
            None if generator is None else generator.state.numpy()
            for generator in (self.seed_generator, self.start_seed_generator)
        )


def _seed_generator(needed: bool, name: str, state) -> keras.random.SeedGenerator | None:
    if not needed:
        return None
    generator = keras.random.SeedGenerator(name=name)
    if state is not None:
        generator.state.assign(state)
    return generator


# The arguments each method takes (the others must be left at None / False).
_COMMON = ("p", "sigma", "method", "every", "fraction")
_ARGUMENTS_OF = {
    "penalty": (*_COMMON, "clean_weight", "fd_step"),
    "finite_difference": (*_COMMON, "clean_weight", "fd_step"),
    "adversarial": (
        *_COMMON,
        "clean_weight",
        "fd_step",
        "steps",
        "step_size",
        "random_start",
        "clip",
    ),
    "trades": (*_COMMON, "steps", "step_size", "clip", "beta"),
}


def _check_applies(method: str, **arguments: Any) -> None:
    """Raises ValueError for an argument set (not None) that `method` does not take.

    "penalty" and "finite_difference" keep accepting clean_weight and
    fd_step, as saved configs from before hold them.
    """
    for name, value in arguments.items():
        if value is not None and name not in _ARGUMENTS_OF[method]:
            takers = [m for m in METHODS if name in _ARGUMENTS_OF[m] and m in ASCENT_METHODS]
            raise ValueError(
                f"`{name}` does not apply to method={method!r} (it is an argument of "
                f"{' and '.join(repr(m) for m in takers)}). Received: {name}={value!r}"
            )


def _default_steps(method: str, steps: int | None) -> Any:
    if steps is not None:
        return steps
    return DEFAULT_TRADES_STEPS if method == "trades" else 1


def _default_step_size(method: str, steps: int, random_start: bool, step_size) -> Any:
    if step_size is not None:
        return step_size
    if method == "trades":
        return DEFAULT_TRADES_STEP_SIZE
    if steps == 1 and random_start:
        return FAST_FGSM_STEP_SIZE
    return PGD_STEP_SIZE_TIMES_STEPS / steps


def _scalar(value: float, name: str) -> keras.Variable:
    return keras.Variable(
        value, dtype="float32", trainable=False, name=name, aggregation="only_first_replica"
    )
