"""experiments.cheaper: the experiment's runs, bench costs and table (no training)."""

from __future__ import annotations

import json
import os
import re
import shutil

from experiments import cheaper, jobs

BENCH = os.path.join(jobs.CHECKOUT, "bench", "results", "step_time_lazy_mlp.json")
OPTIONS = cheaper.Options(
    os.path.join(os.path.dirname(jobs.CHECKOUT), "shared", "data", "mnist.npz")
)


def test_every_row_has_its_cost_in_the_committed_bench():
    ratios = cheaper.bench_ratios(BENCH)
    assert ratios["plain"] == 1.0
    assert all(row.bench_method in ratios for row in cheaper.ROWS)
    assert cheaper.ROWS_BY_NAME["penalty_every4"].bench_method == "penalty every=4"
    assert cheaper.Row("x", "penalty", 2, 0.5).bench_method == "penalty every=2 fraction=0.5"


def test_rows_share_sigma_and_epochs_and_differ_only_in_method_every_fraction():
    commands = {
        row.name: jobs.command_line(
            cheaper.job(row, OPTIONS).preset, cheaper.job(row, OPTIONS).overrides
        )
        for row in cheaper.ROWS
    }
    base = "python -m train.main --preset=mnist_maxout_mlp --data_npz=../shared/data/mnist.npz"
    assert commands["penalty_every16"] == (
        f"{base} --p=2.0 --method=penalty --sigma=0.3 --every=16 --epochs=40 --nopictures"
    )
    assert commands["adversarial_every4"] == (
        f"{base} --p=2.0 --method=adversarial --sigma=0.3 --clean_weight=0.0 --every=4 "
        "--epochs=40 --nopictures"
    )
    assert commands["plain"] == f"{base} --p=2.0 --sigma=0.0 --epochs=40 --nopictures"


def test_markdown_shows_error_robustness_and_the_bench_cost():
    row = cheaper.ROWS_BY_NAME["penalty_fraction0.25"]
    record = {
        "name": row.name,
        "label": row.label,
        "test_error_percent": 1.234,
        "robust_inf_0.1": 0.5,
        "robust_2_1": None,
        "step_ratio": 1.7433,
        "train_seconds": 90.0,
        "evaluation": "APGD-CE, APGD-T, Square 5000q (1000)",
        "command": "cmd",
    }
    text = cheaper.markdown(
        {"rows": [record], "sigma": 0.3, "epochs": 40, "bench": "b.json", "hardware": "cpu"}
    )
    assert (
        "| p=2 penalty, fraction=0.25 | 1.23 | 50.0 | - | 1.74x | 1.5 min "
        "| APGD-CE, APGD-T, Square 5000q (1000) |" in text
    )


def test_results_page_and_results_hold_what_the_generator_writes():
    """The published table (docs/results.md, results/cheaper.md) is
    markdown(results/cheaper.json), with paths relative."""
    with open(os.path.join(jobs.CHECKOUT, "results", "cheaper.json")) as f:
        text = cheaper.markdown(json.load(f))
    with open(os.path.join(jobs.CHECKOUT, "docs", "results.md")) as f:
        page = f.read()
    assert page.split(cheaper.README_START + "\n")[1].split(cheaper.README_END)[0] == text
    with open(os.path.join(jobs.CHECKOUT, "results", "cheaper.md")) as f:
        assert f.read() == text
    assert "--data_npz=../shared/data/mnist.npz" in text
    assert not re.search(r"--\w+=/", text), "a command names an absolute path"


def test_render_writes_the_published_markdown_again_byte_for_byte(tmp_path):
    """`--render`'s write_markdown on copies of results/cheaper.json and docs/results.md
    changes no byte."""
    (tmp_path / "results").mkdir()
    published = {
        "results/cheaper.md": tmp_path / "results" / "cheaper.md",
        "docs/results.md": tmp_path / "results_page.md",
    }
    for source, copy in published.items():
        shutil.copyfile(os.path.join(jobs.CHECKOUT, source), copy)
    with open(os.path.join(jobs.CHECKOUT, "results", "cheaper.json")) as f:
        results = json.load(f)
    cheaper.write_markdown(results, str(tmp_path / "results"), str(tmp_path / "results_page.md"))
    for source, copy in published.items():
        assert copy.read_bytes() == open(os.path.join(jobs.CHECKOUT, source), "rb").read(), source
