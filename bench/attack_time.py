"""Throughput of the attacks against the model's own forward and backward passes.

A gradient attack cannot run faster than the model computes input gradients,
and a score-based one faster than it computes outputs. This script measures,
in one process and on one batch:

- raw_gradient: a compiled loop of N forward + backward passes (the input
  gradient of the cross-entropy), nothing else: the physical limit of a
  gradient attack of N steps;
- raw_forward: a compiled loop of Q forward passes: the limit of Q queries;
- pgd, apgd-ce, apgd-t (one target): N steps each; square-inf, square-2: Q
  queries each;
- numpy-apgd: APGD-CE driven from a NumPy loop that calls the same compiled
  gradient function once per step (what toolkits that wrap a framework's
  gradient do), with the updates in NumPy.

Each runs with XLA on and off (`jit_compile`). Figures are examples x
iterations per second and the ratio of each attack's time to its raw loop's;
repetitions of everything are interleaved round-robin and the best counts.
Labels are the model's own predictions and epsilon is tiny, so every example
stays correctly classified and every iteration runs.

    python bench/attack_time.py                     # see bench/README.md
    python bench/attack_time.py --repetitions=2 --steps=20 --queries=100 --batch_sizes=100  # quick
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

import keras_gradreg as kgr  # noqa: E402
from keras_gradreg.attacks import auto_pgd, scores  # noqa: E402

ATTACKS = ("pgd", "apgd-ce", "apgd-t", "numpy-apgd", "square-inf", "square-2")

FLAGS = flags.FLAGS
flags.DEFINE_list("attacks", list(ATTACKS), f"Attacks to time, from {ATTACKS}.")
flags.DEFINE_list("xla", ["off", "on"], "XLA settings: on (jit_compile=True), off.")
flags.DEFINE_list("batch_sizes", ["1000", "100"], "Examples per attack call; one table each.")
flags.DEFINE_integer("steps", 100, "Iterations of the gradient attacks.")
flags.DEFINE_integer("queries", 500, "Queries of the Square attack.")
flags.DEFINE_integer("repetitions", 5, "Timed repetitions; the best one counts.")
flags.DEFINE_float("epsilon", 1e-4, "Radius (tiny, so that no example is broken).")
flags.DEFINE_string("data_npz", "../shared/data/mnist.npz", "MNIST .npz (random images if absent).")
flags.DEFINE_string("json_out", "bench/results/attack_time.json", "Where to write the results.")
flags.DEFINE_integer("seed", 0, "Seed of the weights.")
flags.DEFINE_enum(
    "input", "image", ["image", "flat"],
    "The MLP's input: 28x28x1 images, or flat 784-vectors (one-row windows for Square).",
)  # fmt: skip


def input_shape() -> tuple[int, ...]:
    """One example's shape: --input's 784-vector or 28x28x1 image."""
    return (784,) if FLAGS.input == "flat" else (28, 28, 1)


def images(count: int) -> np.ndarray:
    """The first MNIST test images in [0, 1], or uniform noise without the file."""
    shape = (count, *input_shape())
    if os.path.exists(FLAGS.data_npz):
        with np.load(FLAGS.data_npz) as data:
            return data["x_test"][:count].reshape(shape).astype(np.float32) / 255.0
    return np.random.default_rng(0).uniform(size=shape).astype(np.float32)


def raw_gradient_loop(model: keras.Model, jit: bool) -> Callable:
    @tf.function(jit_compile=jit)
    def run(x, label, count):
        def body(i, total):
            point = x + 1e-7 * tf.cast(i, x.dtype)  # a new point each step: nothing to hoist
            with tf.GradientTape() as tape:
                tape.watch(point)
                loss = tf.reduce_sum(scores.cross_entropy(model(point, training=False), label))
            return i + 1, total + tape.gradient(loss, point)

        return tf.while_loop(lambda i, _: i < count, body, (0, tf.zeros_like(x)))[1]

    return run


def raw_forward_loop(model: keras.Model, jit: bool) -> Callable:
    @tf.function(jit_compile=jit)
    def run(x, count):
        def body(i, total):
            shifted = x + 1e-6 * tf.cast(i, x.dtype)  # a new input each query
            return i + 1, total + model(shifted, training=False)

        total = tf.zeros_like(model(x, training=False))
        return tf.while_loop(lambda i, _: i < count, body, (0, total))[1]

    return run


def numpy_apgd(gradient_fn: Callable, x: np.ndarray, label: np.ndarray, epsilon: float, steps: int):
    """APGD-CE (L-inf) with NumPy updates around a compiled gradient (the toolkit way)."""
    rng = np.random.default_rng(0)
    start = rng.uniform(-1, 1, size=x.shape).astype(np.float32)
    per_example = (len(x),) + (1,) * (x.ndim - 1)  # one value per example, broadcast
    start = epsilon * start / np.abs(start).reshape(len(x), -1).max(1).reshape(per_example)
    x_adv = np.clip(x + start, 0.0, 1.0)
    loss, grad, logits = (t.numpy() for t in gradient_fn(x_adv, label))
    x_best, loss_best, grad_best = x_adv.copy(), loss.copy(), grad.copy()
    step = np.full(per_example, 2.0 * epsilon, np.float32)
    x_prev = x_adv.copy()
    marks = set(auto_pgd.checkpoints(steps))
    increases = np.zeros(len(x))
    loss_prev, checked, halved_last, last = loss.copy(), loss_best.copy(), np.ones(len(x), bool), 0
    for k in range(steps):
        alpha = 1.0 if k == 0 else 0.75
        z = np.clip(np.clip(x_adv + step * np.sign(grad), x - epsilon, x + epsilon), 0.0, 1.0)
        moved = x_adv + alpha * (z - x_adv) + (1 - alpha) * (x_adv - x_prev)
        x_prev, x_adv = x_adv, np.clip(np.clip(moved, x - epsilon, x + epsilon), 0.0, 1.0)
        loss, grad, logits = (t.numpy() for t in gradient_fn(x_adv, label))
        increases += loss > loss_prev
        loss_prev = loss
        better = loss > loss_best
        x_best[better], grad_best[better] = x_adv[better], grad[better]
        loss_best[better] = loss[better]
        if k + 1 in marks:
            halve = (increases < 0.75 * (k + 1 - last)) | (~halved_last & (loss_best <= checked))
            step[halve] /= 2.0
            x_adv[halve], grad[halve] = x_best[halve], grad_best[halve]
            loss_prev[halve] = loss_best[halve]
            halved_last, checked, increases, last = halve, loss_best.copy(), 0 * increases, k + 1
    return x_best


def gradient_function(model: keras.Model, jit: bool) -> Callable:
    @tf.function(jit_compile=jit)
    def run(x, label):
        with tf.GradientTape() as tape:
            tape.watch(x)
            logits = model(x, training=False)
            loss = scores.cross_entropy(logits, label)
            total = tf.reduce_sum(loss)
        return loss, tape.gradient(total, x), logits

    return run


def jobs(model, x, label, jit: bool) -> dict[str, tuple[Callable, int]]:
    """name -> (a call that runs to completion, iterations it does)."""
    n, q, eps = FLAGS.steps, FLAGS.queries, FLAGS.epsilon
    x_t, label_t = tf.constant(x), tf.constant(label)
    raw_g, raw_f = raw_gradient_loop(model, jit), raw_forward_loop(model, jit)
    grad_fn = gradient_function(model, jit)
    attack = dict(seed=0, jit_compile=jit)
    table = {
        "raw_gradient": (lambda: raw_g(x_t, label_t, tf.constant(n)).numpy(), n),
        "raw_forward": (lambda: raw_f(x_t, tf.constant(q)).numpy(), q),
        "pgd": (lambda: kgr.attacks.pgd(model, x, label, eps, steps=n, **attack).numpy(), n),
        "apgd-ce": (lambda: kgr.attacks.apgd(model, x, label, eps, steps=n, **attack).numpy(), n),
        "apgd-t": (
            lambda: kgr.attacks.apgd(
                model, x, label, eps, loss="dlr", targeted=True, target_classes=1, steps=n,
                **attack,
            ).numpy(),
            n,
        ),  # fmt: skip
        "numpy-apgd": (lambda: numpy_apgd(grad_fn, x, label, eps, n), n),
        "square-inf": (
            lambda: kgr.attacks.square(model, x, label, eps, queries=q, **attack).numpy(), q
        ),
        "square-2": (
            lambda: kgr.attacks.square(model, x, label, eps, p=2, queries=q, **attack).numpy(), q
        ),
    }
    keep = {"raw_gradient", "raw_forward", *FLAGS.attacks}
    return {name: job for name, job in table.items() if name in keep}


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }


def measure(model, batch_size: int, settings: list[bool]) -> tuple[list[dict], list[float]]:
    """Every job at one batch size, repetitions interleaved; the rows and load averages."""
    x = images(batch_size)
    label = np.argmax(model.predict(x, verbose=0), axis=1).astype(np.int32)
    all_jobs = {
        (name, jit): job for jit in settings for name, job in jobs(model, x, label, jit).items()
    }
    for call, _ in all_jobs.values():  # trace and compile
        call()
    times = {key: [] for key in all_jobs}
    loads = []
    for _ in range(FLAGS.repetitions):
        loads.append(os.getloadavg()[0])
        for key, (call, _) in all_jobs.items():
            start = time.perf_counter()
            call()
            times[key].append(time.perf_counter() - start)
    rows = []
    for (name, jit), (_, iterations) in all_jobs.items():
        best = min(times[(name, jit)])
        raw = "raw_forward" if name.startswith(("square", "raw_forward")) else "raw_gradient"
        rows.append(
            {
                "attack": name,
                "xla": jit,
                "batch_size": batch_size,
                "seconds": best,
                "iterations": iterations,
                "example_iterations_per_second": batch_size * iterations / best,
                "x_raw": best / min(times[(raw, jit)]),
                "all_seconds": times[(name, jit)],
            }
        )
    return rows, loads


def print_table(rows: list[dict], loads: list[float], batch_size: int) -> None:
    print(f"\nbatch {batch_size}, {FLAGS.steps} steps, {FLAGS.queries} queries; "
          f"load average {min(loads):.1f}-{max(loads):.1f}")  # fmt: skip
    print("| attack | XLA | s | iterations | examples x iterations / s | x raw |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row['attack']} | {'on' if row['xla'] else 'off'} | {row['seconds']:.3f} | "
            f"{row['iterations']} | {row['example_iterations_per_second']:.0f} | "
            f"{row['x_raw']:.2f} |"
        )
    numpy_rows = {r["xla"]: r for r in rows if r["attack"] == "numpy-apgd"}
    for row in rows:
        if row["attack"] == "apgd-ce" and row["xla"] in numpy_rows:
            speedup = numpy_rows[row["xla"]]["seconds"] / row["seconds"]
            print(f"apgd-ce vs numpy-apgd (XLA {'on' if row['xla'] else 'off'}): {speedup:.2f}x")


def main(argv: list[str]) -> None:
    del argv
    unknown = set(FLAGS.attacks) - set(ATTACKS)
    if unknown:
        raise app.UsageError(f"--attacks must be from {ATTACKS}. Received: {sorted(unknown)}")
    keras.utils.set_random_seed(FLAGS.seed)
    model = kgr.networks.maxout_mlp(input_shape=input_shape())
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    settings = [s == "on" for s in FLAGS.xla]
    all_rows, all_loads = [], []
    for batch_size in (int(b) for b in FLAGS.batch_sizes):
        rows, loads = measure(model, batch_size, settings)
        print_table(rows, loads, batch_size)
        all_rows += rows
        all_loads += loads
    os.makedirs(os.path.dirname(FLAGS.json_out) or ".", exist_ok=True)
    with open(FLAGS.json_out, "w") as file:
        names = ("attacks", "xla", "batch_sizes", "steps", "queries", "repetitions", "epsilon",
                 "input")  # fmt: skip
        json.dump(
            {"flags": {k: FLAGS[k].value for k in names}, "machine": machine(),
             "load_average": all_loads, "rows": all_rows},
            file, indent=2,
        )  # fmt: skip


if __name__ == "__main__":
    app.run(main)
