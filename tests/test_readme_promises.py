"""What README.md and docs/guide.md promise, tested with numbers.

- Gradient accumulation with `every`: `iterations` counts optimizer updates,
  so all micro-batches of a counted update compute the term.
- `keras.utils.set_random_seed` reproduces `fraction`'s subsets.
- "apgd-dlr" in `evaluate_robustness`.
- docs/guide.md's whole example (its `library-example` block), run as written
  but for one documented substitution (slices of the data, and one epoch).
- The training binary with `--strategy=mirrored` and with `--mixed_precision`.
(Multi-worker training for every method: tests/test_multi_worker_methods.py.)
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import attack_reference as attack_ref
import keras
import linear_reference as ref
import numpy as np
import pytest
from conftest import linear_data, linear_model
from readme_code import GUIDE, code_block

import keras_gradreg as kgr

ROOT = Path(__file__).resolve().parent.parent
MNIST = ROOT.parent / "shared" / "data" / "mnist.npz"
SETTINGS = {
    "penalty": dict(p=2.0, sigma=0.3, method="penalty"),
    "adversarial": dict(p=2.0, sigma=0.3, method="adversarial", clean_weight=0.25),
    "finite_difference": dict(p=2.0, sigma=0.3, method="finite_difference", fd_step=0.05),
}
needs_mnist = pytest.mark.skipif(not MNIST.exists(), reason="no MNIST file at ../shared/data")


def f64(*arrays):
    return tuple(a.astype("float64") for a in arrays)


# ---------------------------------------------------------------------- #
# Gradient accumulation with `every`.
# ---------------------------------------------------------------------- #


def accumulated_reference(x, y, w, b, settings, every, accumulate, batch, lr, by_update=True):
    """SGD with `accumulate` micro-batches per update (the mean of their gradients);
    the term (times `every`) on the micro-batches of updates u with u % every == 0,
    or with `by_update=False`, on micro-batches m with m % every == 0."""
    w, b = f64(w, b)
    micro_batches = len(y) // batch
    for update in range(micro_batches // accumulate):
        grads = []
        for k in range(accumulate):
            micro = update * accumulate + k
            counted = (update if by_update else micro) % every == 0
            rows = slice(micro * batch, (micro + 1) * batch)
            gw, gb, _ = ref.scaled_term_gradients(
                x[rows].astype("float64"), y[rows], w, b, scale=every if counted else 0, **settings
            )
            grads.append((gw, gb))
        w = w - lr * np.mean([g[0] for g in grads], axis=0)
        b = b - lr * np.mean([g[1] for g in grads], axis=0)
    return w, b


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_gradient_accumulation_computes_the_term_on_every_micro_batch_of_a_counted_update(method):
    """every=2 with gradient_accumulation_steps=2: updates 0 and 2 (micro-batches 0-1
    and 4-5) carry 2 x the term; updates 1 and 3 are plain; NumPy's weights to 1e-6."""
    x, y, w, b = linear_data(32, seed=1)
    settings = SETTINGS[method]
    reg = kgr.GradientRegularizer(every=2, **settings)
    model = linear_model("functional", reg, w, b)
    optimizer = keras.optimizers.SGD(0.1, gradient_accumulation_steps=2)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, batch_size=4, shuffle=False, verbose=0)
    assert int(optimizer.iterations) == 4  # 8 micro-batches, 4 updates
    want_w, want_b = accumulated_reference(x, y, w, b, settings, 2, 2, 4, 0.1)
    got_w, got_b = model.get_weights()
    np.testing.assert_allclose(got_w, want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_b, want_b, rtol=1e-5, atol=1e-6)
    # The test can tell: counting micro-batches instead of updates ends elsewhere.
    other_w, _ = accumulated_reference(x, y, w, b, settings, 2, 2, 4, 0.1, by_update=False)
    assert np.max(np.abs(other_w - want_w)) > 1e-3


# ---------------------------------------------------------------------- #
# keras.utils.set_random_seed reproduces fraction's subsets.
# ---------------------------------------------------------------------- #


def fit_with_fraction(global_seed, x, y, w, b):
    keras.utils.set_random_seed(global_seed)
    reg = kgr.GradientRegularizer(fraction=0.5, **SETTINGS["penalty"])
    model = linear_model("functional", reg, w, b)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    seed = reg.subset_seed_generator().state.numpy().copy()
    model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    return seed, model.get_weights()


def test_set_random_seed_reproduces_the_subsets():
    """The same global seed gives the same subset seed, hence the same rows and weights
    (NumPy's, from the rows the seed picks); another global seed picks other rows."""
    x, y, w, b = linear_data(24, seed=2)
    seed_a, weights_a = fit_with_fraction(7, x, y, w, b)
    seed_b, weights_b = fit_with_fraction(7, x, y, w, b)
    seed_c, weights_c = fit_with_fraction(8, x, y, w, b)
    np.testing.assert_array_equal(seed_a, seed_b)
    for a, b_ in zip(weights_a, weights_b):
        np.testing.assert_array_equal(a, b_)

    def reference(seed):
        w64, b64 = f64(w, b)
        rows_drawn = []
        for step in range(3):
            rows = slice(step * 8, (step + 1) * 8)
            term_rows = ref.subset_rows(seed + np.array([0, step]), 8, 0.5)
            rows_drawn.append(term_rows)
            gw, gb, _ = ref.scaled_term_gradients(
                x[rows].astype("float64"), y[rows], w64, b64, scale=1, term_rows=term_rows,
                **SETTINGS["penalty"],
            )  # fmt: skip
            w64, b64 = w64 - 0.1 * gw, b64 - 0.1 * gb
        return (w64, b64), rows_drawn

    (want_w, want_b), rows_a = reference(seed_a)
    np.testing.assert_allclose(weights_a[0], want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(weights_a[1], want_b, rtol=1e-5, atol=1e-6)
    (want_w, _), rows_c = reference(seed_c)
    np.testing.assert_allclose(weights_c[0], want_w, rtol=1e-5, atol=1e-6)
    assert not np.array_equal(seed_a, seed_c)
    assert any(not np.array_equal(a, c) for a, c in zip(rows_a, rows_c))
    assert np.max(np.abs(weights_a[0] - weights_c[0])) > 1e-4


# ---------------------------------------------------------------------- #
# apgd-dlr in evaluate_robustness.
# ---------------------------------------------------------------------- #


@pytest.mark.parametrize("p", [pytest.param(math.inf, marks=pytest.mark.slow), 2.0])
def test_apgd_dlr_in_evaluate_robustness_breaks_exactly_the_close_examples(p):
    """A linear model with two live classes: the minimal distance to the boundary is
    known in closed form, and "apgd-dlr" breaks exactly the examples closer than eps."""
    model, x, y, weights, bias = attack_ref.two_live_classes()
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    dist = attack_ref.distances(x, y, weights, bias, p)
    epsilon = float(np.median(dist[dist > 0]))
    report = kgr.evaluate_robustness(
        model,
        (x, y),
        {p: [epsilon]},
        attacks=["apgd-dlr"],
        apgd_steps=25,
        clip=None,
        sanity_examples=0,
        verbose=0,
    )
    rows = report.examples(p, epsilon)
    robust = rows["apgd-dlr"]
    keep = np.abs(dist - epsilon) > 0.01 * epsilon
    np.testing.assert_array_equal(robust[keep], dist[keep] > epsilon)
    assert 20 < np.sum(keep & (dist < epsilon)) and 20 < np.sum(keep & (dist > epsilon))
    assert report.accuracy("apgd-dlr", p, epsilon) == pytest.approx(np.mean(robust))
    assert report.robust_accuracy(p, epsilon) == pytest.approx(np.mean(rows["worst_case"]))
    np.testing.assert_array_equal(rows["worst_case"], robust)


# ---------------------------------------------------------------------- #
# docs/guide.md's whole example.
# ---------------------------------------------------------------------- #

# The one substitution: slices of the data and one epoch instead of five (the
# block as written trains for a minute and evaluates for about 4 minutes here).
SUBSTITUTIONS = (
    (
        "model.fit(x_train, y_train, batch_size=100, epochs=5)",
        "model.fit(x_train[:10000], y_train[:10000], batch_size=100, epochs=1)",
    ),
    ("(x_test[:1000], y_test[:1000])", "(x_test[:100], y_test[:100])"),
)


@pytest.mark.slow
@needs_mnist
def test_readme_library_block_runs_as_written(tmp_path, monkeypatch, capsys):
    """The block with its own data path (../shared/data/mnist.npz, from a directory
    beside a `shared` link) and its own evaluation; the model it trains classifies,
    its logs add up, and its report's numbers are consistent."""
    code = code_block(GUIDE, "library-example")
    for as_written, in_test in SUBSTITUTIONS:
        assert code.count(as_written) == 1, f"guide.md changed: update the test ({as_written})"
        code = code.replace(as_written, in_test)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "mnist.npz").symlink_to(MNIST)
    (tmp_path / "checkout").mkdir()
    monkeypatch.chdir(tmp_path / "checkout")
    namespace: dict = {"__name__": "readme_block"}
    exec(compile(code, str(GUIDE), "exec"), namespace)  # noqa: S102
    printed = capsys.readouterr().out

    model, report = namespace["model"], namespace["report"]
    x_test, y_test = namespace["x_test"], namespace["y_test"]
    history = model.history.history
    assert history["penalty"][0] > 0
    np.testing.assert_allclose(
        history["loss"][0], history["data_loss"][0] + history["penalty"][0], rtol=1e-5
    )
    predictions = np.argmax(model.predict(x_test[:100], verbose=0), axis=1)
    clean = np.mean(predictions == y_test[:100])
    assert clean > 0.85  # 100 steps of the maxout MLP
    robust = {
        (p, eps): report.robust_accuracy(p, eps)
        for p, radii in ((math.inf, (0.1, 0.2, 0.3)), (2, (1.0, 2.0)))
        for eps in radii
    }
    assert robust[(math.inf, 0.1)] < clean
    assert robust[(math.inf, 0.1)] >= robust[(math.inf, 0.2)] >= robust[(math.inf, 0.3)]
    assert robust[(2, 1.0)] >= robust[(2, 2.0)]
    assert "apgd-ce" in printed  # print(report)
    for name in ("robustness.png", "r_star.png"):
        assert (tmp_path / "checkout" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------- #
# The binary with --strategy=mirrored and --mixed_precision.
# ---------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def mnist_slice(tmp_path_factory):
    if not MNIST.exists():
        pytest.skip("no MNIST file at ../shared/data")
    path = tmp_path_factory.mktemp("data") / "slice.npz"
    with np.load(MNIST) as data:
        np.savez(
            path,
            x_train=data["x_train"][:1000],
            y_train=data["y_train"][:1000],
            x_test=data["x_test"][:200],
            y_test=data["y_test"][:200],
        )
    return path


def run_binary(data, workdir, *flags):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "train.main",
            "--preset=mnist_maxout_mlp",
            f"--data_npz={data}",
            f"--workdir={workdir}",
            "--epochs=1",
            "--batch_size=50",
            "--eval_suite=none",
            "--nopictures",
            "--deterministic",
            *flags,
        ],
        cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(Path(workdir) / "metrics.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def one_device(mnist_slice, tmp_path_factory):
    return run_binary(mnist_slice, tmp_path_factory.mktemp("one_device") / "run")


@pytest.mark.slow
def test_binary_with_mirrored_strategy_trains_like_one_device(mnist_slice, one_device, tmp_path):
    """`--strategy=mirrored` (one replica: this machine has no GPU) ends with one device's
    epoch logs and test metrics."""
    mirrored = run_binary(mnist_slice, tmp_path / "run", "--strategy=mirrored")
    assert mirrored["flags"]["strategy"] == "mirrored"
    (got,), (want,) = mirrored["epochs"], one_device["epochs"]
    for key in ("train/loss", "train/data_loss", "train/penalty", "test/loss", "test/accuracy"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
    assert want["train/penalty"] > 0
    assert mirrored["final"]["test/accuracy"] == pytest.approx(one_device["final"]["test/accuracy"])


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_binary_with_mixed_precision(mnist_slice, one_device, tmp_path, policy):
    """`--mixed_precision`: the saved model's hidden layers compute in half precision
    (float32 weights and logits), and the epoch's logs are float32's to half
    precision's accuracy."""
    workdir = tmp_path / "run"
    mixed = run_binary(mnist_slice, workdir, f"--mixed_precision={policy}")
    assert mixed["flags"]["mixed_precision"] == policy
    (got,), (want,) = mixed["epochs"], one_device["epochs"]
    keys = ("train/loss", "train/data_loss", "train/penalty", "test/loss", "test/accuracy")
    print(policy, {k: (got[k], want[k]) for k in keys})
    # Training: dropout draws its masks in the compute dtype, so the same seed gives
    # other masks in half precision and the epoch's training means differ by mask
    # noise (measured 2.4% on the loss, 0.6% on the penalty); a penalty lost to
    # underflow would be off by far more. The test loss, without dropout, agreed
    # to 0.02% (float16), and to 1.2% and 3.4% on two machines (bfloat16, whose
    # 8-bit significand moves the 20 steps' path further); a model that did not
    # train in half precision would be off by about 50% (2.3 against 1.5).
    for key in ("train/loss", "train/data_loss", "train/penalty"):
        np.testing.assert_allclose(got[key], want[key], rtol=0.05, err_msg=key)
    test_rtol = {"mixed_float16": 0.02, "mixed_bfloat16": 0.06}[policy]
    np.testing.assert_allclose(got["test/loss"], want["test/loss"], rtol=test_rtol)
    assert got["train/penalty"] > 0
    assert abs(got["test/accuracy"] - want["test/accuracy"]) <= 0.05
    model = keras.models.load_model(workdir / "checkpoints" / "last.keras")
    dense = {layer.name: layer for layer in model.layers if isinstance(layer, keras.layers.Dense)}
    assert dense.pop("logits").dtype_policy.name == "float32"  # the networks' float32 logits
    assert dense and all(layer.dtype_policy.name == policy for layer in dense.values())
    assert all(v.dtype == "float32" for v in model.trainable_variables)
