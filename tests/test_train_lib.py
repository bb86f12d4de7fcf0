"""End-to-end tests of the training binary (train.train_lib, train.main).

Runs on `tfds.testing.mock_data` (random images and labels) with a few steps,
so the numbers asserted are about the files and their consistency, not about
accuracy; the real-data test uses a slice of shared/data/mnist.npz.
"""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from train import config as config_lib
from train import train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST_NPZ = os.path.join(os.path.dirname(REPO), "shared", "data", "mnist.npz")

TINY = dict(
    batch_size=8,
    epochs=1,
    steps_per_epoch=2,
    eval_examples=8,
    eval_pgd_steps=2,
    eval_apgd_steps=2,
    eval_square_queries=5,
)

pytestmark = pytest.mark.slow


def _event_tags(workdir):
    tags = set()
    for path in glob.glob(os.path.join(workdir, "tensorboard", "events.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(value.tag for value in event.summary.value)
    return tags


def _assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 1000


class TestPresets:
    """A class is its own pytest-xdist scope under `--dist loadscope`: the presets
    (the module's longest part) can run on one worker while the module's other
    tests run on the other."""

    @pytest.mark.parametrize("preset", list(config_lib.PRESETS))
    def test_preset_end_to_end(self, preset, tmp_path):
        check_preset_end_to_end(preset, tmp_path)


def check_preset_end_to_end(preset, tmp_path):
    """A preset trains, evaluates and writes consistent files (tiny budgets, mock data)."""
    # The CIFAR-10 network compiles for long under XLA: test it without.
    jit = preset != "cifar10_conv_maxout"
    config = config_lib.make_config(preset, jit_compile=jit, **TINY)
    workdir = str(tmp_path)
    with tfds.testing.mock_data(num_examples=16):
        results = train_lib.train_and_evaluate(config, workdir)

    with open(os.path.join(workdir, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics == json.loads(json.dumps(results, default=float))
    assert metrics["flags"] == config.to_dict() and metrics["flags"]["preset"] == preset
    assert metrics["versions"]["tensorflow"] == tf.__version__
    assert metrics["status"] == "done" and metrics["resumed_from_epoch"] == 0
    (record,) = metrics["epochs"]
    assert record["epoch"] == 1 and record["seconds"] >= record["train_seconds"] > 0
    for key in ("train/loss", "train/data_loss", "train/penalty", "test/loss"):
        assert math.isfinite(record[key])
    # The objective is the clean loss plus the penalty, for the penalty method.
    assert record["train/loss"] == pytest.approx(
        record["train/data_loss"] + record["train/penalty"], rel=1e-4
    )
    assert record["train/penalty"] > 0
    assert 0 <= record["test/accuracy"] <= 1
    final = metrics["final"]
    # 16 mock test examples: accuracy is a multiple of 1/16.
    assert final["test/accuracy"] * 16 == pytest.approx(round(final["test/accuracy"] * 16))
    assert final["test/error_percent"] == pytest.approx(100 * (1 - final["test/accuracy"]))
    assert final["test/accuracy"] == pytest.approx(record["test/accuracy"])

    report = metrics["robustness"]
    assert report["num_examples"] == 8
    assert report["settings"]["suite"] == "standard" and report["settings"]["square_queries"] == 5
    rows = {(r["attack"], r["p"], round(r["epsilon"], 6)) for r in report["rows"]}
    for attack in ("apgd-ce", "apgd-t", "square", "worst_case"):
        for epsilon in config.eval_epsilons_inf:
            assert (attack, "inf", round(epsilon, 6)) in rows
        for epsilon in config.eval_epsilons_2:
            assert (attack, 2, round(epsilon, 6)) in rows
    for row in report["rows"]:  # Random noise may help a random model; attacks may not.
        if row["attack"] != "noise":
            assert 0 <= row["accuracy"] <= report["clean_accuracy"] + 1e-6

    for name in ("robustness.png", "perturbations.png"):
        _assert_png(os.path.join(workdir, name))
    assert metrics["artifacts"]["perturbations"] == "perturbations.png"

    tags = _event_tags(workdir)
    assert {"train/loss", "train/penalty", "train/accuracy", "test/accuracy"} <= tags
    assert "hparams" in tags

    # No validation split: no model is selected (the test set must not choose one).
    assert not os.path.exists(os.path.join(workdir, "checkpoints", "best.keras"))
    assert metrics["checkpoints"]["best"] is None and metrics["checkpoints"]["selected_by"] is None
    last = keras.saving.load_model(os.path.join(workdir, "checkpoints", "last.keras"))
    assert last.regularizer.sigma == pytest.approx(config.sigma)
    assert last.optimizer.iterations.numpy() == 2
    data = metrics["data"]
    assert data["source"] == "tfds" and data["name"] == config.dataset
    assert data["train_examples"] == 16 and data["image_shape"] == list(last.input_shape[1:])


def test_workdir_of_another_run_is_refused(tmp_path):
    config = config_lib.make_config(**{**TINY, "eval_examples": 0, "pictures": False})
    with tfds.testing.mock_data(num_examples=16):
        train_lib.train_and_evaluate(config, str(tmp_path))
        with pytest.raises(ValueError, match=r"sigma: 0.1 -> 0.2"):
            train_lib.train_and_evaluate(config.replace(sigma=0.2), str(tmp_path))


@pytest.mark.skipif(not os.path.exists(MNIST_NPZ), reason="no shared/data/mnist.npz")
def test_binary_on_a_slice_of_real_mnist(tmp_path):
    with np.load(MNIST_NPZ) as data:
        np.savez(
            tmp_path / "slice.npz",
            x_train=data["x_train"][:2000],
            y_train=data["y_train"][:2000],
            x_test=data["x_test"][:500],
            y_test=data["y_test"][:500],
        )
    workdir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "train.main",
            "--preset=mnist_maxout_mlp",
            f"--data_npz={tmp_path / 'slice.npz'}",
            f"--workdir={workdir}",
            "--epochs=2",
            "--batch_size=50",
            "--eval_examples=50",
            "--eval_suite=fast",
            "--eval_pgd_steps=5",
            "--nopictures",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(workdir / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["flags"]["data_npz"] == str(tmp_path / "slice.npz")
    assert [r["epoch"] for r in metrics["epochs"]] == [1, 2]
    # 2000 real training images, 80 steps: far above chance (10%).
    assert metrics["final"]["test/accuracy"] > 0.8
    assert json.loads(result.stdout.strip().splitlines()[-1])["test/accuracy"] == pytest.approx(
        metrics["final"]["test/accuracy"]
    )
    rows = metrics["robustness"]["rows"]
    pgd = {r["epsilon"]: r["accuracy"] for r in rows if r["attack"] == "pgd" and r["p"] == "inf"}
    assert pgd[0.1] >= pgd[0.3]
    assert not os.path.exists(workdir / "perturbations.png")


def test_selection_on_validation_rounding_and_reevaluation(tmp_path, capsys):
    """best.keras is chosen on validation; stored numbers are float32's; reevaluate."""
    settings = {**TINY, "epochs": 2, "validation_split": 0.25, "pictures": False}
    config = config_lib.make_config("mnist_maxout_mlp", **settings)
    workdir = str(tmp_path)
    with tfds.testing.mock_data(num_examples=16):
        first = train_lib.train_and_evaluate(config, workdir)
        records = first["epochs"]
        assert all("validation/accuracy" in r for r in records)
        best = max(records, key=lambda r: (r["validation/accuracy"], -r["epoch"]))
        assert first["checkpoints"]["selected_by"] == "highest validation/accuracy"
        assert first["checkpoints"]["best_epoch"] == best["epoch"]
        assert first["checkpoints"]["best_validation/accuracy"] == best["validation/accuracy"]
        assert os.path.exists(os.path.join(workdir, "checkpoints", "best.keras"))
        assert first["data"]["validation_examples"] == 4 and first["data"]["train_examples"] == 12
        # Stored metrics are the shortest decimals of float32 values.
        for record in records:
            for key, value in record.items():
                if "/" in key:
                    assert value == float(str(np.float32(value)))
        final = first["final"]
        assert final["test/error_percent"] == round(100 * (1 - final["test/accuracy"]), 5)
        assert len(repr(final["test/error_percent"])) <= 8  # e.g. 56.25, not 56.25000238...

        # A finished run is not evaluated again unless asked to.
        again = train_lib.train_and_evaluate(config.replace(eval_examples=4), workdir)
        assert again == first
        assert "is complete (2 epochs" in capsys.readouterr().err
        reevaluated = train_lib.train_and_evaluate(
            config.replace(eval_examples=4), workdir, reevaluate=True
        )
    assert reevaluated["robustness"]["num_examples"] == 4
    assert reevaluated["epochs"] == first["epochs"] and reevaluated["final"] == first["final"]


def test_float32_rounding_of_stored_numbers():
    from train.recording import error_percent, float32_value

    accuracy = float(np.float32(0.9644))  # 0.9643999934196472 as a double.
    assert float32_value(accuracy) == 0.9644
    assert error_percent(accuracy) == 3.56
    assert error_percent(np.float32(0.98909998)) == 1.09
