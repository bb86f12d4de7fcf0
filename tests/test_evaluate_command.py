"""`python -m keras_gradreg.evaluate` (kgr-evaluate): saved models evaluated, bad input refused.

The fast cases call the command's `main` in this process; the slow ones run
it (and the training of the model it evaluates) in fresh processes.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_gradreg import evaluate as command

ROOT = Path(__file__).resolve().parent.parent
FEATURES, CLASSES, N = 6, 3, 24
FAST = [
    "--suite=fast",
    "--steps=3",
    "--linf=0,0.2",
    "--l2=0.5",
    "--sanity_examples=0",
    "--verbose=0",
]


def dataset(seed=0, n=N):
    """uint8 inputs (scaled to [0, 1] by the command) and labels of a linear problem."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, FEATURES)).astype("uint8")
    w = rng.normal(size=(FEATURES, CLASSES))
    y = np.argmax((x / 255.0 - 0.5) @ w + rng.normal(scale=0.3, size=(n, CLASSES)), axis=1)
    return x, y, w


def linear_model(activation=None):
    inputs = keras.Input((FEATURES,))
    outputs = keras.layers.Dense(CLASSES, activation=activation)(inputs)
    model = keras.Model(inputs, outputs)
    _, _, w = dataset()
    model.set_weights([w.astype("float32"), (-0.5 * w.sum(axis=0)).astype("float32")])
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A logits model (.keras), a probabilities model (.keras and exported), and data."""
    folder = tmp_path_factory.mktemp("evaluate")
    x, y, _ = dataset()
    np.savez(folder / "data.npz", x_test=x, y_test=y, x_val=x[:5], y_val=y[:5])
    linear_model().save(folder / "logits.keras")
    probabilities = linear_model("softmax")
    probabilities.save(folder / "probabilities.keras")
    probabilities.export(str(folder / "exported"), verbose=False)
    return folder


def run(*argv):
    return command.main([str(a) for a in argv])


def numpy_accuracy(x, y, w):
    return float(np.mean(np.argmax((x / 255.0 - 0.5) @ w, axis=1) == y))


def read(output_dir):
    with open(Path(output_dir) / "robustness.json") as file:
        return json.load(file)


# ---------------------------------------------------------------------- #
# Saved models evaluated.
# ---------------------------------------------------------------------- #


@pytest.mark.parametrize("name", ["logits", "probabilities"])
def test_a_saved_model_is_evaluated_with_from_logits_detected(files, tmp_path, capsys, name):
    outputs = name  # Each model is named after its outputs.
    out = tmp_path / "out"
    assert run(f"--model={files / name}.keras", f"--npz={files / 'data.npz'}", *FAST,
               f"--output_dir={out}") == 0  # fmt: skip
    printed = capsys.readouterr().out
    report = read(out)
    x, y, w = dataset()
    assert report["num_examples"] == N
    assert report["clean_accuracy"] == pytest.approx(numpy_accuracy(x, y, w))
    settings = report["settings"]
    assert (settings["loss"], settings["outputs"]) == ("cross-entropy", outputs)
    assert settings["loss_from_logits"] is (outputs == "logits")
    assert settings["command"]["from_logits"] == "auto"
    assert settings["command"]["examples"] == N and settings["command"]["scale"] == "auto"
    for row in report["rows"]:
        if row["epsilon"] == 0 and row["attack"] != "noise":
            assert row["accuracy"] == report["clean_accuracy"]
    assert f"outputs look like {outputs}: cross-entropy with from_logits=" in printed
    assert "worst_case" in printed and "sanity checks" in printed
    assert (out / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(out)) == ["robustness.json", "robustness.png"]


def test_from_logits_override_is_recorded_and_a_mismatch_flagged(files, tmp_path):
    out = tmp_path / "out"
    assert run(f"--model={files}/probabilities.keras", f"--npz={files}/data.npz", *FAST,
               "--from_logits=true", f"--output_dir={out}") == 0  # fmt: skip
    report = read(out)
    assert report["settings"]["loss"] == "given"
    assert report["settings"]["loss_from_logits"] is True
    assert report["settings"]["outputs"] == "probabilities"
    assert "probabilities_with_logits_loss" in report["flags"]


def test_exported_savedmodel_passes_gradients_and_gives_the_keras_models_report(files, tmp_path):
    """Through the TFSMLayer wrapper the input gradient is the original model's, so
    the report (gradient norms, accuracies) equals that of the .keras file."""
    wrapped, kind = command.load_model(str(files / "exported"))
    assert kind == "SavedModel"
    original = keras.saving.load_model(files / "probabilities.keras")
    x = tf.constant(dataset()[0][:8] / 255.0, tf.float32)
    gradients = []
    for model in (wrapped, original):
        with tf.GradientTape() as tape:
            tape.watch(x)
            target = tf.reduce_sum(tf.math.log(model(x)[:, 1]))
        gradients.append(tape.gradient(target, x).numpy())
    assert np.abs(gradients[0]).sum() > 0
    np.testing.assert_allclose(gradients[0], gradients[1], rtol=1e-5, atol=1e-6)
    reports = []
    for model_path, out in ((files / "exported", "a"), (files / "probabilities.keras", "b")):
        assert run(f"--model={model_path}", f"--npz={files}/data.npz", *FAST,
                   f"--output_dir={tmp_path / out}") == 0  # fmt: skip
        reports.append(read(tmp_path / out))
    assert reports[0]["rows"] == reports[1]["rows"]
    for p in ("inf", "2"):
        assert reports[0]["gradient_norms"][p] == pytest.approx(
            reports[1]["gradient_norms"][p], rel=1e-5
        )
    assert reports[0]["settings"]["command"]["model_kind"] == "SavedModel"


def test_inputs_are_reshaped_when_only_the_layout_differs(files, tmp_path, capsys):
    """(n, 6) inputs for a model taking (2, 3): the same linear model after a Flatten."""
    model = keras.Sequential(
        [keras.Input((2, 3)), keras.layers.Flatten(), keras.layers.Dense(CLASSES)]
    )
    model.set_weights(linear_model().get_weights())
    model.save(tmp_path / "grid.keras")
    out = tmp_path / "out"
    assert run(f"--model={tmp_path}/grid.keras", f"--npz={files}/data.npz", *FAST,
               f"--output_dir={out}") == 0  # fmt: skip
    report = read(out)
    x, y, w = dataset()
    assert report["clean_accuracy"] == pytest.approx(numpy_accuracy(x, y, w))
    assert report["settings"]["command"]["reshaped"] == [[6], [2, 3]]
    assert "reshaped from [6] to [2, 3]" in capsys.readouterr().out


# ---------------------------------------------------------------------- #
# Bad input: one line naming the flag, nothing left behind.
# ---------------------------------------------------------------------- #


def bad_npz(folder, **arrays):
    x, y, _ = dataset()
    arrays = {"x_test": x, "y_test": y, **arrays}
    np.savez(folder / "bad.npz", **arrays)
    return folder / "bad.npz"


@pytest.mark.parametrize(
    "case, match",
    [
        ("not_a_model", r"--model: not a Keras model file .*Received: --model=.*not_a_model"),
        ("missing_model", r"--model: no such file or directory"),
        ("directory", r"--model: a directory without saved_model\.pb is not a SavedModel"),
        (
            "labels",
            r"--npz=.*bad\.npz: labels must be class indices in \[0, 2\] for a model "
            r"with 3 classes\. Received: labels from \d to 7 \(1 outside\)",
        ),  # fmt: skip
        ("count", r"--npz=.*bad\.npz: 24 inputs but 23 labels"),
        (
            "shape",
            r"--npz=.*bad\.npz: inputs must have the model's input shape \(batch, 6\)\. "
            r"Received: x with shape \(24, 5\)",
        ),  # fmt: skip
        (
            "unscaled",
            r"--npz=.*: inputs must lie in the `clip` box \[0, 1\].*Received: x from "
            r"\d+ to \d+.*\(see --scale and --clip\)",
        ),  # fmt: skip
        ("nan", r"--npz=.*bad\.npz: inputs must be finite\. Received: x with 6 NaN and 0 inf"),
        ("split", r"--npz: no array 'x_train' in .*; choose --split, or --x_key and --y_key"),
        ("l1", r"--l1: only FGSM and PGD attack p=1"),
        ("attacks", r"--attacks: choose from fgsm,.*Received: --attacks=cw"),
        ("import", r"--import: could not import 'no_such_module_kgr'"),
    ],
)
def test_bad_input_is_one_line_naming_the_flag_and_leaves_nothing(
    files, tmp_path, capsys, case, match
):
    x, y, _ = dataset()
    model, data = files / "logits.keras", files / "data.npz"
    extra = list(FAST)
    if case == "not_a_model":
        model = tmp_path / "not_a_model.keras"
        model.write_text("not a zip")
    elif case == "missing_model":
        model = tmp_path / "missing.keras"
    elif case == "directory":
        model = tmp_path
    elif case == "labels":
        data = bad_npz(tmp_path, y_test=np.where(np.arange(N) == 3, 7, y))
    elif case == "count":
        data = bad_npz(tmp_path, y_test=y[:-1])
    elif case == "shape":
        data = bad_npz(tmp_path, x_test=x[:, :5])
    elif case == "unscaled":
        extra.append("--scale=none")
    elif case == "nan":
        data = bad_npz(tmp_path, x_test=np.where(np.arange(N)[:, None] == 2, np.nan, x / 255))
    elif case == "split":
        extra.append("--split=train")
    elif case == "l1":
        extra = ["--l1=1", "--verbose=0"]
    elif case == "attacks":
        extra.append("--attacks=cw")
    elif case == "import":
        extra.append("--import=no_such_module_kgr")
    out = tmp_path / "out"
    assert run(f"--model={model}", f"--npz={data}", *extra, f"--output_dir={out}") == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("kgr-evaluate: error: "), error
    assert re.search(match, error[0]), error[0]
    assert not out.exists()


def test_flag_syntax_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        command.main(["--model=m.keras", "--npz=d.npz", "--output_dir=o", "--linf=0.1,x"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == ["kgr-evaluate: error: argument --linf: expected radii like 0.1,0.3; "
                     "got '0.1,x' (see --help)"]  # fmt: skip


def test_tfds_without_tensorflow_datasets_names_the_extra(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
    out = tmp_path / "out"
    assert run(f"--model={files}/logits.keras", "--tfds=mnist", f"--output_dir={out}") == 2
    error = capsys.readouterr().err.strip()
    assert error == (
        "kgr-evaluate: error: --tfds: needs tensorflow-datasets, which the library does not "
        'install: pip install "keras_gradreg[train]" (or tensorflow-datasets); or use --npz'
    )
    assert not out.exists()


@pytest.mark.slow  # tensorflow-datasets' import and mock data.
def test_tfds_data_through_mock_data(tmp_path):
    """--tfds reads the split as (image, label) pairs, takes --examples, scales uint8."""
    tfds = pytest.importorskip("tensorflow_datasets")
    model = keras.Sequential(
        [keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(10)]
    )
    model.save(tmp_path / "mnist.keras")
    out = tmp_path / "out"
    with tfds.testing.mock_data(num_examples=30):
        assert run(f"--model={tmp_path}/mnist.keras", "--tfds=mnist", "--examples=12", *FAST,
                   f"--output_dir={out}") == 0  # fmt: skip
        pairs = list(tfds.as_numpy(tfds.load("mnist", split="test", as_supervised=True).take(12)))
    x = np.stack([image for image, _ in pairs]).astype("float32") / 255.0
    y = np.array([label for _, label in pairs])
    report = read(out)
    assert report["num_examples"] == 12
    assert report["settings"]["command"]["data"] == "--tfds=mnist --split=test"
    expected = np.mean(np.argmax(model.predict(x, verbose=0), axis=1) == y)
    assert report["clean_accuracy"] == pytest.approx(expected)


def test_a_failed_write_leaves_no_partial_output(files, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def broken_plot(self, path):
        with open(path, "wb") as file:
            file.write(b"half a png")
        raise OSError("disk full")

    monkeypatch.setattr("keras_gradreg.robustness.report.RobustnessReport.plot", broken_plot)
    with pytest.raises(OSError, match="disk full"):
        run(f"--model={files}/logits.keras", f"--npz={files}/data.npz", *FAST,
            f"--output_dir={out}")  # fmt: skip
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OSError, match="disk full"):
        run(f"--model={files}/logits.keras", f"--npz={files}/data.npz", *FAST,
            f"--output_dir={out}")  # fmt: skip
    assert os.listdir(out) == ["keep.txt"]


# ---------------------------------------------------------------------- #
# In fresh processes, as a user runs it.
# ---------------------------------------------------------------------- #

TRAIN = """
import sys
import keras
import numpy as np
sys.path.insert(0, sys.argv[3])
{imports}
data = np.load(sys.argv[1])
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((6,)), {layers}, keras.layers.Dense(3)])
loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
model.compile(keras.optimizers.Adam(0.01), loss)
model.fit(data["x_test"] / 255.0, data["y_test"], epochs=20, batch_size=8, verbose=0)
model.save(sys.argv[2])
"""

CUSTOM = '''
import keras


@keras.saving.register_keras_serializable(package="kgr_test_custom")
class Double(keras.layers.Layer):
    """Multiplies its input by 2."""

    def call(self, x):
        return 2.0 * x
'''


def python(*args, cwd=ROOT, path=None):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    if path:
        env["PYTHONPATH"] = os.pathsep.join([str(path), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


@pytest.mark.slow  # Three fresh processes.
def test_sequential_trained_and_saved_in_a_fresh_process_then_evaluated_by_the_command(
    files, tmp_path
):
    script = tmp_path / "train_model.py"
    script.write_text(TRAIN.format(imports="", layers="keras.layers.Dense(8, activation='relu')"))
    model = tmp_path / "sequential.keras"
    trained = python(script, files / "data.npz", model, tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    out = tmp_path / "out"
    result = python("-m", "keras_gradreg.evaluate", f"--model={model}",
                    f"--npz={files}/data.npz", "--suite=fast", "--steps=5", "--linf=0,0.1",
                    "--l2=0,0.5", f"--output_dir={out}")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = read(out)
    x, y, _ = dataset()
    predictions = np.argmax(keras.saving.load_model(model)(x / 255.0), axis=1)
    assert report["clean_accuracy"] == pytest.approx(np.mean(predictions == y))
    assert report["clean_accuracy"] > 0.5
    for p in (math.inf, 2):
        label = "inf" if p == math.inf else 2
        rows = {r["attack"]: r for r in report["rows"] if r["p"] == label and r["epsilon"] == 0}
        assert rows["worst_case"]["accuracy"] == report["clean_accuracy"]
    assert report["settings"]["attacks"] == ["fgsm", "pgd"] and report["settings"]["steps"] == 5
    assert report["settings"]["outputs"] == "logits"
    assert report["settings"]["command"]["model"] == str(model)
    assert "fgsm p=inf epsilon=0.1: robust" in result.stdout  # progress, a line per attack
    assert "detected" in result.stdout and "worst_case" in result.stdout


@pytest.mark.slow  # Three fresh processes.
def test_import_registers_custom_layers(files, tmp_path):
    (tmp_path / "kgr_test_custom.py").write_text(CUSTOM)
    script = tmp_path / "train_model.py"
    script.write_text(
        TRAIN.format(imports="import kgr_test_custom", layers="kgr_test_custom.Double()")
    )
    model = tmp_path / "custom.keras"
    trained = python(script, files / "data.npz", model, tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    args = ["-m", "keras_gradreg.evaluate", f"--model={model}", f"--npz={files}/data.npz",
            "--suite=fast", "--steps=2", "--linf=0.1", "--verbose=0"]  # fmt: skip
    refused = python(*args, f"--output_dir={tmp_path / 'a'}")
    assert refused.returncode == 2
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("kgr-evaluate: error: --model: not a Keras model file")
    assert "--import the module that registers them" in last
    assert not (tmp_path / "a").exists()
    accepted = python(*args, "--import=kgr_test_custom", f"--output_dir={tmp_path / 'b'}",
                      path=tmp_path)  # fmt: skip
    assert accepted.returncode == 0, accepted.stderr[-2000:]
    assert read(tmp_path / "b")["num_examples"] == N


# ---------------------------------------------------------------------- #
# The commands in docs/guide.md and docs/evaluate.md, run as written.
# ---------------------------------------------------------------------- #

MNIST = ROOT.parent / "shared" / "data" / "mnist.npz"
# What the test changes in each documented command: where the model, the data
# and the outputs are, and (appended, so they win) budgets small enough for a test.
CHEAP = ["--examples=20", "--steps=3", "--apgd_steps=3", "--fab_steps=3",
         "--square_queries=10", "--verbose=0"]  # fmt: skip


def documented_commands() -> list[tuple[str, list[str]]]:
    """(file, argv) of each shell block after an `evaluate-command` marker in the docs."""
    found = []
    for path in (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))):
        blocks = re.findall(
            r"<!-- evaluate-command[^>]*-->\s*```sh\n(.*?)```", path.read_text(), re.S
        )
        found += [(path.name, shlex.split(block)) for block in blocks]
    return found


def test_the_documented_commands_are_found():
    commands = documented_commands()
    names = [name for name, _ in commands]
    assert names.count("evaluate.md") == 2 and "guide.md" in names, names
    for _, argv in commands:
        assert argv[0] == "kgr-evaluate" or argv[:3] == ["python", "-m", "keras_gradreg.evaluate"]


@pytest.mark.slow  # The standard suite (small budgets) on MNIST.
@pytest.mark.skipif(not MNIST.exists(), reason="no MNIST file at ../shared/data")
def test_docs_commands_run_as_written(tmp_path, monkeypatch):
    with np.load(MNIST) as data:
        x, y = data["x_train"][:1000].reshape(-1, 784) / 255.0, data["y_train"][:1000]
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(10)])
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=2, batch_size=100, verbose=0)
    model.save(tmp_path / "model.keras")
    model.export(str(tmp_path / "exported_model"), verbose=False)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "mnist.npz").symlink_to(MNIST)
    (tmp_path / "checkout").mkdir()
    monkeypatch.chdir(tmp_path / "checkout")  # ../shared/data/mnist.npz as written
    for name, argv in documented_commands():
        argv = argv[1:] if argv[0] == "kgr-evaluate" else argv[3:]
        argv = [a.replace("--model=", f"--model={tmp_path}/") for a in argv]
        assert command.main([*argv, *CHEAP]) == 0, (name, argv)
        output_dir = next(a.split("=", 1)[1] for a in argv if a.startswith("--output_dir="))
        report = read(output_dir)
        assert report["num_examples"] == 20
        assert report["settings"]["command"]["reshaped"] == [[28, 28], [784]]
        suite = next((a.split("=")[1] for a in argv if a.startswith("--suite=")), "standard")
        assert report["settings"]["suite"] == suite
        if "--linf=0.1,0.3" in argv:
            assert {r["epsilon"] for r in report["rows"]} == {0.1, 0.3}
