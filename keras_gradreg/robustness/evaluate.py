"""`evaluate_robustness`: robust accuracy measured the way the field measures it, with checks.

The default suite is AutoAttack's "standard" version (Croce and Hein 2020):
APGD with the cross-entropy loss, then targeted APGD with the DLR loss
against the 9 classes with the highest scores, then targeted FAB against
the same classes, then the gradient-free Square attack, each only on the
examples every earlier attack failed to break. An example counts as robust
only if no attack broke it.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_gradreg import _checks, balls
from keras_gradreg.attacks import auto_pgd as apgd_lib
from keras_gradreg.attacks import common
from keras_gradreg.attacks.scores import num_classes
from keras_gradreg.gradients import LossLike, resolve_loss
from keras_gradreg.robustness import data as data_lib
from keras_gradreg.robustness import flags as flags_lib
from keras_gradreg.robustness import measures
from keras_gradreg.robustness.report import NOISE, WORST_CASE, RobustnessReport, p_label
from keras_gradreg.robustness.runner import (
    ATTACKS,
    GRADIENT_FREE,
    MIN_CLASSES,
    NORMS,
    SUITES,
    AttackSettings,
    run_attacks,
)

DEFAULT_EPSILONS = {math.inf: (0.05, 0.1, 0.2, 0.3), 2.0: (0.5, 1.0, 2.0)}


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Validated arguments of one evaluation."""

    epsilons: dict[float, list[float]]
    suite: str
    attacks: tuple[str, ...]
    cascade: bool
    attack_settings: AttackSettings
    batch_size: int
    max_examples: int | None
    seed: int
    tolerance: float
    zero_gradient_threshold: float
    masking_threshold: float
    sanity_examples: int
    verbose: int
    # Set once the outputs are seen: where the loss came from, how the outputs look.
    loss_source: str = ""
    outputs: str = ""


def evaluate_robustness(
    model: keras.Model,
    data: Any,
    epsilons: Mapping[Any, Sequence[float]] | None = None,
    attacks: Sequence[str] | None = None,
    *,
    suite: str = "standard",
    cascade: bool | None = None,
    loss: LossLike = None,
    clip: _checks.Clip = (0.0, 1.0),
    steps: int = 40,
    step_size_factor: float = 2.5,
    restarts: int = 1,
    random_start: bool = False,
    apgd_steps: int = 100,
    apgd_restarts: int = 1,
    target_classes: int = 9,
    fab_steps: int = 100,
    fab_restarts: int = 1,
    square_queries: int = 5000,
    batch_size: int = 500,
    max_examples: int | None = None,
    seed: int = 0,
    tolerance: float = 0.01,
    zero_gradient_threshold: float = 0.05,
    masking_threshold: float = 0.005,
    sanity_examples: int = 100,
    verbose: int | str = "auto",
    jit_compile: bool | None = None,
) -> RobustnessReport:
    """Robust accuracy of a classifier under a suite of attacks, with checks on the evaluation.

    Suites (`suite`), with their cost in model evaluations per example and
    radius (an APGD or PGD step is one forward and backward pass, a Square
    query one forward pass):

    - "standard" (default): AutoAttack's standard version: APGD-CE
      (`apgd_steps` = 100 steps), then APGD-T (100 steps for each of 9 target
      classes), then FAB-T (`fab_steps` = 100 steps, each a forward and
      backward pass and one more forward pass, for each of the same 9
      targets), then Square (`square_queries` = 5000 queries); the later
      attacks only see the examples still robust. About 100 steps for
      examples APGD-CE breaks; up to 1000 APGD steps, 900 FAB steps and 5000
      queries for robust ones, so the cost grows with the robust accuracy.
    - "fast": FGSM (1 step) and PGD (`steps` = 40 steps from x), each on
      every example: much cheaper, and a lower bound on what an attacker
      achieves.

    The data is checked before any attack runs: inputs must be finite and
    inside `clip`, labels class indices of the model's classes (or one-hot
    targets shaped like its outputs), one per example.

    Args:
        model: A Keras classifier (logits or probabilities).
        data: A `tf.data.Dataset` of (x, y) or (x, y, sample_weight) batches
            (weights are ignored), or a tuple (x, y) of arrays. Held in memory.
        epsilons: Radii per norm, `{p: [epsilon, ...]}`; p in 2, inf (and 1 for
            FGSM and PGD); None for `DEFAULT_EPSILONS` (inputs in [0, 1]).
        attacks: Attack names run in this order, from "fgsm", "pgd",
            "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square"; None for
            `suite`'s.
        suite: "standard" or "fast" (above); ignored if `attacks` is given.
        cascade: Run each attack only on the examples earlier attacks left
            robust; if False, each attack runs on every example classified
            correctly and its own accuracy is reported. None: True for the
            "standard" suite, False for "fast" and for an explicit `attacks`.
        loss: The loss FGSM and PGD attack and the clean pass differentiates;
            None for the model's compiled loss, or for a model without one,
            cross-entropy read as the outputs on the evaluated examples look:
            probabilities if every row is non-negative and sums to 1 (within
            1e-3; one output per example: in [0, 1]), else logits
            (`report.settings["loss"]` and `["outputs"]` say which). Its
            `from_logits` says how outputs are read (APGD, FAB and Square:
            logits, or probabilities attacked through their logarithm).
        clip: The box (low, high) of valid inputs, or None.
        steps: PGD steps per restart, >= 1.
        step_size_factor: PGD step size is `step_size_factor * epsilon / steps`.
        restarts: PGD random restarts, >= 1.
        random_start: PGD starts at a uniform point of the ball instead of at x.
        apgd_steps: APGD iterations per run, >= 1.
        apgd_restarts: APGD runs (random starts) per target, >= 1.
        target_classes: Target classes of APGD-T and FAB-T (at most
            classes - 1).
        fab_steps: FAB-T iterations per run, >= 1.
        fab_restarts: FAB-T runs per target, >= 1 (the first from x, the
            others from random points at distance epsilon / 2).
        square_queries: Queries of the Square attack, >= 1.
        batch_size: Examples per attack call.
        max_examples: Evaluate only the first this many examples (None: all).
        seed: Seed of every random start and of the noise: a report reproduces.
        tolerance: Accuracy differences up to this are not flagged.
        zero_gradient_threshold: Flag if a larger share of examples has an
            exactly-zero input gradient.
        masking_threshold: Flag gradient masking when a gradient-free attack
            breaks a larger share of the examples than every gradient attack
            missed.
        sanity_examples: Examples attacked at the box diameter to check that
            accuracy falls to 0 there (0 skips the check; it needs `clip`).
        verbose: 0 silent, 1 a progress bar per attack, 2 one line per
            attack; "auto" is 1.
        jit_compile: Passed to the attacks (None: XLA only with a GPU).

    Returns:
        A `RobustnessReport`. Its `flags` name what looks wrong:
        `accuracy_not_decreasing`, `pgd_weaker_than_fgsm`, `gradient_masking`,
        `randomized_outputs`, `large_epsilon_not_broken`, `zero_gradients`,
        `noise_stronger_than_attack`, `probabilities_with_logits_loss` and
        `logits_with_probability_loss`.

    Raises:
        ValueError: On invalid arguments, or on data without labels, with
            inputs that are not finite or lie outside `clip`, labels that are
            not the model's classes, or shapes that do not fit the model; all
            before any attack runs.
    """
    plan = _plan(
        epsilons, attacks, suite, cascade, loss, clip, steps, step_size_factor, restarts,
        random_start, apgd_steps, apgd_restarts, target_classes, fab_steps, fab_restarts,
        square_queries, batch_size, max_examples, seed, tolerance, zero_gradient_threshold,
        masking_threshold, sanity_examples, verbose, jit_compile, model,
    )  # fmt: skip
    x, y = data_lib.collect(data, plan.max_examples)
    data_lib.check_inputs(x, plan.attack_settings.clip)
    outputs = data_lib.model_outputs(model, x, plan.batch_size)
    data_lib.check_labels(y, outputs)
    plan = _choose_loss(plan, model, loss, y, outputs)
    return _evaluate(model, x, y, plan)


def _choose_loss(plan: _Plan, model, loss, y, outputs) -> _Plan:
    """The plan with its loss: `loss`, the compiled loss, or cross-entropy read as detected."""
    probabilities = data_lib.looks_like_probabilities(outputs)
    outputs_read = "probabilities" if probabilities else "logits"
    if loss is None and getattr(model, "loss", None) is None:
        detected = data_lib.cross_entropy(y, outputs, from_logits=not probabilities)
        if plan.verbose:
            print(
                f"No compiled loss: the outputs on the {len(y)} examples look like "
                f"{outputs_read}, so the attacks use cross-entropy with "
                f"from_logits={not probabilities}.",
                file=sys.stdout,
            )
        settings = dataclasses.replace(
            plan.attack_settings, loss=detected, from_logits=not probabilities
        )
        return dataclasses.replace(
            plan, attack_settings=settings, loss_source="cross-entropy", outputs=outputs_read
        )
    resolve_loss(model, loss)  # Fails early without a usable loss.
    source = "compiled" if loss is None else "given"
    return dataclasses.replace(plan, loss_source=source, outputs=outputs_read)


# ---------------------------------------------------------------------- #
# Validate.
# ---------------------------------------------------------------------- #


def _plan(
    epsilons, attacks, suite, cascade, loss, clip, steps, step_size_factor, restarts,
    random_start, apgd_steps, apgd_restarts, target_classes, fab_steps, fab_restarts,
    square_queries, batch_size, max_examples, seed, tolerance, zero_gradient_threshold,
    masking_threshold, sanity_examples, verbose, jit_compile, model,
) -> _Plan:  # fmt: skip
    if suite not in SUITES:
        raise ValueError(f"`suite` must be one of {tuple(SUITES)}. Received: suite={suite!r}")
    names = _check_attacks(SUITES[suite] if attacks is None else attacks)
    epsilons = _check_epsilons(epsilons, names)
    if cascade is None:
        cascade = attacks is None and suite == "standard"
    if not isinstance(cascade, bool):
        raise ValueError(f"`cascade` must be True, False or None. Received: cascade={cascade!r}")
    counts = {
        name: _checks.check_count(value, name)
        for name, value in (
            ("steps", steps), ("restarts", restarts), ("apgd_steps", apgd_steps),
            ("apgd_restarts", apgd_restarts), ("target_classes", target_classes),
            ("fab_steps", fab_steps), ("fab_restarts", fab_restarts),
            ("square_queries", square_queries), ("batch_size", batch_size),
        )
    }  # fmt: skip
    _check_scalars(restarts, random_start, seed, sanity_examples, verbose)
    settings = AttackSettings(
        loss=loss,
        clip=_checks.check_clip(clip),
        steps=counts["steps"],
        step_size_factor=_checks.check_nonnegative(step_size_factor, "step_size_factor"),
        restarts=counts["restarts"],
        random_start=bool(random_start),
        apgd_steps=counts["apgd_steps"],
        apgd_restarts=counts["apgd_restarts"],
        target_classes=counts["target_classes"],
        fab_steps=counts["fab_steps"],
        fab_restarts=counts["fab_restarts"],
        square_queries=counts["square_queries"],
        from_logits=common.loss_from_logits(model, loss),
        jit_compile=jit_compile,
    )
    return _Plan(
        epsilons=epsilons,
        suite=suite if attacks is None else "custom",
        attacks=names,
        cascade=cascade,
        attack_settings=settings,
        batch_size=counts["batch_size"],
        max_examples=None
        if max_examples is None
        else _checks.check_count(max_examples, "max_examples"),
        seed=int(seed),
        tolerance=_checks.check_nonnegative(tolerance, "tolerance"),
        zero_gradient_threshold=_checks.check_nonnegative(
            zero_gradient_threshold, "zero_gradient_threshold"
        ),
        masking_threshold=_checks.check_nonnegative(masking_threshold, "masking_threshold"),
        sanity_examples=int(sanity_examples),
        verbose=1 if verbose == "auto" else verbose,
    )


def _check_scalars(restarts, random_start, seed, sanity_examples, verbose) -> None:
    common.check_restarts(restarts, random_start)
    if _checks.check_seed(seed) is None:
        raise ValueError(f"`seed` must be an integer. Received: seed={seed!r}")
    integer = _checks.is_number(sanity_examples) and isinstance(sanity_examples, (int, np.integer))
    if not integer or sanity_examples < 0:
        raise ValueError(
            "`sanity_examples` must be an integer >= 0. "
            f"Received: sanity_examples={sanity_examples!r}"
        )
    if verbose not in (0, 1, 2, "auto"):
        raise ValueError(f"`verbose` must be 0, 1, 2 or 'auto'. Received: verbose={verbose!r}")


def _check_attacks(attacks: Any) -> tuple[str, ...]:
    names = (attacks,) if isinstance(attacks, str) else tuple(attacks)
    if not names or any(name not in ATTACKS for name in names):
        raise ValueError(f"`attacks` must be a subset of {ATTACKS}. Received: attacks={attacks!r}")
    return tuple(dict.fromkeys(names))


def _check_epsilons(epsilons: Any, attacks: tuple[str, ...]) -> dict[float, list[float]]:
    if epsilons is None:
        epsilons = DEFAULT_EPSILONS
    if not isinstance(epsilons, Mapping) or not epsilons:
        raise ValueError(
            "`epsilons` must be a non-empty dict {p: [epsilon, ...]}. "
            f"Received: epsilons={epsilons!r}"
        )
    checked = {}
    for p, values in epsilons.items():
        p = balls.ball_norm(p)
        for name in attacks:
            if p not in NORMS.get(name, balls.BALL_NORMS):
                raise ValueError(
                    f"Attack {name!r} supports p in {{2, inf}}; use attacks=('fgsm', 'pgd') "
                    f"for p={p_label(p)}. Received: epsilons={dict(epsilons)!r}"
                )
        values = [values] if not isinstance(values, Iterable) else list(values)
        if not values:
            raise ValueError(
                f"`epsilons` lists no radius for p={p}. Received: epsilons={epsilons!r}"
            )
        checked[p] = sorted({_checks.check_nonnegative(v, "epsilon") for v in values})
    return checked


# ---------------------------------------------------------------------- #
# Run.
# ---------------------------------------------------------------------- #


def _clean_pass(model, x, y, plan: _Plan) -> dict[str, np.ndarray]:
    settings = plan.attack_settings
    kernel = common.compiled_kernel(
        model, settings.loss, measures.clean_fn, ps=tuple(plan.epsilons)
    )
    parts = []
    for first in range(0, len(x), plan.batch_size):
        batch = slice(first, first + plan.batch_size)
        result = kernel(
            tf.constant(x[batch]), tf.constant(y[batch]), jit_compile=settings.jit_compile
        )
        parts.append([np.asarray(t) for t in result])
    names = measures.CleanPass._fields
    joined = {
        name: np.concatenate([part[i] for part in parts], axis=-1 if name == "norms" else 0)
        for i, name in enumerate(names)
    }
    return joined


def _noise_correct(model, x, y, p, epsilon, seed, plan: _Plan) -> np.ndarray:
    settings = plan.attack_settings
    kernel = common.compiled_kernel(model, settings.loss, measures.noise_fn, p=p)
    correct = []
    for batch, first in enumerate(range(0, len(x), plan.batch_size)):
        chosen = slice(first, first + plan.batch_size)
        xb = tf.constant(x[chosen])
        low, high = common.bounds(settings.clip, xb)
        batch_seed = tf.random.experimental.stateless_fold_in(seed, batch, alg=balls.ALG)
        correct.append(
            np.asarray(
                kernel(
                    xb, tf.constant(y[chosen]), tf.constant(epsilon, xb.dtype), low, high,
                    batch_seed, jit_compile=settings.jit_compile,
                )
            )
        )  # fmt: skip
    return np.concatenate(correct)


def _large_epsilon_check(model, x, y, clean_correct, plan: _Plan):
    """(epsilon, accuracy, examples) of APGD-CE at L-inf epsilon = the box diameter."""
    settings = plan.attack_settings
    chosen = np.flatnonzero(clean_correct)[: plan.sanity_examples]
    if settings.clip is None or not len(chosen):
        return None
    low, high = (np.asarray(bound, np.float64) for bound in settings.clip)
    epsilon = float(np.max(high - low))
    _, correct = apgd_lib.apgd(
        model, x[chosen], y[chosen], epsilon, math.inf, "ce", steps=settings.apgd_steps,
        seed=plan.seed, clip=settings.clip, from_logits=settings.from_logits,
        return_correct=True, jit_compile=settings.jit_compile,
    )  # fmt: skip
    return epsilon, float(np.mean(np.asarray(correct))), len(chosen)


def _evaluate(model, x, y, plan: _Plan) -> RobustnessReport:
    clean = _clean_pass(model, x, y, plan)
    clean_correct = clean["correct"].astype(bool)
    classes = num_classes(tf.convert_to_tensor(model(x[:1], training=False)).shape)
    attacks = tuple(name for name in plan.attacks if classes >= MIN_CLASSES.get(name, 2))
    skipped = {
        name: f"needs at least {MIN_CLASSES[name]} classes; the model has {classes}"
        for name in plan.attacks
        if name not in attacks
    }
    output_change = measures.output_change(model, x[: plan.batch_size])
    base_seed = tf.constant([plan.seed, 0], tf.int64)
    rows, per_example, masked = [], {"clean": clean_correct}, {}
    seconds = dict.fromkeys(attacks, 0.0)
    point = 0
    for p, values in plan.epsilons.items():
        for epsilon in values:
            seed = tf.random.experimental.stateless_fold_in(base_seed, point, alg=balls.ALG)
            point += 1
            outcomes = run_attacks(
                model, x, y, clean_correct, attacks, p, epsilon, cascade=plan.cascade,
                settings=plan.attack_settings, batch_size=plan.batch_size, seed=seed,
                verbose=plan.verbose,
            )  # fmt: skip
            for outcome in outcomes:
                seconds[outcome.name] += outcome.seconds
            noise = clean_correct & _noise_correct(model, x, y, p, epsilon, seed, plan)
            new_rows, flags = _rows(outcomes, noise, clean_correct, p, epsilon, plan.cascade)
            rows += new_rows
            per_example.update(flags)
            share = _masked_share(outcomes, clean_correct, plan.cascade)
            if share is not None:
                masked[(p_label(p), epsilon)] = share
    large = _large_epsilon_check(model, x, y, clean_correct, plan) if plan.sanity_examples else None
    return _assemble(
        plan, x, clean, rows, per_example, masked, output_change, large, skipped, seconds
    )


def _rows(outcomes, noise, clean_correct, p, epsilon, cascade):
    """The report's rows at (p, epsilon), and the per-example flags behind them."""
    n = len(clean_correct)
    label = p_label(p)
    rows, flags = [], {}
    robust = clean_correct.copy()
    for outcome in outcomes:
        own = clean_correct & outcome.correct
        broken = int(np.sum(robust & ~outcome.correct))
        robust &= outcome.correct
        shown = robust.copy() if cascade else own
        rows.append(
            dict(
                attack=outcome.name, p=label, epsilon=epsilon, accuracy=float(shown.sum()) / n,
                broken=broken, attacked=outcome.attacked,
            )
        )  # fmt: skip
        flags[f"{label}/{epsilon!r}/{outcome.name}"] = shown
    for name, correct in ((WORST_CASE, robust), (NOISE, noise)):
        rows.append(
            dict(
                attack=name, p=label, epsilon=epsilon, accuracy=float(correct.sum()) / n,
                broken=None, attacked=n,
            )
        )  # fmt: skip
        flags[f"{label}/{epsilon!r}/{name}"] = correct
    return rows, flags


def _masked_share(outcomes, clean_correct, cascade) -> float | None:
    """Share of examples a gradient-free attack broke after every gradient attack missed them."""
    kinds = [outcome.name in GRADIENT_FREE for outcome in outcomes]
    if not any(kinds) or all(kinds):
        return None
    if cascade and kinds != sorted(kinds):
        return None  # A gradient attack ran after the gradient-free one: it never saw those.
    survived = clean_correct.copy()
    broken_free = np.zeros_like(clean_correct)
    for outcome, free in zip(outcomes, kinds):
        if free:
            broken_free |= ~outcome.correct
        else:
            survived &= outcome.correct
    return float(np.sum(survived & broken_free)) / len(clean_correct)


# ---------------------------------------------------------------------- #
# Assemble.
# ---------------------------------------------------------------------- #


def _assemble(plan, x, clean, rows, per_example, masked, output_change, large, skipped, seconds):
    n = len(x)
    settings = plan.attack_settings
    evidence = flags_lib.Evidence(
        clean_accuracy=float(np.mean(clean["correct"])),
        cascade=plan.cascade,
        tolerance=plan.tolerance,
        zero_share=float(np.mean(clean["zero_gradient"])),
        zero_threshold=plan.zero_gradient_threshold,
        from_logits=settings.from_logits,
        probability_share=float(np.mean(clean["looks_probability"])),
        outside_unit_share=1.0 - float(np.mean(clean["in_unit_interval"])),
        masked=masked,
        masking_threshold=plan.masking_threshold,
        output_change=output_change,
        large_epsilon=large,
    )
    recorded = {
        "suite": plan.suite,
        "attacks": [a for a in plan.attacks if a not in skipped],
        "cascade": plan.cascade,
        "loss": plan.loss_source,
        "loss_from_logits": settings.from_logits,
        "outputs": plan.outputs,
        "clip": None if settings.clip is None else [np.asarray(b).tolist() for b in settings.clip],
        "steps": settings.steps,
        "step_size_factor": settings.step_size_factor,
        "restarts": settings.restarts,
        "random_start": settings.random_start,
        "apgd_steps": settings.apgd_steps,
        "apgd_restarts": settings.apgd_restarts,
        "target_classes": settings.target_classes,
        "fab_steps": settings.fab_steps,
        "fab_restarts": settings.fab_restarts,
        "square_queries": settings.square_queries,
        "batch_size": plan.batch_size,
        "seed": plan.seed,
        "tolerance": plan.tolerance,
        "zero_gradient_threshold": plan.zero_gradient_threshold,
        "masking_threshold": plan.masking_threshold,
        "skipped": skipped,
        "large_epsilon_check": None
        if large is None
        else {"epsilon": large[0], "accuracy": large[1], "examples": large[2]},
        "output_change": output_change,
    }
    return RobustnessReport(
        num_examples=n,
        clean_accuracy=evidence.clean_accuracy,
        rows=rows,
        gradient_norms={
            str(p_label(p)): float(np.mean(clean["norms"][i])) for i, p in enumerate(plan.epsilons)
        },
        zero_gradient_share=evidence.zero_share,
        flags=flags_lib.sanity_flags(rows, evidence),
        settings=recorded,
        seconds={name: round(value, 3) for name, value in seconds.items()},
        per_example=per_example,
    )
