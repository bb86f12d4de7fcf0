"""experiments.reproduce: table rows, commands and the README rewrite (no training)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil

import pytest

from experiments import jobs, mnist_table, reproduce
from train import config as config_lib
from train import workdir as workdir_lib


def test_command_line_round_trips_through_the_binary_flags():
    command = jobs.command_line(
        "mnist_maxout_mlp",
        {"p": math.inf, "sigma": 0.25, "pictures": False, "hidden_units": (8, 4)},
    )
    assert command == (
        "python -m train.main --preset=mnist_maxout_mlp --p=inf --sigma=0.25 --nopictures "
        "--hidden_units=8,4"
    )


def test_command_line_writes_paths_relative_to_the_checkout(monkeypatch):
    data = os.path.join(os.path.dirname(jobs.CHECKOUT), "shared", "data", "mnist.npz")
    command = jobs.command_line("mnist_maxout_mlp", {"data_npz": data, "sigma": 0.0})
    assert command == (
        "python -m train.main --preset=mnist_maxout_mlp "
        "--data_npz=../shared/data/mnist.npz --sigma=0.0"
    )
    monkeypatch.chdir(os.path.join(jobs.CHECKOUT, "train"))
    relative = jobs.command_line("mnist_maxout_mlp", {"data_npz": "../data/m.npz"})
    assert relative.endswith("--data_npz=data/m.npz")


def test_table_row_and_markdown_show_the_worst_case_and_the_attacks():
    metrics = {
        "flags": {"steps_per_epoch": 0, "jit_compile": False},
        "epochs": [{"seconds": 10.0}, {"seconds": 12.5}],
        "final": {"test/error_percent": 1.25},
        "robustness": {
            "num_examples": 100,
            "flags": {},
            "seconds": {"apgd-ce": 3.0, "apgd-t": 5.0, "square": 2.0},
            "settings": {"attacks": ["apgd-ce", "apgd-t", "square"], "square_queries": 5000},
            "rows": [
                {"attack": "apgd-ce", "p": "inf", "epsilon": 0.1, "accuracy": 0.6},
                {"attack": "worst_case", "p": "inf", "epsilon": 0.1, "accuracy": 0.5},
                {"attack": "worst_case", "p": 2, "epsilon": 1.0, "accuracy": 0.25},
            ],
        },
    }
    row = reproduce.ROWS_BY_NAME["conv_pinf_penalty"]
    record = mnist_table.table_row(row, {"metrics": metrics, "command": "cmd"}, 0.1)
    assert record["epochs"] == 2 and record["train_seconds"] == 22.5
    assert record["robust_inf_0.1"] == 0.5 and record["robust_2_1"] == 0.25
    assert record["robust_inf_0.2"] is None and record["evaluation_seconds"] == 10.0
    assert record["evaluation"] == "APGD-CE, APGD-T, Square 5000q (100)"
    text = mnist_table.markdown(
        {
            "rows": [record],
            "hardware": "cpu",
            "selections": {
                "conv": {
                    "title": "Conv: sigma",
                    "curves": {"0.1": [2.0, 1.5]},
                    "epochs": 2,
                    "chosen_sigma": 0.1,
                }
            },
        }
    )
    assert (
        "| conv maxout, p=inf, penalty (XLA off) | 0.1 | 2 | 1.25 | 50.0/-/- | 25.0/- | "
        "APGD-CE, APGD-T, Square 5000q (100) | 0.4 min |" in text
    )
    assert "Conv: sigma chosen on validation" in text and "sigma=0.1: 2.00/1.50" in text


def test_rows_of_an_earlier_run_are_kept_marked_and_in_table_order():
    new = {"name": "conv_pinf_penalty", "label": "conv", "evaluation": "APGD-CE (200)"}
    earlier = {
        "pgd_steps": 40,
        "selections": {"screen": {"title": "sigma for p=2", "chosen_sigma": 0.03}},
        "rows": [
            {"name": "maxout_plain_long", "evaluation": "APGD-CE (1000)"},
            {"name": "conv_pinf_penalty", "robustness_examples": 200},
            {"name": "maxout_plain", "robustness_examples": 1000},
        ],
    }
    earlier["hardware"] = "AMD"
    results = {
        "rows": [new],
        "hardware": "Intel",
        "selections": {"conv": {"title": "Conv", "chosen_sigma": 0.1}},
    }
    order = ["maxout_plain", "conv_pinf_penalty", "maxout_plain_long"]
    merged = mnist_table.merge_earlier(earlier, results, order)
    assert [r["name"] for r in merged["rows"]] == order
    assert merged["rows"][1] is new and merged["pgd_steps"] == 40
    assert merged["hardware"] == "Intel; rows of an earlier run: AMD"
    assert mnist_table._evaluation(merged["rows"][0], 40) == "PGD-40 alone (1000), an earlier run"
    assert mnist_table._evaluation(merged["rows"][1], 40) == "APGD-CE (200)"
    assert mnist_table._evaluation(merged["rows"][2], 40) == "APGD-CE (1000), an earlier run"
    stages = mnist_table.selection_stages(merged)
    assert [(title, s["chosen_sigma"]) for title, s in stages] == [
        ("sigma for p=2 (an earlier run)", 0.03),
        ("Conv", 0.1),
    ]


def test_update_readme_replaces_only_between_markers(tmp_path):
    path = tmp_path / "README.md"
    path.write_text(f"intro\n{mnist_table.README_START}\nold\n{mnist_table.README_END}\noutro\n")
    mnist_table.update_readme(str(path), "new table\n")
    assert path.read_text() == (
        f"intro\n{mnist_table.README_START}\nnew table\n{mnist_table.README_END}\noutro\n"
    )
    path.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        mnist_table.update_readme(str(path), "x")


def test_long_selection_text_shows_spaced_epochs_and_the_lowest():
    curve = [3.0 - 0.01 * i for i in range(20)]
    curve[12] = 1.0
    text = mnist_table.selection_text(
        "Long stage: sigma",
        {"epochs": 20, "curves": {"0.3": curve}, "chosen_sigma": 0.3},
        shown=5,
    )
    assert "after epochs 4, 8, 12, 16, 20" in text
    assert "sigma=0.3: 2.97/2.93/2.89/2.85/2.81 (lowest 1.00 after epoch 13)" in text
    assert "chosen sigma = 0.3." in text
    assert mnist_table.selection_text("x", None) == ""


def _record(**overrides) -> dict:
    """metrics.json of a finished mnist_maxout_mlp run with `overrides`."""
    config = config_lib.make_config("mnist_maxout_mlp", **overrides)
    return {"status": "done", "flags": config.to_dict()}


def _reused(record: dict, finished: bool = True, **overrides) -> None:
    config = config_lib.make_config("mnist_maxout_mlp", **overrides)
    workdir_lib.check_same_run(record, config, "runs/x", reused=finished)


def test_a_finished_run_with_other_settings_is_not_reused():
    recorded = _record(sigma=0.1, epochs=40, p=math.inf, hidden_units=(240, 240))
    same = dict(sigma=0.1, epochs=40, p="inf", hidden_units=[240, 240])
    _reused(recorded, **same)
    with pytest.raises(ValueError, match=r"runs/x .*other settings \(epochs: 40 -> 200\)"):
        _reused(recorded, **{**same, "epochs": 200})
    # Evaluation settings: fixed once the run is evaluated, free while it trains
    # (train.main resumes it with the new ones), as its epochs are.
    recorded["flags"]["eval_examples"] = 200
    with pytest.raises(ValueError, match=r"eval_examples: 200 -> 100"):
        _reused(recorded, **{**same, "eval_examples": 100})
    _reused(recorded, finished=False, **{**same, "eval_examples": 100, "epochs": 200})
    with pytest.raises(ValueError, match=r"sigma: 0.1 -> 0.2"):
        _reused(recorded, finished=False, **{**same, "sigma": 0.2})


def test_a_run_recorded_without_a_setting_is_reused_only_at_its_default():
    """A run recorded before `every`/`fraction` existed ran with every=1, fraction=1."""
    recorded = _record(method="penalty")
    for name in ("every", "fraction"):
        del recorded["flags"][name]
    _reused(recorded, method="penalty")
    _reused(recorded, method="penalty", every=1, fraction=1.0)
    with pytest.raises(ValueError, match=r"other settings \(every: 1 -> 4\)"):
        _reused(recorded, method="penalty", every=4)
    with pytest.raises(ValueError, match=r"other settings \(fraction: 1.0 -> 0.5\)"):
        _reused(recorded, finished=False, method="penalty", fraction=0.5)


def test_validation_plot_is_written_smoke(tmp_path):
    """Smoke test: the plot is a PNG file (its content is not checked)."""
    stage = {"epochs": 3, "curves": {"0.1": [3.0, 2.0, 1.5]}, "chosen_sigma": 0.1}
    path = tmp_path / "validation.png"
    stages = {"screen": {**stage, "title": "a"}, "long_penalty": {**stage, "title": "b"}}
    mnist_table.plot_validation({"selections": stages}, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    nothing = tmp_path / "none.png"
    mnist_table.plot_validation({"selections": {}, "rows": []}, str(nothing))
    assert not nothing.exists()  # No stage ran (e.g. --rows=maxout_plain): no picture.


def test_both_pictures_come_from_the_same_stage(tmp_path):
    def publish(names):
        records = []
        for name in names:
            (tmp_path / name).mkdir(exist_ok=True)
            (tmp_path / name / mnist_table.PICTURE).write_bytes(name.encode())
            records.append({"name": name, "workdir": str(tmp_path / name)})
        out = tmp_path / "results"
        out.mkdir(exist_ok=True)
        assert len(mnist_table.publish_pictures(records, str(out))) == 2
        return (
            (out / "mnist_perturbations_plain.png").read_bytes(),
            (out / "mnist_perturbations_p2_penalty.png").read_bytes(),
        )

    short = ["maxout_plain", "maxout_p2_penalty"]
    # Only one row of the long stage: both pictures from the first stage.
    assert publish([*short, "maxout_plain_long"]) == (b"maxout_plain", b"maxout_p2_penalty")
    assert publish([*short, "maxout_plain_long", "maxout_p2_penalty_long"]) == (
        b"maxout_plain_long",
        b"maxout_p2_penalty_long",
    )


def test_where_the_data_is_does_not_make_a_run_different():
    recorded = _record(sigma=0.1, data_npz=None, jit_compile=True)
    recorded["flags"]["data_npz"] = "../shared/data/mnist.npz"
    _reused(recorded, sigma=0.1, jit_compile=False)


def between(path: str, start: str, end: str) -> str:
    with open(os.path.join(jobs.CHECKOUT, path)) as f:
        return f.read().split(start + "\n")[1].split(end)[0]


def test_readme_and_results_hold_what_the_generator_writes():
    """The published table and commands (docs/results.md) are markdown(results/mnist.json),
    paths relative; the README's headline rows are headline_markdown's."""
    with open(os.path.join(jobs.CHECKOUT, "results", "mnist.json")) as f:
        results = json.load(f)
    text = mnist_table.markdown(results)
    assert between("docs/results.md", mnist_table.README_START, mnist_table.README_END) == text
    headline = between("README.md", mnist_table.HEADLINE_START, mnist_table.HEADLINE_END)
    assert headline == mnist_table.headline_markdown(results)
    rows = [line for line in headline.splitlines() if line.startswith("| ")][2:]
    assert len(rows) == len(mnist_table.HEADLINE_ROWS) and all(row in text for row in rows)
    with open(os.path.join(jobs.CHECKOUT, "results", "mnist.md")) as f:
        assert f.read() == text
    assert "--data_npz=../shared/data/mnist.npz" in text
    assert not re.search(r"--\w+=/", text), "a command names an absolute path"


def test_render_writes_the_published_markdown_again_byte_for_byte(tmp_path):
    """`--render`'s write_markdown on copies of results/mnist.json, docs/results.md and
    README.md changes no byte; a changed record changes both pages."""
    (tmp_path / "results").mkdir()
    published = {
        "results/mnist.json": tmp_path / "results" / "mnist.json",
        "results/mnist.md": tmp_path / "results" / "mnist.md",
        "docs/results.md": tmp_path / "results_page.md",
        "README.md": tmp_path / "README.md",
    }
    for source, copy in published.items():
        shutil.copyfile(os.path.join(jobs.CHECKOUT, source), copy)
    results = json.loads(published["results/mnist.json"].read_text())
    page, readme = str(published["docs/results.md"]), str(published["README.md"])
    reproduce.write_markdown(results, str(tmp_path / "results"), page, readme)
    for source, copy in published.items():
        assert copy.read_bytes() == open(os.path.join(jobs.CHECKOUT, source), "rb").read(), source
    row = next(r for r in results["rows"] if r["name"] == "maxout_p2_adversarial_long")
    row["test_error_percent"] = 0.99
    reproduce.write_markdown(results, str(tmp_path / "results"), page, readme)
    changed = "| maxout MLP, p=2, adversarial (long stage) | 0.3 | 200 | 0.99 |"
    for path in (page, readme):
        assert changed in open(path).read()


@pytest.mark.slow
def test_parallel_jobs_run_as_subprocesses_and_are_read_back(tmp_path):
    """Two tiny runs side by side; started again, finished runs are read, not repeated."""
    import numpy as np

    rng = np.random.default_rng(0)
    npz = tmp_path / "tiny.npz"
    np.savez(
        npz,
        x_train=rng.integers(0, 256, size=(64, 28, 28), dtype=np.uint8),
        y_train=rng.integers(0, 10, size=64),
        x_test=rng.integers(0, 256, size=(16, 28, 28), dtype=np.uint8),
        y_test=rng.integers(0, 10, size=16),
    )
    settings = dict(
        data_npz=str(npz), hidden_units=(8,), batch_size=16, epochs=1, eval_suite="none",
        pictures=False, jit_compile=False,
    )  # fmt: skip
    planned = [
        jobs.Job(f"runs/sigma_{sigma:g}", "mnist_maxout_mlp", {**settings, "sigma": sigma})
        for sigma in (0.0, 0.1)
    ]
    root = str(tmp_path / "root")
    first = jobs.run_jobs(root, planned, parallel=2)
    for job in planned:
        assert first[job.name]["metrics"]["status"] == "done"
        assert first[job.name]["metrics"]["flags"]["sigma"] == job.overrides["sigma"]
        assert os.path.exists(os.path.join(root, f"{job.name}.log"))
    stamps = [os.path.getmtime(os.path.join(root, j.name, "metrics.json")) for j in planned]
    again = jobs.run_jobs(root, planned, parallel=2)
    assert [os.path.getmtime(os.path.join(root, j.name, "metrics.json")) for j in planned] == stamps
    assert again == first
    with pytest.raises(ValueError, match=r"other settings \(sigma: 0\.1 -> 0\.3\)"):
        other = jobs.Job(planned[1].name, "mnist_maxout_mlp", {**settings, "sigma": 0.3})
        jobs.run_jobs(root, [other])


def test_a_task_starts_once_the_stage_it_needs_is_summarized(tmp_path):
    """Finished runs (fake metrics.json files) are read; the final task is made from
    the summary of the stage it needs, which exists only after both its runs."""
    import numpy as np

    def fake_run(job, curve):
        config = config_lib.make_config(job.preset, **job.overrides)
        workdir = tmp_path / job.name
        workdir.mkdir(parents=True)
        epochs = [{"epoch": i + 1, "validation/accuracy": 1 - e / 100} for i, e in enumerate(curve)]
        content = {"flags": config.to_dict(), "status": "done", "epochs": epochs}
        (workdir / "metrics.json").write_text(json.dumps(content))

    stage = reproduce.Stage("s", "select", "t", "mnist_maxout_mlp", {"p": 2.0}, (0.1, 0.3), 2)
    selection = stage.jobs()
    for job, curve in zip(selection, ([3.0, 2.0], [3.0, 1.5])):
        fake_run(job, curve)
    final = jobs.Job("final/x", "mnist_maxout_mlp", {"sigma": 0.3, "epochs": 2})
    fake_run(final, [])
    made = []

    def make_final(summaries):
        made.append(summaries["s"]["chosen_sigma"])
        return final

    tasks = [jobs.Task(make_final, needs=("s",))]
    tasks += [jobs.Task(lambda _, job=job: job, stage="s") for job in selection]
    results, summaries = jobs.run_tasks(str(tmp_path), tasks, {"s": stage.summarize})
    assert made == [0.3] and summaries["s"]["chosen_sigma"] == 0.3
    curves = summaries["s"]["curves"]
    assert set(curves) == {"0.1", "0.3"}
    np.testing.assert_allclose(curves["0.1"], [3.0, 2.0])
    np.testing.assert_allclose(curves["0.3"], [3.0, 1.5])
    assert set(results) == {"select/sigma_0.1", "select/sigma_0.3", "final/x"}
    with pytest.raises(ValueError, match="No task can start"):
        jobs.run_tasks(str(tmp_path), [jobs.Task(make_final, needs=("other",))], {})


def test_each_experiment_lists_only_its_own_flags():
    """--help lists a module's key flags: its own and the train.main flags it passes on."""
    from absl import flags

    from experiments import against_adversarial_training, cheaper

    def key_flags(module):
        return {f.name for f in flags.FLAGS.get_key_flags_for_module(module.__name__)}

    common = {"workdir", "parallel", "results_dir"}
    pages = {"results_page", "render"}
    assert key_flags(reproduce) >= {*reproduce.SHARED_FLAGS, *common, *pages, "readme"}
    assert "select_sigmas" in key_flags(reproduce)
    assert key_flags(cheaper) >= {*cheaper.SHARED_FLAGS, *common, *pages, "cheaper_sigma"}
    aat = against_adversarial_training
    assert key_flags(aat) >= {
        *aat.DATA_FLAGS, *aat.EVAL_FLAGS, *common, *pages, "experiment_rows", "reselect",
    }  # fmt: skip
    binary_only = {"sigma", "method", "preset", "epochs", "print_config"}
    for module in (reproduce, cheaper, aat):
        assert not key_flags(module) & binary_only
    assert "readme" not in key_flags(aat) and "readme" not in key_flags(cheaper)
    assert "select_sigmas" not in key_flags(cheaper)


def test_jobs_reuse_a_finished_run_recorded_without_a_setting_only_at_its_default(tmp_path):
    """A finished run recorded before `every` existed: read for every=1, refused for every=4
    (the experiments skipped settings missing from a record before the one rule)."""
    recorded = _record(sigma=0.1, epochs=2, method="penalty")
    del recorded["flags"]["every"]
    recorded["epochs"] = [{"epoch": 1}, {"epoch": 2}]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.json").write_text(json.dumps(recorded))
    settings = {"sigma": 0.1, "epochs": 2, "method": "penalty"}
    default = jobs.Job("old", "mnist_maxout_mlp", {**settings, "every": 1})
    assert jobs.run_jobs(str(tmp_path), [default])["old"]["metrics"] == recorded
    with pytest.raises(ValueError, match=r"other settings \(every: 1 -> 4\)"):
        jobs.run_jobs(
            str(tmp_path), [jobs.Job("old", "mnist_maxout_mlp", {**settings, "every": 4})]
        )
