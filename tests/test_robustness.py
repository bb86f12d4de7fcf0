"""Tests for kgr.evaluate_robustness and RobustnessReport: the suite, the fast report, the flags."""

import json
import math
import os
import struct

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_gradreg import attacks
from keras_gradreg.gradients import input_gradients
from keras_gradreg.robustness import RobustnessReport, evaluate_robustness
from keras_gradreg.robustness import flags as flags_lib
from keras_gradreg.robustness.report import find_row

EPSILONS = {math.inf: [0.05, 0.1], 2: [0.5, 1.0]}
MNIST = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist.npz")


def _mnist_like(n, seed):
    """Ten smooth class templates on 28x28 plus noise, values in [0, 1]."""
    rng = np.random.default_rng(0)
    coarse = rng.uniform(size=(10, 7, 7))
    templates = np.kron(coarse, np.ones((4, 4)))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, size=n)
    x = 0.7 * templates[y] + 0.3 * rng.uniform(size=(n, 28, 28))
    return x[..., None].astype("float32"), y


@pytest.fixture(scope="module")
def trained():
    """A small MLP on MNIST-shaped synthetic data, logits output."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        keras.optimizers.Adam(0.01),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = _mnist_like(600, seed=1)
    model.fit(x, y, epochs=3, batch_size=60, verbose=0)
    x_test, y_test = _mnist_like(64, seed=2)
    return model, x_test, y_test


@pytest.fixture(scope="module")
def report(trained):
    """The fast report (FGSM and PGD, each on every example)."""
    model, x, y = trained
    return evaluate_robustness(
        model, (x, y), EPSILONS, suite="fast", steps=20, batch_size=32, verbose=0
    )


@pytest.fixture(scope="module")
def suite_report(trained):
    """The standard suite with a short Square budget."""
    model, x, y = trained
    return evaluate_robustness(model, (x, y), EPSILONS, square_queries=300, verbose=0)


# ---------------------------------------------------------------------- #
# The standard suite.
# ---------------------------------------------------------------------- #


@pytest.mark.slow  # The standard suite (the suite_report fixture).
def test_suite_runs_the_cascade_and_counts_what_each_attack_broke(trained, suite_report):
    model, x, y = trained
    report = suite_report
    assert report.settings["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert report.settings["cascade"] and report.settings["suite"] == "standard"
    assert report.ok, report.flags
    n = report.num_examples
    for p, values in EPSILONS.items():
        for epsilon in values:
            rows = {name: report.row(name, p, epsilon) for name in report.attack_names()}
            clean = round(report.clean_accuracy * n)
            # Each attack ran on what the earlier ones left, and broke some of it.
            assert rows["apgd-ce"]["attacked"] == clean
            assert rows["apgd-t"]["attacked"] == clean - rows["apgd-ce"]["broken"]
            left = rows["apgd-t"]["attacked"] - rows["apgd-t"]["broken"]
            assert rows["fab-t"]["attacked"] == left
            names = ("apgd-ce", "apgd-t", "fab-t", "square")
            broken = sum(rows[name]["broken"] for name in names)
            assert round(rows["worst_case"]["accuracy"] * n) == clean - broken
            assert rows["square"]["accuracy"] == rows["worst_case"]["accuracy"]
            assert report.robust_accuracy(p, epsilon) == rows["worst_case"]["accuracy"]
    # The worst case is that of the per-example results, which the attacks confirm.
    examples = report.examples(math.inf, 0.1)
    np.testing.assert_array_equal(
        examples["worst_case"],
        examples["clean"] & examples["apgd-t"] & examples["fab-t"] & examples["square"],
    )
    assert report.accuracy("apgd-ce", math.inf, 0.1) < report.clean_accuracy


@pytest.mark.slow  # The standard suite (the suite_report fixture).
def test_suite_below_pgd_and_fgsm_below_clean_per_example(trained, suite_report, report):
    """Per example, at every norm and radius: whatever FGSM or PGD-40 breaks, the
    suite breaks too. PGD <= FGSM holds on average but not per example: at L-inf
    0.1 one example of 64 falls to FGSM's jump to a corner of the ball, while PGD
    from x (steps of eps / 16, 20 to 100 of them) climbs to a local maximum of the
    loss that does not cross the boundary."""
    for p, values in EPSILONS.items():
        for epsilon in values:
            suite = suite_report.examples(p, epsilon)["worst_case"]
            fast = report.examples(p, epsilon)
            assert np.all(suite <= fast["pgd"]) and np.all(suite <= fast["fgsm"])
            assert np.all(fast["fgsm"] <= fast["clean"]) and np.all(fast["pgd"] <= fast["clean"])
            assert np.sum(fast["pgd"]) <= np.sum(fast["fgsm"])
    assert suite_report.robust_accuracy(math.inf, 0.05) < report.accuracy("pgd", math.inf, 0.05)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(MNIST), reason="no MNIST file at ../shared/data")
def test_suite_on_real_mnist_is_at_most_pgd_and_fgsm_per_example():
    """Real MNIST, a 3-epoch MLP on 5k images, 200 test images: per example the
    suite breaks whatever PGD-40 or FGSM breaks, and FGSM at eps = 0.25 breaks most."""
    data = np.load(MNIST)
    x = data["x_train"][:5000].reshape(-1, 784).astype("float32") / 255
    x_test = data["x_test"][:200].reshape(-1, 784).astype("float32") / 255
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((784,)), keras.layers.Dense(128, activation="relu"), keras.layers.Dense(10)]
    )
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, data["y_train"][:5000], epochs=3, batch_size=64, verbose=0)
    data_test = (x_test, data["y_test"][:200])
    epsilons = {math.inf: [0.05, 0.1, 0.25]}
    fast = evaluate_robustness(model, data_test, epsilons, suite="fast", verbose=0)
    suite = evaluate_robustness(model, data_test, epsilons, square_queries=1000, verbose=0)
    assert fast.clean_accuracy > 0.85
    assert fast.accuracy("fgsm", math.inf, 0.25) < 0.2
    for epsilon in epsilons[math.inf]:
        a, b = suite.examples(math.inf, epsilon), fast.examples(math.inf, epsilon)
        assert np.all(a["worst_case"] <= b["pgd"]) and np.all(a["worst_case"] <= b["fgsm"])
        assert np.sum(b["pgd"]) <= np.sum(b["fgsm"])
    assert fast.ok and suite.ok, (fast.flags, suite.flags)


class NoisyGradient(keras.layers.Layer):
    """Identity forward; backward returns noise instead of the gradient (a planted mask)."""

    def call(self, inputs):
        @tf.custom_gradient
        def identity(x):
            def gradient(upstream):
                return tf.random.normal(tf.shape(x))

            return tf.identity(x), gradient

        return identity(inputs)


@pytest.mark.slow  # Square on a masked model.
def test_planted_gradient_masking_is_caught_by_square_and_flagged(trained):
    """The same model with its input gradient replaced by noise: outputs unchanged,
    APGD fails where it succeeded, Square breaks what APGD missed, and the masking
    flag fires. (At the box diameter even noise directions reach misclassified
    images, so the large-epsilon check passes here; it catches zero gradients.)"""
    model, x, y = trained
    masked = keras.Sequential([keras.Input((28, 28, 1)), NoisyGradient(), *model.layers])
    masked.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    np.testing.assert_allclose(masked.predict(x, verbose=0), model.predict(x, verbose=0))
    epsilons = {math.inf: [0.1]}
    honest = evaluate_robustness(model, (x, y), epsilons, square_queries=300, verbose=0)
    report = evaluate_robustness(masked, (x, y), epsilons, square_queries=300, verbose=0)
    gradient_broken = report.row("apgd-ce", math.inf, 0.1)["broken"]
    square_broken = report.row("square", math.inf, 0.1)["broken"]
    assert gradient_broken < honest.row("apgd-ce", math.inf, 0.1)["broken"] / 2
    assert square_broken > 0.1 * report.num_examples
    assert "gradient_masking" in report.flags
    assert "gradient_masking" not in honest.flags and "large_epsilon_not_broken" not in honest.flags
    assert honest.settings["large_epsilon_check"]["accuracy"] == 0.0


def test_randomized_model_is_flagged(trained):
    """Dropout left on at inference: two identical calls differ."""
    model, x, y = trained

    class AlwaysDropout(keras.layers.Layer):
        def call(self, inputs):
            return keras.random.dropout(inputs, 0.1)

    randomized = keras.Sequential([keras.Input((28, 28, 1)), AlwaysDropout(), *model.layers])
    randomized.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    report = evaluate_robustness(
        randomized, (x, y), {math.inf: [0.05]}, suite="fast", steps=3, verbose=0
    )
    assert "randomized_outputs" in report.flags
    assert report.settings["output_change"] > 0


def test_attacks_needing_more_classes_are_skipped_and_said_so():
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(0).uniform(size=(20, 5)).astype("float32")
    y = np.argmax(model.predict(x, verbose=0), axis=1)
    report = evaluate_robustness(model, (x, y), {math.inf: [0.1]}, square_queries=50, verbose=0)
    assert report.settings["attacks"] == ["apgd-ce", "fab-t", "square"]
    assert "apgd-t" in report.settings["skipped"]
    assert "skipped apgd-t: needs at least 4 classes; the model has 3" in str(report)


@pytest.mark.slow  # Runs the attack suites.
def test_progress_is_one_line_per_attack_or_silent(trained, capsys):
    model, x, y = trained
    args = dict(
        epsilons={math.inf: [0.05]}, square_queries=20, apgd_steps=3, fab_steps=3,
        sanity_examples=0,
    )  # fmt: skip
    evaluate_robustness(model, (x, y), verbose=2, **args)
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert all("p=inf epsilon=0.05: robust" in line for line in lines)
    evaluate_robustness(model, (x, y), verbose=0, **args)
    assert capsys.readouterr().out == ""
    evaluate_robustness(model, (x, y), verbose=1, **args)
    assert "apgd-ce p=inf epsilon=0.05: 64 examples" in capsys.readouterr().out


# ---------------------------------------------------------------------- #
# The fast report (FGSM and PGD on every example).
# ---------------------------------------------------------------------- #


def test_pgd_below_fgsm_below_clean_and_no_flags(report):
    assert report.num_examples == 64
    assert report.clean_accuracy > 0.9
    for p, values in EPSILONS.items():
        for epsilon in values:
            pgd = report.accuracy("pgd", p, epsilon)
            fgsm = report.accuracy("fgsm", p, epsilon)
            assert report.robust_accuracy(p, epsilon) <= pgd <= fgsm <= report.clean_accuracy
    # The attacks bite (else this test would prove nothing) and noise does not.
    assert report.accuracy("pgd", math.inf, 0.1) < 0.5 * report.clean_accuracy
    assert report.accuracy("noise", math.inf, 0.1) > report.accuracy("pgd", math.inf, 0.1)
    assert report.ok, report.flags
    assert report.zero_gradient_share == 0.0


def test_rows_match_the_attacks_and_numpy(trained, report):
    """Report numbers recomputed independently: clean accuracy, FGSM, dual norms."""
    model, x, y = trained
    logits = model.predict(x, verbose=0)
    assert report.clean_accuracy == np.mean(logits.argmax(1) == y)
    x_adv = attacks.fgsm(model, x, y, 0.1)
    fgsm = np.mean(model.predict(x_adv, verbose=0).argmax(1) == y)
    assert report.accuracy("fgsm", "inf", 0.1) == fgsm
    g = input_gradients(model, x, y).numpy().reshape(len(x), -1)
    np.testing.assert_allclose(report.gradient_norms["inf"], np.abs(g).sum(1).mean(), rtol=1e-4)
    np.testing.assert_allclose(
        report.gradient_norms["2"], np.linalg.norm(g, axis=1).mean(), rtol=1e-4
    )
    assert {(r["attack"], r["p"], r["epsilon"]) for r in report.rows} == {
        (a, p, e)
        for a in ("fgsm", "pgd", "worst_case", "noise")
        for p, es in (("inf", [0.05, 0.1]), (2, [0.5, 1.0]))
        for e in es
    }
    # Not a cascade: PGD ran on every example FGSM ran on.
    assert report.row("pgd", 2, 1.0)["attacked"] == report.row("fgsm", 2, 1.0)["attacked"]


@pytest.mark.slow  # The standard suite (the suite_report fixture).
def test_report_serialises_prints_and_plots(suite_report, tmp_path):
    report = suite_report
    path = str(tmp_path / "report.json")
    report.save_json(path)
    with open(path) as file:
        data = json.load(file)
    assert data["rows"][0].keys() == {"attack", "p", "epsilon", "accuracy", "broken", "attacked"}
    assert "per_example" not in data
    loaded = RobustnessReport.load_json(path)
    assert loaded == report
    with pytest.raises(ValueError, match="no per-example results"):
        loaded.examples(math.inf, 0.1)
    text = str(report)
    assert "clean accuracy" in text and "apgd-t" in text and "all passed" in text
    assert (
        "apgd-t (100 steps x 1 restarts x 9 targets), fab-t (100 steps x 1 restarts x 9 targets),"
        " square (300 queries); cascade"
    ) in text
    row = report.row("apgd-ce", 2, 1.0)
    assert f"{100 * row['accuracy']:.2f} [{row['broken']}]" in text
    png = str(tmp_path / "report.png")
    report.plot(png)
    with open(png, "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_report_writes_one_panel_per_norm(tmp_path):
    rows = [
        {"attack": a, "p": p, "epsilon": e, "accuracy": acc}
        for p in ("inf", 2)
        for a, acc in (("fgsm", 0.5), ("pgd", 0.4), ("worst_case", 0.4), ("noise", 0.9))
        for e in (0.1, 0.2)
    ]
    report = RobustnessReport(10, 0.95, rows, {"inf": 1.0, "2": 0.1}, 0.0, {}, {})
    path = str(tmp_path / "curves.png")
    report.plot(path)
    with open(path, "rb") as file:
        header = file.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", header[16:24]) == (round(4.6 * 2 * 100), 360)


def test_dataset_input_and_max_examples_give_the_same_report(trained, report):
    model, x, y = trained
    extra_x, extra_y = _mnist_like(20, seed=3)
    data = tf.data.Dataset.from_tensor_slices(
        (np.concatenate([x, extra_x]), np.concatenate([y, extra_y]))
    ).batch(32)
    again = evaluate_robustness(
        model, data, EPSILONS, suite="fast", steps=20, max_examples=64, batch_size=32, verbose=0
    )
    assert again.num_examples == 64
    assert again.rows == report.rows


@pytest.mark.slow  # 7 s: two full evaluations.
def test_reports_reproduce_with_a_seed(trained):
    model, x, y = trained
    kwargs = dict(epsilons={2: [1.0]}, square_queries=50, apgd_steps=5, fab_steps=5, verbose=0)
    first = evaluate_robustness(model, (x, y), seed=3, **kwargs)
    assert first.rows == evaluate_robustness(model, (x, y), seed=3, **kwargs).rows
    fast = dict(epsilons={2: [1.0]}, suite="fast", steps=3, random_start=True, restarts=2)
    first = evaluate_robustness(model, (x, y), seed=3, verbose=0, **fast)
    assert first.rows == evaluate_robustness(model, (x, y), seed=3, verbose=0, **fast).rows
    assert first.settings["random_start"] and first.settings["restarts"] == 2


def test_zero_gradient_model_is_flagged(trained):
    """Quantised input (zero gradient almost everywhere): a classic mask."""
    model, x, y = trained

    class Quantise(keras.layers.Layer):
        def call(self, inputs):
            return tf.round(inputs * 8.0) / 8.0

    masked = keras.Sequential([keras.Input((28, 28, 1)), Quantise(), *model.layers])
    masked.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    report = evaluate_robustness(
        masked, (x, y), {math.inf: [0.05]}, suite="fast", steps=5, verbose=0
    )
    assert report.zero_gradient_share == 1.0
    assert "zero_gradients" in report.flags
    # At the box diameter APGD cannot move from its random start: accuracy stays above 0.
    assert "large_epsilon_not_broken" in report.flags
    # FGSM and PGD cannot move the input at all: clean accuracy survives.
    assert report.accuracy("fgsm", math.inf, 0.05) == report.clean_accuracy


@pytest.mark.filterwarnings("ignore:.*received `from_logits=True`")
def test_softmax_model_with_logits_loss_is_flagged(trained):
    model, x, y = trained
    probabilities = keras.Sequential([*model.layers, keras.layers.Softmax()])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    args = dict(suite="fast", steps=3, verbose=0)
    report = evaluate_robustness(probabilities, (x, y), {2: [0.5]}, loss=loss, **args)
    assert "probabilities_with_logits_loss" in report.flags
    correct = evaluate_robustness(
        probabilities, (x, y), {2: [0.5]}, loss="sparse_categorical_crossentropy", **args
    )
    assert not correct.flags


def test_logits_model_with_probability_loss_is_flagged(trained):
    model, x, y = trained
    report = evaluate_robustness(
        model,
        (x, y),
        {2: [0.5]},
        loss="sparse_categorical_crossentropy",
        suite="fast",
        steps=3,
        verbose=0,
    )
    assert "logits_with_probability_loss" in report.flags


def test_weak_pgd_is_flagged(trained):
    """PGD with one tiny step barely moves: weaker than FGSM, and flagged."""
    model, x, y = trained
    report = evaluate_robustness(
        model,
        (x, y),
        {math.inf: [0.1]},
        suite="fast",
        steps=1,
        step_size_factor=0.01,
        random_start=False,
        verbose=0,
    )
    assert report.accuracy("pgd", math.inf, 0.1) > report.accuracy("fgsm", math.inf, 0.1)
    assert "pgd_weaker_than_fgsm" in report.flags


# ---------------------------------------------------------------------- #
# Flag logic and validation.
# ---------------------------------------------------------------------- #


def _evidence(**changes):
    values = dict(
        clean_accuracy=0.9, cascade=False, tolerance=0.01, zero_share=0.0, zero_threshold=0.05,
        from_logits=True, probability_share=0.0, outside_unit_share=0.5, masked={},
        masking_threshold=0.005, output_change=0.0, large_epsilon=None,
    )  # fmt: skip
    values.update(changes)
    return flags_lib.Evidence(**values)


def test_flag_logic_on_constructed_numbers():
    rows = [
        {"attack": "fgsm", "p": "inf", "epsilon": 0.1, "accuracy": 0.5},
        {"attack": "fgsm", "p": "inf", "epsilon": 0.2, "accuracy": 0.7},
        {"attack": "pgd", "p": "inf", "epsilon": 0.1, "accuracy": 0.4},
        {"attack": "pgd", "p": "inf", "epsilon": 0.2, "accuracy": 0.3},
        {"attack": "worst_case", "p": "inf", "epsilon": 0.1, "accuracy": 0.4},
        {"attack": "worst_case", "p": "inf", "epsilon": 0.2, "accuracy": 0.3},
        {"attack": "noise", "p": "inf", "epsilon": 0.1, "accuracy": 0.2},
        {"attack": "noise", "p": "inf", "epsilon": 0.2, "accuracy": 0.9},
    ]
    flags = flags_lib.sanity_flags(rows, _evidence())
    assert set(flags) == {"accuracy_not_decreasing", "noise_stronger_than_attack"}
    assert (
        "fgsm p=inf: 50.00% at epsilon=0.1 but 70.00% at epsilon=0.2"
        in flags["accuracy_not_decreasing"]
    )
    assert "p=inf epsilon=0.1" in flags["noise_stronger_than_attack"]
    # The new checks, each alone.
    quiet = [r for r in rows if r["attack"] in ("pgd", "worst_case")]
    assert flags_lib.sanity_flags(quiet, _evidence()) == {}
    masked = flags_lib.sanity_flags(quiet, _evidence(masked={("inf", 0.1): 0.02}))
    assert (
        set(masked) == {"gradient_masking"}
        and "p=inf epsilon=0.1: 2.00%" in masked["gradient_masking"]
    )
    assert flags_lib.sanity_flags(quiet, _evidence(masked={("inf", 0.1): 0.004})) == {}
    assert set(flags_lib.sanity_flags(quiet, _evidence(output_change=1e-3))) == {
        "randomized_outputs"
    }
    large = flags_lib.sanity_flags(quiet, _evidence(large_epsilon=(1.0, 0.03, 100)))
    assert (
        set(large) == {"large_epsilon_not_broken"}
        and "3.00% of 100" in large["large_epsilon_not_broken"]
    )
    assert flags_lib.sanity_flags(quiet, _evidence(large_epsilon=(1.0, 0.0, 100))) == {}
    # PGD above FGSM only counts when both ran on every example.
    swapped = [dict(r, attack={"fgsm": "pgd", "pgd": "fgsm"}[r["attack"]]) for r in rows[:4]]
    assert "pgd_weaker_than_fgsm" in flags_lib.sanity_flags(swapped, _evidence())
    assert "pgd_weaker_than_fgsm" not in flags_lib.sanity_flags(swapped, _evidence(cascade=True))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(epsilons={math.inf: [-1.0]}), r"Received: epsilon=-1\.0"),
        (dict(epsilons={0.5: [0.1]}), r"Received: p=0\.5"),
        (dict(epsilons={3: [0.1]}), r"Received: p=3"),
        (dict(epsilons={1: [0.1]}), r"supports p in \{2, inf\}.*Received: epsilons=\{1: "),
        (dict(epsilons={}), r"Received: epsilons=\{\}"),
        (dict(steps=0), r"Received: steps=0"),
        (dict(apgd_steps=0), r"Received: apgd_steps=0"),
        (dict(square_queries=0), r"Received: square_queries=0"),
        (dict(fab_steps=0), r"Received: fab_steps=0"),
        (dict(fab_restarts=1.5), r"Received: fab_restarts=1\.5"),
        (dict(target_classes=-1), r"Received: target_classes=-1"),
        (dict(attacks=("cw",)), r"Received: attacks=\('cw',\)"),
        (dict(suite="plus"), r"Received: suite='plus'"),
        (dict(cascade="yes"), r"Received: cascade='yes'"),
        (dict(clip=(1, 0)), r"Received: clip=\(1, 0\)"),
        (dict(tolerance=-0.1), r"Received: tolerance=-0\.1"),
        (dict(sanity_examples=-1), r"Received: sanity_examples=-1"),
        (dict(verbose=3), r"Received: verbose=3"),
        (dict(data="x_only"), r"labels are needed\. Received: data='x_only'"),
    ],
)
def test_bad_arguments_raise_before_any_work(trained, kwargs, match):
    model, x, y = trained
    args = dict(model=model, data=(x, y))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        evaluate_robustness(**args)


def test_p1_works_with_the_fast_attacks(trained):
    model, x, y = trained
    report = evaluate_robustness(
        model, (x, y), {1: [5.0]}, attacks=("fgsm", "pgd"), steps=5, verbose=0
    )
    assert not report.settings["cascade"] and report.settings["suite"] == "custom"
    assert report.accuracy("pgd", 1, 5.0) <= report.accuracy("fgsm", 1, 5.0)


def test_data_without_labels_raises(trained):
    model, x, _ = trained
    with pytest.raises(ValueError, match=r"Received: data with element_spec="):
        evaluate_robustness(model, tf.data.Dataset.from_tensor_slices(x).batch(8))
    with pytest.raises(ValueError, match=r"labels are needed"):
        evaluate_robustness(model, (x, None))


def test_find_row_matches_p_as_stored_and_epsilon_up_to_rounding():
    rows = [
        {"attack": "worst_case", "p": "inf", "epsilon": 0.1, "accuracy": 0.5},
        {"attack": "worst_case", "p": 2, "epsilon": 1.0, "accuracy": 0.25},
    ]
    assert find_row(rows, "worst_case", math.inf, 0.1 + 1e-17)["accuracy"] == 0.5
    assert find_row(rows, "worst_case", "inf", 0.30000000000000004 / 3)["accuracy"] == 0.5
    assert find_row(rows, "worst_case", 2.0, 1.0)["accuracy"] == 0.25
    assert find_row(rows, "worst_case", 2, 2.0) is None
    assert find_row(rows, "apgd-ce", 2, 1.0) is None
