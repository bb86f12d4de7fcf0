"""`evaluate_robustness`: accuracy under attack, with checks on the evaluation.

A weak attack makes any model look robust, so the report also measures what
should be true of a sound evaluation and flags what is not (see
`RobustnessReport.flags`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_gradreg import attacks as attacks_lib
from keras_gradreg import balls
from keras_gradreg.gradients import LossLike, per_example_loss, resolve_loss
from keras_gradreg.norms import canonical_p, dual_norm

ATTACKS = ("fgsm", "pgd")
DEFAULT_EPSILONS = {math.inf: (0.05, 0.1, 0.2, 0.3), 2.0: (0.5, 1.0, 2.0)}


def p_label(p: float) -> float | int | str:
    """A norm exponent as stored in reports: "inf", or an int when whole."""
    p = canonical_p(p)
    if math.isinf(p):
        return "inf"
    return int(p) if p.is_integer() else p


@dataclasses.dataclass
class RobustnessReport:
    """Results of `evaluate_robustness`.

    Attributes:
        num_examples: Examples evaluated.
        clean_accuracy: Accuracy on the unperturbed inputs.
        rows: One dict per attack, norm and radius:
            `{"attack", "p", "epsilon", "accuracy"}`, with attack "fgsm",
            "pgd" or "noise" (random points of p-norm epsilon) and p a number
            or "inf".
        gradient_norms: Mean over examples of the dual norm ||g||_q of each
            example's input gradient, keyed by the perturbation norm p as a
            string ("inf" means ||g||_1).
        zero_gradient_share: Share of examples whose input gradient is
            exactly zero everywhere.
        flags: Checks that failed, name -> explanation; empty if all passed.
        settings: How the evaluation was run (loss, attack settings).
    """

    num_examples: int
    clean_accuracy: float
    rows: list[dict[str, Any]]
    gradient_norms: dict[str, float]
    zero_gradient_share: float
    flags: dict[str, str]
    settings: dict[str, Any]

    @property
    def ok(self) -> bool:
        """True if no sanity check fired."""
        return not self.flags

    def accuracy(self, attack: str, p: Any, epsilon: float) -> float:
        """The accuracy of one row (raises KeyError if there is none)."""
        label = p_label(p)
        for row in self.rows:
            if row["attack"] == attack and row["p"] == label and row["epsilon"] == epsilon:
                return row["accuracy"]
        raise KeyError(f"No row for attack={attack!r}, p={label!r}, epsilon={epsilon!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of all fields."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> RobustnessReport:
        """Inverse of `to_dict`."""
        return cls(**{field.name: config[field.name] for field in dataclasses.fields(cls)})

    def save_json(self, path: str) -> None:
        """Writes `to_dict()` as JSON to `path`."""
        with open(path, "w") as file:
            json.dump(self.to_dict(), file, indent=2)

    @classmethod
    def load_json(cls, path: str) -> RobustnessReport:
        """Reads a report written by `save_json`."""
        with open(path) as file:
            return cls.from_dict(json.load(file))

    def plot(self, path: str) -> None:
        """Draws accuracy against epsilon, one panel per norm, as a PNG."""
        from keras_gradreg.visualize import plot_report

        plot_report(self, path)

    def __str__(self) -> str:
        names = [n for n in (*ATTACKS, "noise") if any(r["attack"] == n for r in self.rows)]
        lines = [
            f"Robustness report: {self.num_examples} examples, "
            f"clean accuracy {100 * self.clean_accuracy:.2f}%",
            "mean dual norm of input gradients: "
            + ", ".join(f"p={p}: {v:.4g}" for p, v in self.gradient_norms.items())
            + f"; exactly-zero gradients: {100 * self.zero_gradient_share:.1f}%",
            "",
            f"{'p':>5} {'epsilon':>9}" + "".join(f" {name:>8}" for name in names),
        ]
        points = list(dict.fromkeys((str(r["p"]), r["epsilon"]) for r in self.rows))
        for p, epsilon in points:
            cells = []
            for name in names:
                match = [
                    r["accuracy"]
                    for r in self.rows
                    if r["attack"] == name and str(r["p"]) == p and r["epsilon"] == epsilon
                ]
                cells.append(f" {100 * match[0]:7.2f}%" if match else f" {'-':>8}")
            lines.append(f"{p:>5} {epsilon:>9.4g}" + "".join(cells))
        lines.append("")
        if not self.flags:
            lines.append("sanity checks: all passed")
        for name, detail in self.flags.items():
            lines.append(f"FLAG {name}: {detail}")
        return "\n".join(lines)


def _row_order(point: tuple[str, float]) -> tuple[float, float]:
    p, epsilon = point
    return (math.inf if p == "inf" else float(p), epsilon)


# ---------------------------------------------------------------------- #
# Argument checks.
# ---------------------------------------------------------------------- #


def _check_epsilons(epsilons: Any) -> dict[float, list[float]]:
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
        values = [values] if not isinstance(values, Iterable) else list(values)
        if not values:
            raise ValueError(
                f"`epsilons` lists no radius for p={p}. Received: epsilons={epsilons!r}"
            )
        checked[p] = sorted({attacks_lib.check_epsilon(v, "epsilon") for v in values})
    return checked


def _check_attacks(attacks: Any) -> tuple[str, ...]:
    names = (attacks,) if isinstance(attacks, str) else tuple(attacks)
    if not names or any(name not in ATTACKS for name in names):
        raise ValueError(f"`attacks` must be a subset of {ATTACKS}. Received: attacks={attacks!r}")
    return tuple(dict.fromkeys(names))


def _as_dataset(data: Any, batch_size: int) -> tf.data.Dataset:
    if isinstance(data, tf.data.Dataset):
        spec = data.element_spec
        if not isinstance(spec, tuple) or len(spec) < 2:
            raise ValueError(
                "`data` must yield (x, y) or (x, y, sample_weight) batches; labels "
                f"are needed. Received: data with element_spec={spec!r}"
            )
        return data
    if isinstance(data, (tuple, list)) and len(data) in (2, 3) and data[1] is not None:
        return tf.data.Dataset.from_tensor_slices(tuple(data[:2])).batch(batch_size)
    raise ValueError(
        "`data` must be a tf.data.Dataset of (x, y) batches or a tuple (x, y) of "
        f"arrays; labels are needed. Received: data={_short_repr(data)}"
    )


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 200 else text[:197] + "..."


# ---------------------------------------------------------------------- #
# Compiled kernels for the clean pass and for noise.
# ---------------------------------------------------------------------- #


def _clean_fn(model_ref, loss_fn, from_logits, ps):
    def run(x, y):
        model = model_ref()
        with tf.GradientTape() as tape:
            tape.watch(x)
            y_pred = model(x, training=False)
            total = tf.reduce_sum(per_example_loss(loss_fn, y, y_pred))
        gradient = tape.gradient(total, x)
        if gradient is None:
            gradient = tf.zeros_like(x)
        flat = tf.reshape(gradient, [tf.shape(x)[0], -1])
        norms = tf.stack([dual_norm(flat, p) for p in ps], axis=0)
        zero = tf.reduce_all(tf.equal(flat, 0.0), axis=1)
        outputs = tf.reshape(tf.cast(y_pred, tf.float32), [tf.shape(x)[0], -1])
        in_unit = tf.reduce_all((outputs >= 0.0) & (outputs <= 1.0), axis=1)
        if outputs.shape[-1] is not None and outputs.shape[-1] > 1:
            sums_to_one = tf.abs(tf.reduce_sum(outputs, axis=1) - 1.0) < 1e-3
            looks_probability = in_unit & sums_to_one
        else:
            looks_probability = in_unit
        correct = attacks_lib.correct_predictions(y, y_pred, from_logits)
        return correct, norms, zero, looks_probability, in_unit

    return run


def _noise_fn(model_ref, loss_fn, from_logits, p):
    del loss_fn

    def run(x, y, epsilon, low, high, seed):
        noise = attacks_lib.random_on_sphere(tf.shape(x), p, epsilon, seed, x.dtype)
        x_noisy = attacks_lib._box(x + noise, low, high)
        return attacks_lib.correct_predictions(y, model_ref()(x_noisy, training=False), from_logits)

    return run


# ---------------------------------------------------------------------- #
# The evaluation.
# ---------------------------------------------------------------------- #


def evaluate_robustness(
    model: keras.Model,
    data: Any,
    epsilons: Mapping[Any, Sequence[float]] | None = None,
    attacks: Sequence[str] = ATTACKS,
    *,
    loss: LossLike = None,
    clip: attacks_lib.Clip = (0.0, 1.0),
    steps: int = 40,
    step_size_factor: float = 2.5,
    restarts: int = 1,
    random_start: bool = False,
    batch_size: int = 128,
    max_examples: int | None = None,
    seed: int = 0,
    tolerance: float = 0.01,
    zero_gradient_threshold: float = 0.05,
    jit_compile: bool | None = None,
) -> RobustnessReport:
    """Accuracy of a classifier under FGSM, PGD and random noise, with checks.

    Args:
        model: A Keras classifier (logits or probabilities).
        data: A `tf.data.Dataset` of (x, y) or (x, y, sample_weight) batches
            (weights are ignored), or a tuple (x, y) of arrays.
        epsilons: Radii per norm, `{p: [epsilon, ...]}` with p in 1, 2, inf;
            None for `DEFAULT_EPSILONS` (inputs in [0, 1]).
        attacks: Any of "fgsm" and "pgd". Noise of norm epsilon is always run.
        loss: The loss to attack; None for the model's compiled loss. Its
            `from_logits` says how outputs are read.
        clip: The box (low, high) of valid inputs, or None.
        steps: PGD steps per restart, >= 1.
        step_size_factor: PGD step size is `step_size_factor * epsilon / steps`.
        restarts: PGD random restarts, >= 1.
        random_start: PGD starts at a uniform point of the ball instead of
            at x. Off by default: on an MNIST-shaped MLP, L2 PGD from random
            starts (on the sphere, in effect) stayed weaker than FGSM on one
            example in 64 even with 100 steps and 5 restarts; from x it was not.
        batch_size: Batch size when `data` is a tuple of arrays.
        max_examples: Stop after this many examples (None: all of `data`).
        seed: Seed of PGD starts and of the noise, for a reproducible report.
        tolerance: Accuracy differences up to this are not flagged.
        zero_gradient_threshold: Flag if a larger share of examples has an
            exactly-zero input gradient.
        jit_compile: Passed to the attacks (None: XLA only with a GPU).

    Returns:
        A `RobustnessReport`. Its `flags` name what looks wrong:
        `accuracy_not_decreasing` (an attack's accuracy rises with epsilon or
        above clean), `pgd_weaker_than_fgsm`, `zero_gradients`,
        `noise_stronger_than_attack`, `probabilities_with_logits_loss` and
        `logits_with_probability_loss`.

    Raises:
        ValueError: On invalid arguments or data without labels, before any
            computation.
    """
    epsilons = _check_epsilons(epsilons)
    attacks = _check_attacks(attacks)
    clip = attacks_lib.check_clip(clip)
    steps = attacks_lib._check_count(steps, "steps")
    restarts = attacks_lib._check_count(restarts, "restarts")
    batch_size = attacks_lib._check_count(batch_size, "batch_size")
    if max_examples is not None:
        max_examples = attacks_lib._check_count(max_examples, "max_examples")
    step_size_factor = attacks_lib.check_epsilon(step_size_factor, "step_size_factor")
    tolerance = attacks_lib.check_epsilon(tolerance, "tolerance")
    zero_gradient_threshold = attacks_lib.check_epsilon(
        zero_gradient_threshold, "zero_gradient_threshold"
    )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"`seed` must be an integer. Received: seed={seed!r}")
    if restarts > 1 and not random_start:
        raise ValueError(
            "Restarts without a random start repeat the same attack: set "
            f"`random_start=True` or `restarts=1`. Received: restarts={restarts}"
        )
    dataset = _as_dataset(data, batch_size)
    resolve_loss(model, loss)  # Fails early without a usable loss.
    from_logits = attacks_lib.loss_from_logits(model, loss)

    ps = list(epsilons)
    configs = [(name, p, e) for p in ps for e in epsilons[p] for name in (*attacks, "noise")]
    clean = attacks_lib.compiled_kernel(model, loss, _clean_fn, ps=tuple(ps))
    noise = {p: attacks_lib.compiled_kernel(model, loss, _noise_fn, p=p) for p in ps}
    correct_counts = np.zeros(len(configs))
    totals = dict(n=0, correct=0, zero=0, probability=0, in_unit=0)
    norm_sums = np.zeros(len(ps))

    for batch_index, batch in enumerate(dataset):
        x, y = batch[0], batch[1]
        if max_examples is not None:
            remaining = max_examples - totals["n"]
            if remaining <= 0:
                break
            x, y = x[:remaining], y[:remaining]
        x, y = attacks_lib._check_inputs(x, y)
        correct, norms, zero, probability, in_unit = clean(x, y, jit_compile=jit_compile)
        totals["n"] += int(x.shape[0])
        for key, value in (
            ("correct", correct),
            ("zero", zero),
            ("probability", probability),
            ("in_unit", in_unit),
        ):
            totals[key] += int(np.sum(value.numpy()))
        norm_sums += np.sum(norms.numpy(), axis=1)
        low, high = attacks_lib._bounds(clip, x)
        for index, (name, p, epsilon) in enumerate(configs):
            seed_tensor = tf.constant([seed, batch_index * len(configs) + index], tf.int64)
            if name == "noise":
                eps = tf.constant(epsilon, x.dtype)
                hit = noise[p](x, y, eps, low, high, seed_tensor, jit_compile=jit_compile)
            elif name == "fgsm":
                _, hit = attacks_lib.fgsm_with_correct(
                    model, x, y, epsilon, p, loss, clip, jit_compile=jit_compile
                )
            else:
                _, hit = attacks_lib.pgd_with_correct(
                    model,
                    x,
                    y,
                    epsilon,
                    p,
                    steps,
                    step_size_factor * epsilon / steps,
                    random_start,
                    restarts,
                    loss,
                    clip,
                    seed_tensor,
                    jit_compile=jit_compile,
                )
            correct_counts[index] += int(np.sum(hit.numpy()))

    n = totals["n"]
    if n == 0:
        raise ValueError(f"`data` yielded no examples. Received: data={_short_repr(data)}")
    rows = [
        {"attack": name, "p": p_label(p), "epsilon": epsilon, "accuracy": count / n}
        for (name, p, epsilon), count in zip(configs, correct_counts)
    ]
    clean_accuracy = totals["correct"] / n
    zero_share = totals["zero"] / n
    flags = _sanity_flags(
        rows,
        clean_accuracy,
        attacks,
        tolerance,
        zero_share,
        zero_gradient_threshold,
        from_logits,
        totals["probability"] / n,
        1.0 - totals["in_unit"] / n,
    )
    settings = {
        "loss_from_logits": from_logits,
        "attacks": list(attacks),
        "clip": None if clip is None else [np.asarray(b).tolist() for b in clip],
        "steps": steps,
        "step_size_factor": step_size_factor,
        "restarts": restarts,
        "random_start": bool(random_start),
        "seed": int(seed),
        "tolerance": tolerance,
        "zero_gradient_threshold": zero_gradient_threshold,
    }
    return RobustnessReport(
        num_examples=n,
        clean_accuracy=clean_accuracy,
        rows=rows,
        gradient_norms={str(p_label(p)): float(s / n) for p, s in zip(ps, norm_sums)},
        zero_gradient_share=zero_share,
        flags=flags,
        settings=settings,
    )


def _sanity_flags(
    rows,
    clean_accuracy,
    attacks,
    tolerance,
    zero_share,
    zero_threshold,
    from_logits,
    probability_share,
    outside_unit_share,
) -> dict[str, str]:
    """The checks of a sound evaluation that failed, name -> explanation."""
    problems: dict[str, list[str]] = {}

    def accuracy(name, p, epsilon):
        return next(
            r["accuracy"]
            for r in rows
            if r["attack"] == name and r["p"] == p and r["epsilon"] == epsilon
        )

    points = sorted({(r["p"], r["epsilon"]) for r in rows}, key=lambda t: _row_order(t))
    for name in attacks:
        for p in dict.fromkeys(p for p, _ in points):
            previous_eps, previous = 0.0, clean_accuracy
            for _, epsilon in (t for t in points if t[0] == p):
                value = accuracy(name, p, epsilon)
                if value > previous + tolerance:
                    problems.setdefault("accuracy_not_decreasing", []).append(
                        f"{name} p={p}: {100 * previous:.2f}% at epsilon={previous_eps:g} "
                        f"but {100 * value:.2f}% at epsilon={epsilon:g}"
                    )
                previous_eps, previous = epsilon, value
    for p, epsilon in points:
        if "fgsm" in attacks and "pgd" in attacks:
            fgsm, pgd = accuracy("fgsm", p, epsilon), accuracy("pgd", p, epsilon)
            if pgd > fgsm + tolerance:
                problems.setdefault("pgd_weaker_than_fgsm", []).append(
                    f"p={p} epsilon={epsilon:g}: pgd {100 * pgd:.2f}% > fgsm {100 * fgsm:.2f}%"
                )
        strongest = min(accuracy(name, p, epsilon) for name in attacks)
        noise = accuracy("noise", p, epsilon)
        if noise < strongest - tolerance:
            problems.setdefault("noise_stronger_than_attack", []).append(
                f"p={p} epsilon={epsilon:g}: noise {100 * noise:.2f}% < "
                f"best attack {100 * strongest:.2f}%"
            )
    flags = {name: "; ".join(items) for name, items in problems.items()}
    if zero_share > zero_threshold:
        flags["zero_gradients"] = (
            f"{100 * zero_share:.1f}% of examples have an exactly-zero input gradient "
            f"(threshold {100 * zero_threshold:.1f}%): gradient attacks cannot move "
            "them, so their accuracy is not evidence of robustness (saturated or "
            "clipped outputs, a non-differentiable layer, or a wrong loss)."
        )
    if from_logits is True and probability_share > 0.99:
        flags["probabilities_with_logits_loss"] = (
            f"{100 * probability_share:.1f}% of outputs look like probabilities but the "
            "loss has from_logits=True: gradients are those of the wrong loss."
        )
    if from_logits is False and outside_unit_share > 0.01:
        flags["logits_with_probability_loss"] = (
            f"{100 * outside_unit_share:.1f}% of outputs lie outside [0, 1] but the "
            "loss has from_logits=False: the loss clips them, gradients vanish."
        )
    return flags
