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

With `--reference`, a second protocol (issue 17): on the small ReLU CNN and
the bare maxout MLP (`--ref_configs`), each estimator's step through `fit`
(`model.train_function`) and through `kgr.regularized_loss` in a custom
`tf.function` loop, against a hand-written `tf.function` step of the same
objective; and `fit`'s skipped (`every=1000`) and sigma = 0 steps against a
plain Keras step. Rows "regularized_loss <method>" call `kgr.regularized_loss`
with its default for a `GradientRegularizer` (`fixed_settings=None`: the
settings read at run time, their zeros fixed when traced); rows ending in
"fixed" pass `fixed_settings=True` (sigma and clean_weight read when
traced), rows ending in "variable" `fixed_settings=False` (read at every
step, nothing decided when traced). `fit` logs
the clean loss, so its rows for the objectives without L(x) (fast FGSM,
PGD-10 at clean_weight 0) are timed against a hand-written step that
returns the clean loss too ("+ clean loss"). All rows of a configuration, XLA on and off, are
interleaved round-robin for `--ref_repetitions` repetitions; the table gives
each row's median and range and the median of its per-repetition ratios to
its reference (and their range), with the load average.

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
flags.DEFINE_bool("reference", False, "Run the reference protocol (hand-written steps) instead.")
flags.DEFINE_list(
    "ref_configs", ["relu_cnn_small", "maxout_mlp_bare"], "Configurations of --reference."
)
flags.DEFINE_list(
    "ref_rows", None, "Only these rows of --reference (names as in its table). Default: all."
)
flags.DEFINE_integer("ref_steps", 5, "Steps per repetition (--reference).")
flags.DEFINE_integer("ref_repetitions", 15, "Interleaved repetitions (--reference).")
flags.DEFINE_integer("ref_warmup", 2, "Untimed steps per row after compilation (--reference).")
flags.DEFINE_float("ref_sigma", 0.3, "sigma of --reference (p = inf).")
flags.DEFINE_integer(
    "threads",
    0,
    "TensorFlow's intra- and inter-op threads (0: its default). 1 makes the figures a "
    "measure of each step's work, robust to a loaded machine.",
)
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
    "reference",
    "ref_configs",
    "ref_rows",
    "ref_steps",
    "ref_repetitions",
    "ref_warmup",
    "ref_sigma",
    "threads",
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


# ---------------------------------------------------------------------- #
# --reference: the library's steps against hand-written ones (issue 17).
# ---------------------------------------------------------------------- #

ESTIMATORS = ("penalty", "adversarial", "finite_difference")
FD_STEP = 0.01


def reference_network(config: str) -> tuple[keras.Model, tuple[int, ...]]:
    """The bench's small ReLU CNN (issue 17) or the bare maxout MLP, untrained."""
    if config == "maxout_mlp_bare":
        net = kgr.networks.maxout_mlp((784,), input_dropout=0, hidden_dropout=0, max_norm=None)
        return net, (784,)
    if config == "cnn_16_32_128":
        # kgr.networks.cnn at the width issue 18's comparison trains (its pooling:
        # CeilMaxPooling2D, strided slices; the same layers as relu_cnn_small).
        net = kgr.networks.cnn(conv_channels=(16, 32), dense_units=128)
        return keras.Model(net.inputs, net.outputs, name="cnn_16_32_128"), (28, 28, 1)
    if config == "relu_cnn_small":
        inputs = keras.Input((28, 28, 1))
        h = keras.layers.Conv2D(16, 5, padding="same", activation="relu")(inputs)
        h = keras.layers.MaxPooling2D(2)(h)
        h = keras.layers.Conv2D(32, 5, padding="same", activation="relu")(h)
        h = keras.layers.MaxPooling2D(2)(h)
        h = keras.layers.Dense(128, activation="relu")(keras.layers.Flatten()(h))
        return keras.Model(inputs, keras.layers.Dense(10)(h), name="relu_cnn_small"), (28, 28, 1)
    raise ValueError(f"Unknown configuration. Received: config={config!r}")


def hand_written_loss(method: str, net: keras.Model, loss_fn, sigma: float) -> Any:
    """`(x, y) -> loss` of one objective, as a user would write it (p = inf, clean_weight 0).

    "plain": L(x). "penalty": L(x) + sigma * sum_i ||g_i||_1 with g the input
    gradient of the batch-mean loss (double backprop). "adversarial": L(x +
    sigma sign(g)). "finite_difference": L(x) + sigma mean_i |l_i(x + h sign(g)) -
    l_i(x)| / h with h = FD_STEP. The perturbations are held constant.
    """

    def clean_and_gradient(x, y):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = loss_fn(y, net(x, training=True))
        return loss, tape.gradient(loss, x)

    def plain(x, y):
        return loss_fn(y, net(x, training=True))

    def penalty(x, y):
        loss, g = clean_and_gradient(x, y)
        return loss + sigma * tf.reduce_sum(tf.abs(g))

    def adversarial(x, y):
        _, g = clean_and_gradient(x, y)
        return loss_fn(y, net(x + sigma * tf.sign(tf.stop_gradient(g)), training=True))

    def finite_difference(x, y):
        with tf.GradientTape() as tape:
            tape.watch(x)
            clean = loss_fn.call(y, net(x, training=True))  # Per example, unreduced.
            loss = tf.reduce_mean(clean)
        g = tape.gradient(loss, x)
        moved = loss_fn.call(y, net(x + FD_STEP * tf.sign(tf.stop_gradient(g)), training=True))
        return loss + sigma * tf.reduce_mean(tf.abs(moved - clean)) / FD_STEP

    def projected(x, x_adv, g, step):
        x_adv = x_adv + step * tf.sign(tf.stop_gradient(g))
        return tf.clip_by_value(x + tf.clip_by_value(x_adv - x, -sigma, sigma), 0.0, 1.0)

    def input_gradient(x_adv, y):
        with tf.GradientTape() as tape:
            tape.watch(x_adv)
            loss = loss_fn(y, net(x_adv, training=True))
        return tape.gradient(loss, x_adv)

    def pgd(steps, step_size):
        def run(x, y):
            noise = tf.random.uniform(tf.shape(x), -sigma, sigma)
            x_adv = tf.clip_by_value(x + noise, 0.0, 1.0)
            for _ in range(steps):
                x_adv = projected(x, x_adv, input_gradient(x_adv, y), step_size * sigma)
            return loss_fn(y, net(tf.stop_gradient(x_adv), training=True))

        return run

    def trades(x, y):
        clean_logits = net(x, training=True)
        clean = tf.nn.softmax(clean_logits)
        fixed = tf.stop_gradient(clean)
        x_adv = x + 0.001 * tf.random.normal(tf.shape(x))
        for _ in range(TRADES_STEPS):
            with tf.GradientTape() as tape:
                tape.watch(x_adv)
                kl = tf.reduce_sum(
                    fixed
                    * (tf.math.log(fixed + 1e-12) - tf.nn.log_softmax(net(x_adv, training=True)))
                )
            x_adv = projected(x, x_adv, tape.gradient(kl, x_adv), 0.25 * sigma)
        moved = tf.nn.log_softmax(net(tf.stop_gradient(x_adv), training=True))
        log_clean = tf.nn.log_softmax(clean_logits)
        kl = tf.reduce_mean(tf.reduce_sum(clean * (log_clean - moved), axis=-1))
        return loss_fn(y, clean_logits) + TRADES_BETA * kl

    return {
        "plain": plain,
        "penalty": penalty,
        "adversarial": adversarial,
        "finite_difference": finite_difference,
        "fast_fgsm": pgd(1, 1.25),
        "pgd10": pgd(10, 0.25),
        "trades": trades,
    }[method]


# The multi-step members (issue 17): their GradientRegularizer settings, each
# against the hand-written step of the same objective (p = inf, box [0, 1]).
TRADES_STEPS, TRADES_BETA = 10, 6.0
# The objectives that do not contain the clean loss L(x) (clean_weight 0 from a random start).
CLEAN_FREE = ("fast_fgsm", "pgd10")
MEMBERS = {
    "fast_fgsm": dict(method="adversarial", steps=1, random_start=True, clip=(0.0, 1.0)),
    "pgd10": dict(method="adversarial", steps=10, random_start=True, clip=(0.0, 1.0)),
    "trades": dict(method="trades", steps=TRADES_STEPS, beta=TRADES_BETA, clip=(0.0, 1.0)),
}


def regularizer_of(method: str, sigma: float, every: int = 1) -> kgr.GradientRegularizer:
    if method in MEMBERS:
        return kgr.GradientRegularizer(p="inf", sigma=sigma, every=every, **MEMBERS[method])
    return kgr.GradientRegularizer(
        p="inf", sigma=sigma, method=method, clean_weight=0.0, fd_step=FD_STEP, every=every
    )


class LoopRunner:
    """A custom training loop: one `tf.function` step of `loss(x, y)` and Adam."""

    def __init__(self, net: keras.Model, loss, xla: bool, x, y):
        self.optimizer = keras.optimizers.Adam(1e-3)
        self.optimizer.build(net.trainable_variables)

        @tf.function(jit_compile=xla)
        def step(x, y):
            with tf.GradientTape() as tape:
                value = loss(x, y, self.optimizer.iterations)
            # A loss may return (value, outputs): the outputs (e.g. the clean
            # loss a log shows) are returned too, so that they are computed.
            value, outputs = value if isinstance(value, tuple) else (value, ())
            gradients = tape.gradient(value, net.trainable_variables)
            self.optimizer.apply_gradients(zip(gradients, net.trainable_variables))
            return value, outputs

        self.step, self.x, self.y = step, x, y
        start = time.perf_counter()
        float(step(x, y)[0])
        self.first_step_s = time.perf_counter() - start

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            value, outputs = self.step(self.x, self.y)
        float(value)
        tf.nest.map_structure(lambda t: t.numpy(), outputs)
        return time.perf_counter() - start


def fit_runner(net: keras.Model, regularizer, xla: bool, x, y) -> Runner:
    """`fit`'s step (`model.train_function`) of a plain Keras model or a RegularizedModel."""
    if regularizer is None:
        model = keras.Model(net.inputs, net.outputs)
    else:
        model = kgr.RegularizedModel(net.inputs, net.outputs, regularizer=regularizer)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=xla,
    )
    return Runner(model, x, y)


def reference_rows(sigma: float) -> list[tuple[str, str, Any]]:
    """(row name, reference row name, builder(net, loss_fn, xla, x, y) -> runner)."""
    rows = [("plain Keras fit", None, lambda n, f, xla, x, y: fit_runner(n, None, xla, x, y))]

    def hand(method, clean_loss=False):
        def build(n, f, xla, x, y):
            objective = hand_written_loss(method, n, f, sigma)

            def loss(a, b, step):
                if not clean_loss:
                    return objective(a, b)
                # What fit logs besides the objective: the clean loss (data_loss).
                return objective(a, b), f(b, n(a, training=True))

            return LoopRunner(n, loss, xla, x, y)

        return build

    def library_loop(regularizer, fixed_settings=None):
        def build(n, f, xla, x, y):
            def loss(a, b, step):
                return kgr.regularized_loss(
                    n, a, b, f, regularizer, step=step, fixed_settings=fixed_settings
                ).total

            return LoopRunner(n, loss, xla, x, y)

        return build

    def library_fit(regularizer):
        return lambda n, f, xla, x, y: fit_runner(n, regularizer, xla, x, y)

    rows.append(("hand-written plain", None, hand("plain")))
    for method in (*ESTIMATORS, *MEMBERS):
        reference = f"hand-written {method}"
        rows.append((reference, None, hand(method)))
        # fit logs the clean loss (data_loss) and computes the metrics on the
        # clean pass; the objectives without L(x) get a reference that
        # computes it too (the same outputs).
        fit_reference = reference
        if method in CLEAN_FREE:
            fit_reference = f"hand-written {method} + clean loss"
            rows.append((fit_reference, None, hand(method, clean_loss=True)))
        rows.append((f"fit {method}", fit_reference, library_fit(regularizer_of(method, sigma))))
        rows.append(
            (f"regularized_loss {method}", reference, library_loop(regularizer_of(method, sigma)))
        )
        rows.append(
            (
                f"regularized_loss {method} variable",
                reference,
                library_loop(regularizer_of(method, sigma), fixed_settings=False),
            )
        )
        rows.append(
            (
                f"regularized_loss {method} fixed",
                reference,
                library_loop(regularizer_of(method, sigma), fixed_settings=True),
            )
        )
    skipped = regularizer_of("penalty", sigma, every=1000)
    zero = regularizer_of("penalty", 0.0)
    rows += [
        ("fit penalty every=1000 (skipped)", "plain Keras fit", library_fit(skipped)),
        ("fit penalty sigma=0", "plain Keras fit", library_fit(zero)),
        (
            "regularized_loss penalty every=1000 (skipped)",
            "hand-written plain",
            library_loop(skipped),
        ),
        ("regularized_loss penalty sigma=0", "hand-written plain", library_loop(zero)),
        (
            "regularized_loss penalty sigma=0 variable",
            "hand-written plain",
            library_loop(zero, fixed_settings=False),
        ),
        (
            "regularized_loss penalty sigma=0 fixed",
            "hand-written plain",
            library_loop(zero, fixed_settings=True),
        ),
    ]
    # The first step of `every=1000` computes the term; the timed ones skip it.
    return rows


def bench_reference(config: str) -> list[dict]:
    """Times every row of one configuration, XLA on and off, interleaved."""
    keras.utils.set_random_seed(FLAGS.seed)
    net, input_shape = reference_network(config)
    rng = np.random.default_rng(FLAGS.seed)
    x = tf.constant(rng.random((FLAGS.batch_size, *input_shape), dtype=np.float32))
    y = tf.constant(rng.integers(0, 10, FLAGS.batch_size), dtype=tf.int32)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rows = reference_rows(FLAGS.ref_sigma)
    if FLAGS.ref_rows:
        wanted = set(FLAGS.ref_rows)
        rows = [
            r for r in rows if r[0] in wanted or any(r[0] == w[1] for w in rows if w[0] in wanted)
        ]
    runners, references = {}, {}
    for xla in FLAGS.xla:
        for name, reference, build in rows:
            runner = build(net, loss_fn, xla == "on", x, y)
            runners[xla, name] = runner
            references[xla, name] = reference
            print(
                f"  {config} xla={xla} {name}: first step {runner.first_step_s:.1f} s", flush=True
            )
    for runner in runners.values():
        runner.run(FLAGS.ref_warmup) if FLAGS.ref_warmup else None
    times = {key: [] for key in runners}
    cpu_times = {key: [] for key in runners}
    loads = [os.getloadavg()]
    for _ in range(FLAGS.ref_repetitions):
        for key, runner in runners.items():
            cpu_start = time.process_time()
            times[key].append(runner.run(FLAGS.ref_steps) / FLAGS.ref_steps)
            cpu_times[key].append((time.process_time() - cpu_start) / FLAGS.ref_steps)
        loads.append(os.getloadavg())
    result = []
    for (xla, name), samples in times.items():
        reference = references[xla, name]
        ratios = cpu_ratios = None
        if reference is not None and (xla, reference) in times:
            ratios = np.asarray(samples) / np.asarray(times[xla, reference])
            cpu_ratios = np.asarray(cpu_times[xla, name]) / np.asarray(cpu_times[xla, reference])
        result.append(
            {
                "config": config,
                "xla": xla,
                "row": name,
                "reference": reference,
                "median_ms": 1e3 * float(np.median(samples)),
                "min_ms": 1e3 * float(np.min(samples)),
                "max_ms": 1e3 * float(np.max(samples)),
                "ratio_median": None if ratios is None else float(np.median(ratios)),
                "ratio_q1": None if ratios is None else float(np.percentile(ratios, 25)),
                "ratio_q3": None if ratios is None else float(np.percentile(ratios, 75)),
                "ratio_of_medians": (
                    None
                    if ratios is None
                    else float(np.median(samples) / np.median(times[xla, reference]))
                ),
                "cpu_ms_median": 1e3 * float(np.median(cpu_times[xla, name])),
                "cpu_ratio_median": None if cpu_ratios is None else float(np.median(cpu_ratios)),
                "first_step_s": runners[xla, name].first_step_s,
                "samples_ms": [1e3 * t for t in samples],
                "cpu_samples_ms": [1e3 * t for t in cpu_times[xla, name]],
                "load_averages": loads,
                "steps": FLAGS.ref_steps,
                "repetitions": FLAGS.ref_repetitions,
            }
        )
    del runners, net
    keras.backend.clear_session()
    gc.collect()
    return result


def reference_table(rows: list[dict]) -> str:
    lines = [
        "| configuration | XLA | step | median ms (min-max) | reference | x reference: median "
        "(IQR) | CPU-time x reference |",
        "| --- | --- | --- | ---: | --- | ---: | ---: |",
    ]
    for r in rows:
        ratio = cpu = "-"
        if r["ratio_median"] is not None:
            ratio = f"{r['ratio_median']:.2f} ({r['ratio_q1']:.2f}-{r['ratio_q3']:.2f})"
            cpu = f"{r['cpu_ratio_median']:.2f}"
        lines.append(
            f"| {r['config']} | {r['xla']} | {r['row']} | {r['median_ms']:.1f} "
            f"({r['min_ms']:.1f}-{r['max_ms']:.1f}) | {r['reference'] or '-'} | {ratio} | {cpu} |"
        )
    return "\n".join(lines)


def main_reference() -> None:
    info = machine()
    print(
        f"{info['cpu']}, {info['cpu_count']} CPUs, TF {info['tensorflow']}; load {os.getloadavg()}"
    )
    rows = []
    settings = {name: FLAGS[name].value for name in OWN_FLAGS}
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json_out)), exist_ok=True)
    for config in FLAGS.ref_configs:
        rows.extend(bench_reference(config))
        print(reference_table([r for r in rows if r["config"] == config]), flush=True)
        # Written after each configuration, so that a long run keeps what it measured.
        result = {"machine": info, "flags": {**settings, "protocol": "reference"}, "rows": rows}
        with open(FLAGS.json_out, "w") as f:
            json.dump(result, f, indent=1)
    print("\n" + reference_table(rows))
    print(f"\nWrote {FLAGS.json_out}; load average at end {os.getloadavg()}")


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.threads:
        tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
        tf.config.threading.set_inter_op_parallelism_threads(FLAGS.threads)
    if FLAGS.reference:
        main_reference()
        return
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
