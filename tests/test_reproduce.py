"""train.reproduce: table rows, commands and the README rewrite (no training)."""

from __future__ import annotations

import math

import pytest

from train import reproduce


def test_command_line_round_trips_through_the_binary_flags():
    command = reproduce.command_line(
        "mnist_maxout_mlp", {"p": math.inf, "sigma": 0.25, "pictures": False}
    )
    assert command == (
        "python -m train.main --preset=mnist_maxout_mlp --p=inf --sigma=0.25 --nopictures"
    )


def test_accuracy_lookup_and_table_row():
    metrics = {
        "flags": {"steps_per_epoch": 0},
        "epochs": [{"seconds": 10.0}, {"seconds": 12.5}],
        "final": {"test/error_percent": 1.25},
        "robustness": {
            "num_examples": 100,
            "flags": [],
            "rows": [
                {"attack": "fgsm", "p": "inf", "epsilon": 0.1, "accuracy": 0.5},
                {"attack": "pgd", "p": 2, "epsilon": 1.0, "accuracy": 0.25},
            ],
        },
    }
    row = reproduce.ROWS_BY_NAME["maxout_plain"]
    record = reproduce.table_row(row, {"metrics": metrics, "command": "cmd"}, 0.0)
    assert record["epochs"] == 2 and record["train_seconds"] == 22.5
    assert record["fgsm_inf_0.1"] == 0.5 and record["pgd_2_1"] == 0.25
    assert record["pgd_inf_0.1"] is None
    text = reproduce.markdown(
        {
            "rows": [record],
            "eval_examples": 100,
            "pgd_steps": 40,
            "hardware": "cpu",
            "selection": {"curves": {"0.1": [2.0, 1.5]}, "epochs": 2, "chosen_sigma": 0.1},
        }
    )
    assert (
        "| maxout MLP, plain (sigma=0) | 0 | 1.25 | 50.0/-/- | -/-/- | -/- | 25.0/- | 2 |" in text
    )
    assert "sigma=0.1: 2.00/1.50" in text


def test_update_readme_replaces_only_between_markers(tmp_path):
    path = tmp_path / "README.md"
    path.write_text(f"intro\n{reproduce.README_START}\nold\n{reproduce.README_END}\noutro\n")
    reproduce.update_readme(str(path), "new table\n")
    assert path.read_text() == (
        f"intro\n{reproduce.README_START}\nnew table\n{reproduce.README_END}\noutro\n"
    )
    path.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        reproduce.update_readme(str(path), "x")
