"""Cost of one RegularizedModel training step against a plain Keras step.

For each network configuration, times the train step of a plain
`keras.Model` and of `kgr.RegularizedModel` with each method, XLA on and off,
all in this one process. Every model of a configuration wraps the same layers
(`keras.Model(net.inputs, net.outputs)` for the plain baseline: Keras's own
`train_step`, not RegularizedModel with sigma = 0), and their repetitions are
interleaved round-robin, so machine noise hits them alike. A repetition times
`--steps` back-to-back steps; the figure is the best repetition.

    python bench/step_time.py                 # full run, see bench/README.md
    python bench/step_time.py --quick         # MLPs only, few steps

With `--every` and `--fractions`, each regularized method is timed for
every combination (`GradientRegularizer(every=k, fraction=f)`); a
repetition's steps must hold whole cycles of k steps, so its figure is the
mean cost per step over a cycle. `--assign_sigma` adds a penalty row whose
sigma is assigned before every step (what a schedule does, at most).

Memory ("step MiB") is the peak of TensorFlow's CPU allocator during one
extra step minus what it held just before (`reset_memory_stats` and
`get_memory_info("CPU:0")`): the activations, gradients and XLA temporary
buffers the step needs on top of the resident weights and optimizer slots
(recorded separately in the JSON). Python objects, compiled code and memory
the allocator keeps free are not counted.
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import platform
import sys
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

import keras_gradreg as kgr  # noqa: E402
from keras_gradreg.layers import FastDropout  # noqa: E402

CONFIGS = ("maxout_mlp_bare", "maxout_mlp_preset", "conv_maxout_mnist", "conv_maxout_cifar10")
METHODS = ("plain", "penalty", "adversarial", "finite_difference")

FLAGS = flags.FLAGS
flags.DEFINE_list("configs", None, f"Configurations, from {CONFIGS}. Default: all (--quick: MLPs).")
flags.DEFINE_list("methods", list(METHODS), f"Steps to time, from {METHODS}.")
flags.DEFINE_list("xla", ["on", "off"], "XLA settings: on (jit_compile=True), off.")
flags.DEFINE_list(
    "dropout",
    ["keras", "fast"],
    "Dropout layers for configurations with dropout: keras (stock "
    "keras.layers.Dropout) and/or fast (kgr.layers.FastDropout, what kgr.networks builds).",
)
flags.DEFINE_enum("fast_rng_alg", "auto", ["auto", "philox", "threefry"], "FastDropout's rng_alg.")
flags.DEFINE_integer("batch_size", 128, "Examples per step.")
flags.DEFINE_integer("steps", 10, "Steps per timed repetition (MLPs).")
flags.DEFINE_integer("repetitions", 15, "Timed repetitions; the best one counts (MLPs).")
flags.DEFINE_integer("warmup", 5, "Untimed steps per model after compilation (MLPs).")
flags.DEFINE_integer("conv_steps", 1, "Steps per repetition for the conv network.")
flags.DEFINE_integer("conv_repetitions", 3, "Repetitions for the conv network.")
flags.DEFINE_integer("conv_warmup", 1, "Warm-up steps for the conv network.")
flags.DEFINE_bool("quick", False, "Smoke run: 5 steps x 2 repetitions, MLPs unless --configs.")
flags.DEFINE_bool("memory", True, "Measure peak allocator memory (one extra step per model).")
flags.DEFINE_list(
    "every", ["1"], "Values of GradientRegularizer(every=...) to time each method with."
)
flags.DEFINE_list(
    "fractions", ["1"], "Values of GradientRegularizer(fraction=...) to time each method with."
)
flags.DEFINE_bool(
    "assign_sigma", False, "Also time the penalty step with sigma assigned before every step."
)
flags.DEFINE_float("p", 2.0, "Perturbation norm p of the regularizer.")
flags.DEFINE_float("sigma", 0.1, "Radius sigma of the regularizer.")
flags.DEFINE_float("learning_rate", 0.1, "SGD learning rate.")
flags.DEFINE_float(
    "momentum",
    0.5,
    "SGD momentum of the preset configurations (the maxout paper's initial momentum).",
)
flags.DEFINE_string("json_out", "bench/results/step_time.json", "Where to write the results.")
flags.DEFINE_integer("seed", 0, "Seed of weights and data.")

OWN_FLAGS = (
    "methods",
    "xla",
    "dropout",
    "fast_rng_alg",
    "batch_size",
    "steps",
    "repetitions",
    "warmup",
    "conv_steps",
    "conv_repetitions",
    "conv_warmup",
    "quick",
    "memory",
    "every",
    "fractions",
    "assign_sigma",
    "p",
    "sigma",
    "learning_rate",
    "momentum",
    "seed",
)
for _name in ("steps", "repetitions", "conv_steps", "conv_repetitions", "batch_size"):
    flags.register_validator(_name, lambda v: v >= 1, message=f"--{_name} must be >= 1")
for _name in ("warmup", "conv_warmup"):
    flags.register_validator(_name, lambda v: v >= 0, message=f"--{_name} must be >= 0")
flags.register_validator("xla", lambda v: set(v) <= {"on", "off"}, "--xla: on, off")
flags.register_validator("methods", lambda v: set(v) <= set(METHODS), f"--methods: {METHODS}")
flags.register_validator("dropout", lambda v: set(v) <= {"keras", "fast"}, "--dropout: keras, fast")
flags.register_validator(
    "configs", lambda v: v is None or set(v) <= set(CONFIGS), f"--configs: {CONFIGS}"
)


def _all(values: list[str], kind: type, check) -> bool:
    try:
        return all(check(kind(v)) for v in values)
    except ValueError:
        return False


flags.register_validator(
    "every", lambda v: _all(v, int, lambda k: k >= 1), "--every: integers >= 1"
)
flags.register_validator(
    "fractions", lambda v: _all(v, float, lambda f: 0 < f <= 1), "--fractions: numbers in (0, 1]"
)


def lazy_settings() -> list[tuple[int, float]]:
    """The (every, fraction) pairs to time each regularized method with."""
    return [(int(k), float(f)) for k in FLAGS.every for f in FLAGS.fractions]


def step_name(method: str, every: int, fraction: float, assign: bool = False) -> str:
    """'penalty', 'penalty every=4', 'penalty every=4 fraction=0.25', ..."""
    parts = [method]
    if every != 1:
        parts.append(f"every={every}")
    if fraction != 1.0:
        parts.append(f"fraction={fraction:g}")
    if assign:
        parts.append("sigma assigned each step")
    return " ".join(parts)


def network(config: str) -> tuple[keras.Model, tuple[int, ...], bool]:
    """The untrained network of a configuration, its input shape, and momentum use."""
    if config == "maxout_mlp_bare":
        net = kgr.networks.maxout_mlp((784,), input_dropout=0, hidden_dropout=0, max_norm=None)
        return net, (784,), False
    if config == "maxout_mlp_preset":
        return kgr.networks.maxout_mlp((784,)), (784,), True
    if config == "conv_maxout_mnist":
        return kgr.networks.conv_maxout_mnist((28, 28, 1)), (28, 28, 1), True
    if config == "conv_maxout_cifar10":
        return kgr.networks.conv_maxout_cifar10((32, 32, 3)), (32, 32, 3), True
    raise ValueError(f"Unknown configuration. Received: config={config!r}")


def with_dropout(net: keras.Model, kind: str) -> keras.Model:
    """A clone of `net` whose dropout layers are stock Keras ("keras") or FastDropout."""

    def clone(layer):
        if isinstance(layer, keras.layers.Dropout):
            config = {k: v for k, v in layer.get_config().items() if k != "rng_alg"}
            if kind == "fast":
                return FastDropout.from_config({**config, "rng_alg": FLAGS.fast_rng_alg})
            return keras.layers.Dropout.from_config(config)
        return layer.__class__.from_config(layer.get_config())

    return keras.models.clone_model(net, clone_function=clone)


def has_dropout(net: keras.Model) -> bool:
    return any(isinstance(layer, keras.layers.Dropout) for layer in net.layers)


def make_model(
    net: keras.Model, method: str, xla: bool, momentum: bool, every: int = 1, fraction: float = 1.0
) -> keras.Model:
    """A compiled model over `net`'s layers: plain Keras or RegularizedModel."""
    if method == "plain":
        model = keras.Model(net.inputs, net.outputs, name="plain")
    else:
        regularizer = kgr.GradientRegularizer(
            p=FLAGS.p, sigma=FLAGS.sigma, method=method, every=every, fraction=fraction
        )
        name = f"{method}_every{every}_fraction{fraction:g}".replace(".", "_")
        model = kgr.RegularizedModel(net.inputs, net.outputs, regularizer=regularizer, name=name)
    optimizer = keras.optimizers.SGD(
        FLAGS.learning_rate, momentum=FLAGS.momentum if momentum else 0.0
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=xla,
    )
    return model


class Runner:
    """Runs training steps of one compiled model on one fixed batch."""

    def __init__(self, model: keras.Model, x: tf.Tensor, y: tf.Tensor, assign_sigma=False):
        self.model = model
        self.x, self.y = x, y
        # Alternates sigma between two values before every step (a schedule's worst case).
        self.sigmas = itertools.cycle([FLAGS.sigma, 0.5 * FLAGS.sigma]) if assign_sigma else None
        start = time.perf_counter()
        model.train_on_batch(x, y)  # Builds, traces and compiles.
        self.first_step_s = time.perf_counter() - start
        model.make_train_function()
        # Keras's train function takes one batch per call from a Python
        # iterator (the path of `train_on_batch`, without its metric resets).
        self._batches = itertools.repeat((x, y))

    def run(self, steps: int) -> float:
        """Runs `steps` steps and returns the wall time in seconds."""
        start = time.perf_counter()
        for _ in range(steps):
            if self.sigmas is not None:
                self.model.regularizer.sigma = next(self.sigmas)
            logs = self.model.train_function(self._batches)
        float(logs["loss"])  # Waits for the last step.
        return time.perf_counter() - start

    def peak_memory(self, steps: int = 1) -> tuple[int, int] | None:
        """Bytes held before `steps` steps and peak bytes above that during them.

        Both from TensorFlow's CPU allocator; None where it keeps no stats.
        """
        try:
            tf.config.experimental.reset_memory_stats("CPU:0")
            resident = tf.config.experimental.get_memory_info("CPU:0")["current"]
            self.run(steps)
            peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
        except (ValueError, tf.errors.OpError):
            return None
        return int(resident), int(peak - resident)


def mib(pair: tuple[int, int] | None, index: int) -> float | None:
    return None if pair is None else pair[index] / 2**20


def bench_config(config: str, dropout: str | None, counts: dict[str, int]) -> list[dict]:
    """Times every (XLA, method) model of one configuration, interleaved."""
    keras.utils.set_random_seed(FLAGS.seed)
    net, input_shape, momentum = network(config)
    if dropout is not None:
        net = with_dropout(net, dropout)
    rng = np.random.default_rng(FLAGS.seed)
    x = tf.constant(rng.random((FLAGS.batch_size, *input_shape), dtype=np.float32))
    y = tf.constant(rng.integers(0, 10, FLAGS.batch_size), dtype=tf.int32)
    label = config
    if dropout == "keras":
        label = f"{config}[keras.Dropout]"
    elif dropout == "fast":
        label = f"{config}[FastDropout:{FLAGS.fast_rng_alg}]"
    steps = [("plain", 1, 1.0, False)] if "plain" in FLAGS.methods else []
    for method in FLAGS.methods:
        if method != "plain":
            steps += [(method, every, fraction, False) for every, fraction in lazy_settings()]
    if FLAGS.assign_sigma and "penalty" in FLAGS.methods:
        steps.append(("penalty", 1, 1.0, True))
    runners = {}
    for xla, (method, every, fraction, assign) in itertools.product(FLAGS.xla, steps):
        name = step_name(method, every, fraction, assign)
        model = make_model(net, method, xla == "on", momentum, every, fraction)
        runners[xla, name] = Runner(model, x, y, assign_sigma=assign)
        runners[xla, name].every = every
        print(f"  {label} xla={xla} {name}: first step {runners[xla, name].first_step_s:.1f} s")
    for runner in runners.values():
        runner.run(counts["warmup"]) if counts["warmup"] else None
    load_before = os.getloadavg()
    times = {key: [] for key in runners}
    for _ in range(counts["repetitions"]):
        for key, runner in runners.items():
            times[key].append(runner.run(counts["steps"]) / counts["steps"])
    load_after = os.getloadavg()
    memory = {key: r.peak_memory(r.every) if FLAGS.memory else None for key, r in runners.items()}
    rows = []
    for (xla, method), samples in times.items():
        best = min(samples)
        plain = min(times[xla, "plain"]) if (xla, "plain") in times else None
        no_xla = min(times["off", method]) if ("off", method) in times else None
        rows.append(
            {
                "config": label,
                "xla": xla,
                "method": method,
                "every": runners[xla, method].every,
                "ms_per_step": 1e3 * best,
                "median_ms_per_step": 1e3 * float(np.median(samples)),
                "ratio_to_plain": best / plain if plain else None,
                "median_ratio_to_plain": (
                    float(np.median(samples) / np.median(times[xla, "plain"])) if plain else None
                ),
                "xla_speedup": no_xla / best if xla == "on" and no_xla else None,
                "examples_per_s": FLAGS.batch_size / best,
                "step_memory_mib": mib(memory[xla, method], 1),
                "resident_memory_mib": mib(memory[xla, method], 0),
                "first_step_s": runners[xla, method].first_step_s,
                "samples_ms": [1e3 * t for t in samples],
                "load_before": load_before,
                "load_after": load_after,
                **counts,
            }
        )
    del runners, net
    keras.backend.clear_session()
    gc.collect()
    return rows


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    """The results as a Markdown table (ms/step and ratios: best repetition; median ratio too)."""
    lines = [
        "| configuration | XLA | step | ms/step | x plain | x plain (median) | XLA speed-up "
        "| examples/s | step MiB |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['xla']} | {r['method']} | {r['ms_per_step']:.1f} "
            f"| {_fmt(r['ratio_to_plain'], '.2f')} | {_fmt(r.get('median_ratio_to_plain'), '.2f')} "
            f"| {_fmt(r['xla_speedup'], '.2f')} "
            f"| {r['examples_per_s']:.0f} | {_fmt(r['step_memory_mib'], '.1f')} |"
        )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "keras_gradreg": kgr.__version__,
    }


def main(argv: list[str]) -> None:
    del argv
    configs = FLAGS.configs or (list(CONFIGS[:2]) if FLAGS.quick else list(CONFIGS))
    mlp = {"steps": FLAGS.steps, "repetitions": FLAGS.repetitions, "warmup": FLAGS.warmup}
    conv = {
        "steps": FLAGS.conv_steps,
        "repetitions": FLAGS.conv_repetitions,
        "warmup": FLAGS.conv_warmup,
    }
    if FLAGS.quick:
        mlp = {"steps": 5, "repetitions": 2, "warmup": 1}
        conv = {"steps": 1, "repetitions": 1, "warmup": 0}
    for config in configs:
        steps = FLAGS.conv_steps if config.startswith("conv") else FLAGS.steps
        if FLAGS.quick:
            steps = 1 if config.startswith("conv") else 5
        uneven = [k for k, _ in lazy_settings() if steps % k]
        if uneven:
            raise app.UsageError(
                f"A repetition must hold whole cycles of `every` steps: {steps} steps per "
                f"repetition of {config} is not a multiple of every={uneven}."
            )
    info = machine()
    print(
        f"{info['cpu']}, {info['cpu_count']} CPUs, TF {info['tensorflow']}, "
        f"Keras {info['keras']}; load average at start {os.getloadavg()}"
    )
    rows = []
    for config in configs:
        counts = conv if config.startswith("conv") else mlp
        net, _, _ = network(config)
        variants = FLAGS.dropout if has_dropout(net) else [None]
        del net
        for dropout in variants:
            rows.extend(bench_config(config, dropout, counts))
            print(table([r for r in rows if r["config"].startswith(config)]), flush=True)
    print("\n" + table(rows))
    settings = {name: FLAGS[name].value for name in OWN_FLAGS}
    result = {"machine": info, "flags": {**settings, "configs": configs}, "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json_out)), exist_ok=True)
    with open(FLAGS.json_out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nWrote {FLAGS.json_out}; load average at end {os.getloadavg()}")


if __name__ == "__main__":
    app.run(main)
