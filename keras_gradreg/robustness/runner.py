"""Running the attacks of a report over many examples, batch by batch, with progress.

`run_attacks` attacks the examples at one norm and radius with each attack
in turn. In a cascade (AutoAttack's protocol) each attack only sees the
examples that every earlier attack failed to break; otherwise each attack
sees every example classified correctly. Either way the result per example
is known for each attack, so the worst case and "which attack broke what"
come out of the same run.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import keras
import numpy as np
import tensorflow as tf

from keras_gradreg.attacks import auto_pgd as apgd_lib
from keras_gradreg.attacks import fab_attack as fab_lib
from keras_gradreg.attacks import projected as pgd_lib
from keras_gradreg.attacks import square_attack as square_lib
from keras_gradreg.attacks.common import Clip
from keras_gradreg.balls import ALG
from keras_gradreg.gradients import LossLike

ATTACKS = ("fgsm", "pgd", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")
# "standard" is AutoAttack's standard version (Croce and Hein 2020), in its order.
SUITES = {"standard": ("apgd-ce", "apgd-t", "fab-t", "square"), "fast": ("fgsm", "pgd")}
GRADIENT_FREE = frozenset({"square"})
# Norms each attack supports (the others: 1, 2 and inf).
NORMS = {
    "apgd-ce": apgd_lib.APGD_NORMS,
    "apgd-dlr": apgd_lib.APGD_NORMS,
    "apgd-t": apgd_lib.APGD_NORMS,
    "fab-t": fab_lib.FAB_NORMS,
    "square": square_lib.SQUARE_NORMS,
}
# The fewest classes an attack's loss is defined for.
MIN_CLASSES = {"apgd-dlr": 3, "apgd-t": 4}


@dataclasses.dataclass(frozen=True)
class AttackSettings:
    """Every attack's settings, as `evaluate_robustness` received them."""

    loss: LossLike
    clip: Clip
    steps: int
    step_size_factor: float
    restarts: int
    random_start: bool
    apgd_steps: int
    apgd_restarts: int
    target_classes: int
    fab_steps: int
    fab_restarts: int
    square_queries: int
    from_logits: bool | None
    jit_compile: bool | None


def attack_batch(
    name: str, model: keras.Model, x, y, p: float, epsilon: float, seed, s: AttackSettings
) -> np.ndarray:
    """Per-example correctness after attack `name` on one batch, (batch,) bool."""
    common = dict(jit_compile=s.jit_compile, return_correct=True)
    if name == "fgsm":
        _, correct = pgd_lib.fgsm(model, x, y, epsilon, p, s.loss, s.clip, **common)
    elif name == "pgd":
        step_size = s.step_size_factor * epsilon / s.steps
        _, correct = pgd_lib.pgd(
            model, x, y, epsilon, p, s.steps, step_size, s.random_start, s.restarts, s.loss,
            s.clip, seed, **common,
        )  # fmt: skip
    elif name == "fab-t":
        _, correct = fab_lib.fab(
            model, x, y, epsilon, p, s.target_classes, s.fab_steps, s.fab_restarts, s.clip,
            seed, from_logits=s.from_logits, **common,
        )  # fmt: skip
    elif name == "square":
        _, correct = square_lib.square(
            model, x, y, epsilon, p, s.square_queries, seed=seed, clip=s.clip,
            from_logits=s.from_logits, **common,
        )  # fmt: skip
    else:
        _, correct = apgd_lib.apgd(
            model, x, y, epsilon, p, "ce" if name == "apgd-ce" else "dlr", name == "apgd-t",
            s.target_classes, s.apgd_steps, s.apgd_restarts, seed, s.clip,
            from_logits=s.from_logits, **common,
        )  # fmt: skip
    return np.asarray(correct)


@dataclasses.dataclass
class AttackOutcome:
    """One attack at one norm and radius."""

    name: str
    correct: np.ndarray  # per example: not broken by this attack (True where not attacked)
    attacked: int
    seconds: float


class _Progress:
    """A Keras progress bar (verbose=1) or one line at the end (verbose=2)."""

    def __init__(self, verbose: int, title: str, total: int, robust_before: int, n: int):
        self.verbose, self.title, self.total, self.n = verbose, title, total, n
        self.robust_before = robust_before
        self.start = time.perf_counter()
        self.bar = None
        if verbose == 1:
            print(f"{title}: {total} examples", file=sys.stdout)
            self.bar = keras.utils.Progbar(
                total, verbose=1, unit_name="example", stateful_metrics=["robust"]
            )

    def update(self, done: int, broken: int) -> None:
        if self.bar is not None:
            robust = (self.robust_before - broken) / max(self.n, 1)
            self.bar.update(done, values=[("robust", robust)])

    def finish(self, broken: int) -> None:
        if self.verbose == 2:
            robust = (self.robust_before - broken) / max(self.n, 1)
            print(
                f"{self.title}: robust {100 * robust:.2f}%, broke {broken} of {self.total} "
                f"({time.perf_counter() - self.start:.1f} s)",
                file=sys.stdout,
            )


def run_attacks(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    clean_correct: np.ndarray,
    attacks: tuple[str, ...],
    p: float,
    epsilon: float,
    *,
    cascade: bool,
    settings: AttackSettings,
    batch_size: int,
    seed: tf.Tensor,
    verbose: int,
) -> list[AttackOutcome]:
    """Runs `attacks` in order at (p, epsilon) on the examples of `x`.

    Args:
        model: The classifier.
        x: All examples (numpy).
        y: Their labels.
        clean_correct: Which examples are classified correctly at x; the
            others are never attacked.
        attacks: Attack names, in order.
        p: The norm.
        epsilon: The radius.
        cascade: Attack only what earlier attacks left robust.
        settings: The attacks' settings.
        batch_size: Examples per attack call.
        seed: A stateless seed (2,) for this norm and radius.
        verbose: 0 silent, 1 progress bar, 2 one line per attack.

    Returns:
        One `AttackOutcome` per attack, in order.
    """
    robust = clean_correct.copy()
    outcomes = []
    for index, name in enumerate(attacks):
        start = time.perf_counter()
        candidates = np.flatnonzero(robust if cascade else clean_correct)
        correct = np.ones(len(x), bool)
        title = f"{name} p={p:g} epsilon={epsilon:g}"
        progress = _Progress(verbose, title, len(candidates), int(robust.sum()), len(x))
        attack_seed = tf.random.experimental.stateless_fold_in(seed, index, alg=ALG)
        broken = 0
        for batch, first in enumerate(range(0, len(candidates), batch_size)):
            chosen = candidates[first : first + batch_size]
            batch_seed = tf.random.experimental.stateless_fold_in(attack_seed, batch, alg=ALG)
            correct[chosen] = attack_batch(
                name, model, x[chosen], y[chosen], p, epsilon, batch_seed, settings
            )
            broken = int(np.sum(robust & ~correct))
            progress.update(first + len(chosen), broken)
        progress.finish(broken)
        robust &= correct
        outcomes.append(AttackOutcome(name, correct, len(candidates), time.perf_counter() - start))
    return outcomes
