"""experiments.against_adversarial_training: rows -> flags, the selection rule, the table,
the targets (no training), and a smoke run of the command."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import app

from experiments import against_adversarial_training as aat
from experiments import jobs

MNIST = os.path.join(os.path.dirname(jobs.CHECKOUT), "shared", "data", "mnist.npz")
SETTINGS = aat.Settings(data=(("data_npz", MNIST),))


def command(job: jobs.Job) -> str:
    return jobs.command_line(job.preset, job.overrides)


BASE = (
    "python -m train.main --preset=mnist_cnn --data_npz=../shared/data/mnist.npz "
    "--conv_channels=16,32 --dense_units=128"
)


def test_pgd_final_run_is_madrys_pgd_training_at_the_threat_epsilon():
    row = aat.parse_row("pgd_relu_eps0.3")
    (candidate,) = aat.candidates(row, SETTINGS.grids)
    job = aat.final_job(row, candidate, 1, SETTINGS)
    assert job.name == "final/pgd_relu_eps0.3/sigma0.3_ramp5_seed1"
    assert command(job) == (
        f"{BASE} --activation=relu --p=inf --method=adversarial --steps=10 --step_size=0.25 "
        "--random_start --clean_weight=0.0 --clip=0.0,1.0 --sigma=0.3 --sigma_warmup_epochs=5 "
        "--epochs=20 --seed=1 --eval_suite=standard --eval_examples=1000 "
        "--eval_epsilons_inf=0.3 --eval_epsilons_2= --nopictures"
    )
    assert aat.other_epsilons(row, SETTINGS) == (0.1, 0.4)


def test_selection_runs_hold_out_validation_and_never_attack_the_test_set():
    row = aat.parse_row("penalty_gelu_eps0.1")
    grid = aat.candidates(row, SETTINGS.grids)
    assert grid == [
        {"sigma": 0.05, "sigma_warmup_epochs": 5},
        {"sigma": 0.1, "sigma_warmup_epochs": 5},
        {"sigma": 0.2, "sigma_warmup_epochs": 5},
    ]
    job = aat.selection_job(row, grid[0], SETTINGS)
    assert job.name == "select/penalty_gelu_eps0.1/sigma0.05_ramp5"
    assert command(job) == (
        f"{BASE} --activation=gelu --p=inf --method=penalty --sigma=0.05 "
        "--sigma_warmup_epochs=5 --validation_split=0.16666666666666666 --epochs=20 --seed=0 "
        "--eval_suite=none --eval_examples=0 --nopictures"
    )


def test_plain_and_the_other_kinds_flags():
    plain = aat.parse_row("plain_relu")
    assert plain == aat.Row("plain", "relu", None)
    job = aat.final_job(plain, {}, 0, SETTINGS)
    assert job.name == "final/plain_relu/default_seed0"
    assert job.overrides["sigma"] == 0.0
    assert job.overrides["eval_epsilons_inf"] == (0.1, 0.3)  # Every training epsilon.
    assert aat.other_epsilons(plain, SETTINGS) == (0.4,)
    fgsm = aat.parse_row("fgsm_relu_eps0.3")
    assert aat.candidates(fgsm, SETTINGS.grids) == [
        {"sigma": 0.3, "step_size": 1.0, "sigma_warmup_epochs": 5},
        {"sigma": 0.3, "step_size": 1.25, "sigma_warmup_epochs": 5},
    ]
    assert aat.row_flags(fgsm, SETTINGS)["random_start"] is True
    trades = aat.candidates(aat.parse_row("trades_relu_eps0.3"), SETTINGS.grids)
    assert [c["beta"] for c in trades] == [1.0, 6.0]
    adversarial = aat.parse_row("adversarial_softplus_eps0.3")
    assert aat.row_flags(adversarial, SETTINGS)["random_start"] is False
    assert aat.slug(aat.candidates(adversarial, SETTINGS.grids)[1]) == "sigma0.15_cw0.5_ramp5"
    every = aat.candidates(aat.parse_row("every_relu_eps0.3"), SETTINGS.grids)
    assert [(c["method"], c["every"], c["sigma"]) for c in every] == [
        ("penalty", 2, 0.3),
        ("penalty", 2, 0.6),
        ("penalty", 4, 0.3),
        ("penalty", 4, 0.6),
    ]
    ramps = aat.Grids(ramp_epochs=(2, 5))
    assert len(aat.candidates(aat.parse_row("pgd_relu_eps0.3"), ramps)) == 2


def test_default_rows():
    names = [row.name for row in aat.default_rows(0.3, (0.1,), "gelu")]
    family = [
        f"{kind}_{act}_eps{eps}"
        for kind in ("penalty", "adversarial", "finite_difference", "every")
        for act in ("relu", "gelu")
        for eps in ("0.3",)
    ]
    assert names[:5] == [
        "plain_relu",
        "plain_gelu",
        "fgsm_relu_eps0.3",
        "pgd_relu_eps0.3",
        "trades_relu_eps0.3",
    ]
    assert names[5:13] == sorted(family, key=family.index)
    assert names[13] == "pgd_relu_eps0.1"
    assert len(names) == 22 and "trades_relu_eps0.1" not in names


@pytest.mark.parametrize("name", ["pgd_relu", "plain_relu_eps0.3", "sgd_relu_eps0.3", "pgd"])
def test_bad_row_names_are_refused(name):
    with pytest.raises(ValueError, match=f"Received: '{name}'"):
        aat.parse_row(name)


def test_plan_refuses_bad_settings_before_any_work(tmp_path):
    settings = aat.Settings(data=(("data_npz", MNIST),), grids=aat.Grids(penalty_sigmas=(-1.0,)))
    plan = aat.Plan([aat.parse_row("penalty_relu_eps0.3")], settings, (), str(tmp_path))
    with pytest.raises(app.UsageError, match="sigma"):
        aat.check_plan(plan)
    plan = aat.Plan([aat.parse_row("plain_relu")], SETTINGS, ("pgd_relu_eps0.3",), str(tmp_path))
    with pytest.raises(app.UsageError, match="pgd_relu_eps0.3"):
        aat.check_plan(plan)
    assert os.listdir(tmp_path) == []


def entry(error, robust):
    return {"validation_error_percent": error, "validation_robust_percent": robust}


def test_selection_rule():
    # Plain 1.0% -> limit 2.0%: the 2.5% setting is out despite its 90%.
    entries = [entry(1.5, 40.0), entry(2.5, 90.0), entry(2.0, 60.0), entry(1.8, 60.0)]
    assert aat.choose(entries, 1.0, 2.0) == {
        "index": 3,  # 60% twice: the lower error wins.
        "admissible": True,
        "error_limit_percent": 2.0,
    }
    assert aat.choose([entry(1.0, 5.0), entry(1.0, 5.0)], 1.0, 2.0)["index"] == 0
    assert aat.choose([entry(3.0, 50.0), entry(2.5, 10.0)], 1.0, 2.0) == {
        "index": 1,  # None within 2%: the lowest error, marked.
        "admissible": False,
        "error_limit_percent": 2.0,
    }


def test_selection_summary_and_the_auto_second_seed(tmp_path):
    rows = [aat.parse_row(n) for n in ("plain_relu", "penalty_relu_eps0.3", "fgsm_relu_eps0.3")]
    rows.append(aat.parse_row("pgd_relu_eps0.3"))
    plan = aat.Plan(rows, SETTINGS, None, str(tmp_path))
    summaries = {
        "select/plain_relu": {"row": "plain_relu", "entries": [entry(1.0, 0.0)]},
        "select/penalty_relu_eps0.3": {
            "row": "penalty_relu_eps0.3",
            "entries": [entry(1.2, 20.0), entry(1.9, 45.0), entry(2.1, 70.0)],
        },
        "select/fgsm_relu_eps0.3": {
            "row": "fgsm_relu_eps0.3",
            "entries": [entry(1.5, 44.0), entry(1.5, 80.0)],
        },
    }
    record = plan.selection(rows[1], summaries)
    assert (record["chosen"], record["admissible"], record["plain_row"]) == (1, True, "plain_relu")
    assert plan.chosen(rows[1], summaries) == {"sigma": 0.3, "sigma_warmup_epochs": 5}
    assert plan.best_single_step(summaries) == rows[2]
    tasks, summarize = plan.tasks()
    stages = [t.stage for t in tasks]
    assert stages == [
        "select/plain_relu",
        "select/penalty_relu_eps0.3",
        "select/penalty_relu_eps0.3",
        "select/penalty_relu_eps0.3",
        "select/fgsm_relu_eps0.3",
        "select/fgsm_relu_eps0.3",
        "final/plain_relu/seed0",
        "final/penalty_relu_eps0.3/seed0",
        "final/fgsm_relu_eps0.3/seed0",
        "final/pgd_relu_eps0.3/seed0",
        "final/pgd_relu_eps0.3/seed1",
        "final/auto_single_step/seed1",
    ]
    assert tasks[-1].needs == ("select/penalty_relu_eps0.3", "select/plain_relu",
                               "select/fgsm_relu_eps0.3")  # fmt: skip
    assert tasks[-3].needs == ()  # PGD-AT: one setting, no validation run.
    job = tasks[-1].make(summaries)
    assert job.name == "final/fgsm_relu_eps0.3/sigma0.3_step1.25_ramp5_seed1"
    assert set(summarize) == {t.stage for t in tasks}


def test_selection_only_plans_the_selection_runs_and_logs_each_choice(tmp_path):
    """--selection_only: the selection runs' tasks and nothing after them; one line per row."""
    rows = [aat.parse_row(n) for n in ("penalty_gelu_eps0.1", "pgd_relu_eps0.1")]
    plan = aat.Plan(rows, SETTINGS, None, str(tmp_path), selection_only=True)
    tasks, summarize = plan.tasks()
    assert [t.stage for t in tasks] == ["select/plain_gelu"] + ["select/penalty_gelu_eps0.1"] * 3
    assert set(summarize) == {"select/plain_gelu", "select/penalty_gelu_eps0.1"}
    sigmas = [0.05, 0.1, 0.2]  # --penalty_sigmas 0.5, 1, 2 times epsilon 0.1.
    summaries = {
        "select/plain_gelu": {"row": "plain_gelu", "entries": [entry(1.0, 0.0)]},
        "select/penalty_gelu_eps0.1": {
            "row": "penalty_gelu_eps0.1",
            "entries": [
                {**entry(e, r), "setting": {"sigma": s, "sigma_warmup_epochs": 5}}
                for e, r, s in zip((1.2, 1.6, 2.4), (79.6, 83.4, 84.6), sigmas)
            ],
        },
    }
    assert aat.selection_line(plan.selection(rows[0], summaries)) == (
        "penalty_gelu_eps0.1 at 0.1: sigma=0.05, ramp=5: error 1.20%, robust 79.6%; "
        "sigma=0.1, ramp=5: error 1.60%, robust 83.4%; "
        "sigma=0.2, ramp=5: error 2.40%, robust 84.6%; "
        "chosen: sigma=0.1, ramp=5"
    )  # 2.4% is over twice plain's 1.0%.


def test_a_selection_recorded_in_the_results_is_used_instead_of_run_again(tmp_path):
    """A row whose selection the results hold (same grid, epochs, epsilon) runs none, and
    its final run takes the recorded choice; nor does the plain row it alone needed. A
    record of another grid, other epochs or another epsilon is not used."""
    rows = [aat.parse_row(n) for n in ("penalty_gelu_eps0.1", "fgsm_relu_eps0.3")]
    grid = [{"sigma": s, "sigma_warmup_epochs": 5} for s in (0.05, 0.1, 0.2)]
    recorded = {
        "row": "penalty_gelu_eps0.1", "epsilon": 0.1, "epochs": SETTINGS.selection_epochs,
        "entries": [{**entry(1.0, 80.0), "setting": setting} for setting in grid],
        "chosen": 2, "admissible": True, "error_limit_percent": 2.0, "plain_row": "plain_gelu",
    }  # fmt: skip
    earlier = {"selections": {"penalty_gelu_eps0.1": recorded}}
    found = aat.recorded_selections(earlier, rows, SETTINGS)
    assert found == {"penalty_gelu_eps0.1": recorded}
    plan = aat.Plan(rows, SETTINGS, (), str(tmp_path), recorded=found)
    tasks, _ = plan.tasks()
    assert [t.stage for t in tasks] == [
        "select/plain_relu", "select/fgsm_relu_eps0.3", "select/fgsm_relu_eps0.3",
        "final/penalty_gelu_eps0.1/seed0", "final/fgsm_relu_eps0.3/seed0",
    ]  # fmt: skip
    assert tasks[3].needs == ()
    assert tasks[3].make({}).name == "final/penalty_gelu_eps0.1/sigma0.2_ramp5_seed0"
    assert plan.selection(rows[0], {}) is recorded
    for changed in ({"epochs": 3}, {"epsilon": 0.3}, {"entries": recorded["entries"][:2]}):
        other = {"selections": {"penalty_gelu_eps0.1": {**recorded, **changed}}}
        assert aat.recorded_selections(other, rows, SETTINGS) == {}, changed
    assert aat.recorded_selections(None, rows, SETTINGS) == {}
    # A recorded plain row is read (in the rows or not) and gives fgsm its error limit:
    # 1.0% x 2; fgsm's 2.5% setting is then out, whatever a new plain run would give.
    plain = {**recorded, "row": "plain_relu", "epsilon": 0.3, "chosen": 0, "plain_row": None,
             "entries": [{**entry(1.0, 0.0), "setting": {}}]}  # fmt: skip
    earlier["selections"]["plain_relu"] = plain
    found = aat.recorded_selections(earlier, rows, SETTINGS)
    assert set(found) == {"plain_relu", "penalty_gelu_eps0.1"}
    plan = aat.Plan(rows, SETTINGS, (), str(tmp_path), recorded=found)
    tasks, _ = plan.tasks()
    assert [t.stage for t in tasks][:2] == ["select/fgsm_relu_eps0.3"] * 2
    assert tasks[-1].needs == ("select/fgsm_relu_eps0.3",)
    fgsm = {"row": "fgsm_relu_eps0.3", "entries": [entry(1.5, 40.0), entry(2.5, 90.0)]}
    record = plan.selection(rows[1], {"select/fgsm_relu_eps0.3": fgsm})
    assert (record["chosen"], record["error_limit_percent"]) == (0, 2.0)


def record(name, kind, eps, seed, error, robust, examples, seconds, flags=None, act="relu"):
    return {
        "name": name,
        "kind": kind,
        "label": aat.KINDS[kind].label,
        "activation": act,
        "train_epsilon": eps,
        "family": aat.KINDS[kind].family,
        "single_step": aat.KINDS[kind].single_step,
        "seed": seed,
        "setting": {} if kind == "plain" else {"sigma": eps, "sigma_warmup_epochs": 5},
        "test_error_percent": error,
        "robust_percent": robust,
        "robust_examples": examples,
        "train_seconds": seconds,
        "load_average": {"during_mean": 2.25, "during_max": 3.0},
        "flags": flags or {},
    }


EX = {"0.3": 1000, "0.4": 250}
MASKING = {"gradient_masking (training epsilon)": "Square broke 1%"}
ROWS = [
    record("plain_relu", "plain", None, 0, 0.9, {"0.3": 0.0, "0.4": 0.0}, EX, 60),
    record("pgd_relu_eps0.3", "pgd", 0.3, 0, 1.5, {"0.3": 88.0, "0.4": 20.0}, EX, 1200, MASKING),
    record("pgd_relu_eps0.3", "pgd", 0.3, 1, 1.7, {"0.3": 86.0, "0.4": 22.0}, EX, 1260),
    record("penalty_gelu_eps0.3", "penalty", 0.3, 0, 1.2, {"0.3": 84.5, "0.4": 10.0}, EX, 300,
           act="gelu"),
    record("fgsm_relu_eps0.3", "fgsm", 0.3, 0, 1.1, {"0.3": 90.0, "0.4": 5.0}, EX, 450),
]  # fmt: skip


def score_interval(correct, count, z=1.959963984540054):
    """The accuracies p0 that a two-sided 95% score test does not reject, found by bisection:
    |correct / count - p0| <= z sqrt(p0 (1 - p0) / count) (Wilson's definition), in %."""
    share = correct / count

    def bound(low, high, inside_is_high):
        for _ in range(200):
            middle = (low + high) / 2
            inside = abs(share - middle) <= z * math.sqrt(middle * (1 - middle) / count)
            low, high = (low, middle) if inside == inside_is_high else (middle, high)
        return 100 * (low + high) / 2

    return bound(0.0, share, True), bound(share, 1.0, False)


def test_wilson_interval_is_where_the_score_test_does_not_reject():
    for correct, count in [(889, 1000), (750, 1000), (1, 250), (249, 250), (120, 250)]:
        np.testing.assert_allclose(
            aat.wilson_interval(correct, count), score_interval(correct, count), atol=1e-9
        )
    low, high = aat.wilson_interval(0, 1000)
    assert abs(low) < 1e-12 and 0.38 < high < 0.39  # 0 of 1000: z^2 / (n + z^2).


def with_ratios(rows):
    """ROWS with their time ratios; the penalty's sitting had a plain gelu row of 60 s."""
    rows = [dict(r) for r in rows]
    aat.add_time_ratios(rows)
    rows[3]["time_vs_plain"] = 5.0
    return rows


def test_targets_are_computed_from_the_rows():
    (target,) = aat.targets(with_ratios(ROWS))
    assert target["pgd_robust_percent"] == 87.0  # Mean of the two seeds.
    assert target["pgd_train_seconds"] == 1230.0 and target["pgd_time_vs_plain"] == 20.5
    # The two seeds attack the same 1000 images: the mean, 870 of 1000 (not 1740 of 2000).
    np.testing.assert_allclose(target.pop("pgd_robust_ci95"), score_interval(870, 1000))
    # fgsm (7.5x plain) is over 1/3 of PGD-AT's 20.5x; the penalty (5x) is within.
    best = target["best_single_step"]
    np.testing.assert_allclose(best.pop("robust_ci95"), score_interval(845, 1000))
    assert best == {
        "row": "penalty_gelu_eps0.3",
        "robust_percent": 84.5,
        "time_vs_pgd": 5.0 / 20.5,
        "points_below_pgd": 2.5,
        "met": True,
    }


def test_targets_compare_times_over_each_rows_own_plain_row():
    """Wall times of two sittings may come from two machines; each row's time over its
    own sitting's plain row compares. fgsm took 450 s, over 1/3 of PGD-AT's 1230 s, but
    on a slower machine: 2x plain against PGD-AT's 20.5x (mean of 20x and 21x), 0.098,
    within 1/3, and 90% beats the penalty's 84.5% (5x: 0.24)."""
    rows = [dict(r, time_vs_plain=20.0 + r["seed"]) for r in ROWS[1:3]]
    rows += [dict(ROWS[3], time_vs_plain=5.0), dict(ROWS[4], time_vs_plain=2.0)]
    assert aat.time_versus(rows, "penalty_gelu_eps0.3", "pgd_relu_eps0.3") == 5.0 / 20.5
    (target,) = aat.targets(rows)
    assert target["pgd_time_vs_plain"] == 20.5
    best = target["best_single_step"]
    assert best["row"] == "fgsm_relu_eps0.3" and best["time_vs_pgd"] == 2.0 / 20.5
    assert best["points_below_pgd"] == -3.0 and best["met"] is True
    rows[3]["time_vs_plain"] = None  # No plain row in fgsm's sitting: not scored.
    assert aat.time_versus(rows, "fgsm_relu_eps0.3", "pgd_relu_eps0.3") is None
    assert aat.targets(rows)[0]["best_single_step"]["row"] == "penalty_gelu_eps0.3"
    assert aat.time_versus(rows, "no_such_row", "pgd_relu_eps0.3") is None


def test_markdown_from_a_results_fixture():
    rows = [dict(r) for r in ROWS]
    aat.add_time_ratios(rows)
    assert [r["time_vs_plain"] for r in rows] == [1.0, 20.0, 21.0, None, 7.5]  # No plain gelu.
    rows = with_ratios(ROWS)
    results = {
        "hardware": "cpu, 2 cores",
        "cpu_count": 2,
        "selection_rule": "rule",
        "settings": {
            "data": "../shared/data/mnist.npz (sha256 abc)",
            "conv_channels": [16, 32],
            "dense_units": 128,
            "epochs": 20,
            "ramp_epochs": [5],
            "report_epsilons": [0.3, 0.4],
            "primary_examples": 1000,
            "other_examples": 250,
        },
        "rows": rows,
        "targets": aat.targets(rows),
        "selections": {
            "penalty_gelu_eps0.3": {
                "epsilon": 0.3,
                "chosen": 1,
                "admissible": False,
                "entries": [
                    {"setting": {"sigma": 0.15}, "train_seconds": 120.0, **entry(2.5, 30.0)},
                    {"setting": {"sigma": 0.3}, "train_seconds": 126.0, **entry(2.2, 50.25)},
                ],
            }
        },
    }
    lines = aat.markdown(results).splitlines()
    assert lines[3] == (
        "| row | trained at | setting | seed | test error % | robust % at 0.3 | robust % at 0.4 "
        "| training time | x plain | load | flags |"
    )
    assert lines[5] == (
        "| plain, relu | - | - | 0 | 0.90 | 0.0 (1000) | 0.0 (250) | 1.0 min | 1.0x "
        "| 2.2 (max 3.0) | none |"
    )
    assert lines[6] == (
        "| PGD-AT (10 steps of 0.25 eps), relu | 0.3 | sigma=0.3, ramp=5 | 0 | 1.50 | 88.0 (1000) "
        "| 20.0 (250) | 20.0 min | 20.0x | 2.2 (max 3.0) | gradient_masking (training epsilon) |"
    )
    assert lines[8].startswith("| penalty (exact), gelu | 0.3 | sigma=0.3, ramp=5 | 0 | 1.20 |")
    assert "| 5.0 min | 5.0x |" in lines[8]
    pgd_low, pgd_high = score_interval(870, 1000)
    low, high = score_interval(845, 1000)
    assert lines[13] == (
        f"- L-inf 0.3: PGD-AT 87.0% ({pgd_low:.1f}-{pgd_high:.1f}); best single-step row "
        f"within 1/3 of its time: penalty_gelu_eps0.3, 84.5% ({low:.1f}-{high:.1f}) at 0.24x "
        "PGD-AT's time (each over its sitting's plain row), 2.5 points below: met."
    )
    assert lines[0].endswith("epochs), hardware: cpu, 2 cores.")  # Rows without their own.
    assert "the run's training epochs on its machine" in lines[1]
    rows[0]["hardware"] = rows[2]["hardware"] = "AMD, 2 cores"
    assert aat.hardware_text(results) == (
        "AMD, 2 cores (plain_relu, pgd_relu_eps0.3); "
        "not recorded (pgd_relu_eps0.3, penalty_gelu_eps0.3, fgsm_relu_eps0.3)"
    )
    assert lines[-2:] == [
        "| penalty_gelu_eps0.3 | 0.3 | sigma=0.15 | 2.50 | 30.0 | 2.0 min |  |",
        "| penalty_gelu_eps0.3 | 0.3 | sigma=0.3 | 2.20 | 50.2 | 2.1 min "
        "| yes (none within the error limit) |",
    ]


def test_worst_case_reads_a_report_dict():
    report = {
        "rows": [
            {"attack": "apgd-ce", "p": "inf", "epsilon": 0.3, "accuracy": 0.5},
            {"attack": "worst_case", "p": "inf", "epsilon": 0.3, "accuracy": 0.25},
            {"attack": "worst_case", "p": 2, "epsilon": 0.3, "accuracy": 0.75},
        ]
    }
    assert aat.worst_case(report, 0.3) == 25.0
    assert aat.worst_case(report, 0.1) is None
    assert aat.worst_case(None, 0.3) is None


def test_cached_report_recomputes_only_for_other_settings(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"n": len(calls)}

    assert aat.cached_report(str(tmp_path), "r.json", {"a": 1}, compute) == {"n": 1}
    assert aat.cached_report(str(tmp_path), "r.json", {"a": 1}, compute) == {"n": 1}
    assert aat.cached_report(str(tmp_path), "r.json", {"a": 2}, compute) == {"n": 2}


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(MNIST), reason="no shared/data/mnist.npz")
def test_smoke_run_writes_the_documented_results(tmp_path):
    """Smoke test: two rows (plain and the penalty with two sigmas to choose from), one epoch
    on 600 MNIST training images (500 train, 100 validation), 200 test images, tiny
    evaluations, subprocess runs; checks the JSON's documented fields and that the numbers are
    finite and in range (not their values). Run again, it trains nothing."""
    import numpy as np

    with np.load(MNIST) as mnist:
        small = {k: mnist[k][: 600 if "train" in k else 200] for k in mnist.files}
    np.savez(tmp_path / "small.npz", **small)
    arguments = [
        sys.executable, "-m", "experiments.against_adversarial_training",
        f"--data_npz={tmp_path / 'small.npz'}", f"--workdir={tmp_path / 'runs'}",
        f"--results_dir={tmp_path / 'results'}", f"--results_page={tmp_path / 'page.md'}",
        "--experiment_rows=plain_relu,penalty_relu_eps0.3", "--penalty_sigmas=0.5,1",
        "--training_epochs=1", "--eval_examples=20",
        "--other_eval_examples=10", "--validation_eval_examples=20", "--validation_apgd_steps=5",
        "--eval_apgd_steps=5", "--eval_square_queries=20", "--seeds=0", "--two_seed_rows=",
        "--parallel=2", "--load_interval=2",
    ]  # fmt: skip
    (tmp_path / "page.md").write_text(f"intro\n{aat.PAGE_START}\nold\n{aat.PAGE_END}\noutro\n")
    subprocess.run(arguments, cwd=jobs.CHECKOUT, check=True, capture_output=True)
    with open(tmp_path / "results" / f"{aat.NAME}.json") as f:
        results = json.load(f)
    assert (tmp_path / "results" / f"{aat.NAME}.png").stat().st_size > 0
    with open(tmp_path / "results" / f"{aat.NAME}.md") as f:
        assert f.read() == aat.markdown(results)
    assert (tmp_path / "page.md").read_text() == (
        f"intro\n{aat.PAGE_START}\n{aat.markdown(results)}{aat.PAGE_END}\noutro\n"
    )
    assert set(results) == {
        "experiment", "hardware", "cpu_count", "python", "selection_rule", "settings", "rows",
        "targets", "selections",
    }  # fmt: skip
    assert results["settings"]["epochs"] == 1 and results["settings"]["steps_per_epoch"] == 0
    assert results["settings"]["validation"]["examples"] == 20
    assert [r["name"] for r in results["rows"]] == ["plain_relu", "penalty_relu_eps0.3"]
    for row in results["rows"]:
        assert row["epochs"] == 1
        assert 0.0 <= row["test_error_percent"] <= 100.0
        assert sorted(row["robust_percent"]) == ["0.1", "0.3", "0.4"]
        assert all(0.0 <= v <= 100.0 for v in row["robust_percent"].values())
        assert row["robust_examples"]["0.3"] == 20 and row["robust_examples"]["0.4"] == 10
        assert math.isfinite(row["train_seconds"]) and row["train_seconds"] > 0
        assert row["load_average"]["sittings"] == 1 and row["load_average"]["samples"] >= 1
        assert isinstance(row["flags"], dict)
        assert row["command"].startswith("python -m train.main --preset=mnist_cnn")
    assert results["rows"][1]["robust_examples"]["0.1"] == 10
    assert results["rows"][0]["robust_examples"]["0.1"] == 20  # Plain: every training eps.
    assert results["rows"][1]["time_vs_plain"] > 0
    selection = results["selections"]["penalty_relu_eps0.3"]
    assert [e["setting"]["sigma"] for e in selection["entries"]] == [0.15, 0.3]
    assert selection["chosen"] in (0, 1) and selection["plain_row"] == "plain_relu"
    for e in selection["entries"] + results["selections"]["plain_relu"]["entries"]:
        assert 0.0 <= e["validation_error_percent"] <= 100.0
        assert 0.0 <= e["validation_robust_percent"] <= 100.0
    assert results["rows"][1]["setting"] == selection["entries"][selection["chosen"]]["setting"]
    # Everything is read back, nothing trained again.
    before = os.path.getmtime(
        tmp_path / "runs" / "final" / "plain_relu" / "default_seed0" / "metrics.json"
    )
    again = subprocess.run(arguments, cwd=jobs.CHECKOUT, check=True, capture_output=True, text=True)
    assert ": training" not in again.stderr
    # The selections are read from the results it wrote (plain and penalty), the final
    # runs from the workdir.
    assert again.stderr.count("Read from the results (--reselect runs it)") == 2
    assert again.stderr.count("finished earlier, reading it") == 2
    after = os.path.getmtime(
        tmp_path / "runs" / "final" / "plain_relu" / "default_seed0" / "metrics.json"
    )
    assert before == after
    # --selection_only with no results to add to writes none (no empty table on the page).
    empty = tmp_path / "empty"
    selection_only = [
        *(a for a in arguments if not a.startswith("--results_dir=")),
        f"--results_dir={empty}", "--selection_only",
    ]  # fmt: skip
    alone = subprocess.run(
        selection_only, cwd=jobs.CHECKOUT, check=True, capture_output=True, text=True
    )
    assert "none written" in alone.stderr and not empty.exists()
    assert (tmp_path / "page.md").read_text().count("| plain, relu |") == 1


def test_earlier_rows_are_kept_and_replaced_by_this_runs(tmp_path):
    settings = {"epochs": 20, "seeds": [0], "grids": {"ramp_epochs": [5]}}
    earlier = {
        "settings": settings,
        "rows": [
            {"name": "pgd_relu_eps0.3", "seed": 0, "setting": {"sigma": 0.3}},
            {"name": "plain_relu", "seed": 0, "setting": {}},
        ],
        "selections": {"plain_relu": {"old": True}, "fgsm_relu_eps0.3": {"old": True}},
    }
    path = tmp_path / "aat.json"
    path.write_text(json.dumps(earlier))
    assert aat.earlier_results(str(tmp_path / "missing.json"), settings) is None
    as_tuples = {**settings, "grids": {"ramp_epochs": (5,)}}  # As settings_record gives them.
    assert aat.earlier_results(str(path), as_tuples) == earlier
    loaded = aat.earlier_results(str(path), {**settings, "seeds": [1]})  # Seeds may differ.
    now = [
        {"name": "plain_relu", "seed": 0, "setting": {}, "new": True},
        {"name": "plain_relu", "seed": 1, "setting": {}},
    ]
    merged_settings = {**settings, "seeds": [1]}
    records, selections = aat.with_earlier_rows(
        loaded, merged_settings, now, {"plain_relu": {"new": True}}
    )
    assert sorted((r["name"], r["seed"], r.get("new")) for r in records) == [
        ("pgd_relu_eps0.3", 0, None), ("plain_relu", 0, True), ("plain_relu", 1, None),
    ]  # fmt: skip
    assert selections == {"plain_relu": {"new": True}, "fgsm_relu_eps0.3": {"old": True}}
    assert merged_settings["seeds"] == [0, 1]
    # Kept rows keep their hardware; rows without (written before rows had it) get none.
    loaded["hardware"] = "Intel"
    loaded["rows"].append({"name": "fgsm_relu_eps0.3", "seed": 0, "setting": {}, "hardware": "AMD"})
    records, _ = aat.with_earlier_rows(loaded, {**settings}, now, {})
    assert {r["name"]: r.get("hardware") for r in records if r["seed"] == 0} == {
        "pgd_relu_eps0.3": None, "fgsm_relu_eps0.3": "AMD", "plain_relu": None,
    }  # fmt: skip
    # Other settings are refused before any run, naming the way out.
    with pytest.raises(app.UsageError, match=r"other settings \(epochs\).*Received: epochs=5"):
        aat.earlier_results(str(path), {**settings, "epochs": 5})
    other_setting = [{"name": "pgd_relu_eps0.3", "seed": 1, "setting": {"sigma": 0.2}}]
    with pytest.raises(app.UsageError, match=r"pgd_relu_eps0.3 \(seed 0\).*another setting"):
        aat.with_earlier_rows(loaded, {**settings}, other_setting, {})


def test_a_sitting_closed_late_keeps_the_runs_end_and_the_logged_load(tmp_path):
    """A command stopped after a run finished closes its sitting on the next call with
    the run's own end (metrics.json written "done") and the load logged meanwhile by
    the first command's sampler, not the second command's time and samples."""
    root, name = str(tmp_path), "final/row/seed0"
    log = os.path.join(root, aat.LOAD_LOG)
    aat.record_start(root, name)
    timing = aat._read_json(aat._timing_path(root, name), {})
    start = timing["sittings"][0]["start"] = timing["sittings"][0]["start"] - 100
    with open(aat._timing_path(root, name), "w") as f:
        json.dump(timing, f)
    with open(log, "w") as f:  # What the first command's sampler logged.
        for t, load in [(start - 5, 9.0), (start + 1, 2.0), (start + 3, 4.0), (start + 11, 7.0)]:
            f.write(json.dumps([t, load]) + "\n")
    os.makedirs(os.path.join(root, name))
    metrics = os.path.join(root, name, jobs.METRICS_FILE)
    with open(metrics, "w") as f:
        json.dump({"status": "done"}, f)
    os.utime(metrics, (start + 10, start + 10))  # The run ended 10 s after its start.
    aat.record_end(root, name, aat.LoadSampler(interval=1.0, log_path=log))  # Not started.
    sitting = aat._read_json(aat._timing_path(root, name), {})["sittings"][0]
    assert sitting["end"] == start + 10
    assert sitting["load_samples"] == [2.0, 4.0]
    assert sitting["load_after"] == [7.0]  # The sample logged just after the end.
    summary = aat.load_summary(root, name)
    assert summary["during_mean"] == 3.0 and summary["during_max"] == 4.0
    assert summary["samples"] == 2 and summary["sittings"] == 1
    aat.record_end(root, name, aat.LoadSampler(interval=1.0, log_path=log))
    assert aat._read_json(aat._timing_path(root, name), {})["sittings"] == [sitting]  # Closed.
    # No sample near the end (the log began later): no load after it is claimed.
    other = "final/other/seed0"
    aat.record_start(root, other)
    timing = aat._read_json(aat._timing_path(root, other), {})
    timing["sittings"][0]["start"] = start - 300
    with open(aat._timing_path(root, other), "w") as f:
        json.dump(timing, f)
    os.makedirs(os.path.join(root, other))
    with open(os.path.join(root, other, jobs.METRICS_FILE), "w") as f:
        json.dump({"status": "done"}, f)
    os.utime(os.path.join(root, other, jobs.METRICS_FILE), (start - 200, start - 200))
    aat.record_end(root, other, aat.LoadSampler(interval=1.0, log_path=log))
    closed = aat._read_json(aat._timing_path(root, other), {})["sittings"][0]
    assert closed["end"] == start - 200 and closed["load_samples"] == []
    assert "load_after" not in closed


def test_a_sitting_stopped_mid_run_is_closed_when_the_next_one_starts(tmp_path):
    """A command stopped during a run leaves its sitting open; the next sitting's start closes
    it at the run's last metrics (its last finished epoch) with the samples logged until
    then, skipping a log line cut short."""
    root, name = str(tmp_path), "final/row/seed0"
    log = os.path.join(root, aat.LOAD_LOG)
    sampler = aat.LoadSampler(interval=1.0, log_path=log)
    aat.record_start(root, name, sampler)
    path = aat._timing_path(root, name)
    timing = aat._read_json(path, {})
    start = timing["sittings"][0]["start"] = timing["sittings"][0]["start"] - 100
    with open(path, "w") as f:
        json.dump(timing, f)
    with open(log, "w") as f:
        f.write("".join(json.dumps([start + t, load]) + "\n" for t, load in [(2, 3.0), (4, 5.0)]))
        f.write(json.dumps([start + 30, 8.0]) + "\n" + "[%r, 1." % (start + 6))  # Cut short.
    os.makedirs(os.path.join(root, name))
    metrics = os.path.join(root, name, jobs.METRICS_FILE)
    with open(metrics, "w") as f:
        json.dump({"status": "running"}, f)
    os.utime(metrics, (start + 20, start + 20))  # The last epoch ended 20 s in.
    aat.record_start(root, name, sampler)  # The next sitting.
    first, second = aat._read_json(path, {})["sittings"]
    assert first["end"] == start + 20 and first["load_samples"] == [3.0, 5.0]
    assert "end" not in second and second["start"] > start + 20
    # A sitting that wrote no metrics ends where it started: it trained nothing.
    other = "final/other/seed0"
    aat.record_start(root, other, sampler)
    timing = aat._read_json(aat._timing_path(root, other), {})
    timing["sittings"][0]["start"] = start
    with open(aat._timing_path(root, other), "w") as f:
        json.dump(timing, f)
    aat.record_start(root, other, sampler)
    closed = aat._read_json(aat._timing_path(root, other), {})["sittings"][0]
    assert closed["end"] == start and closed["load_samples"] == []


def test_results_page_and_results_hold_what_the_generator_writes():
    """The published table (docs/results.md between its markers, and
    results/against_adversarial_training.md) is markdown(results/...json)."""
    with open(os.path.join(jobs.CHECKOUT, "results", f"{aat.NAME}.json")) as f:
        text = aat.markdown(json.load(f))
    with open(os.path.join(jobs.CHECKOUT, "docs", "results.md")) as f:
        page = f.read()
    assert page.split(aat.PAGE_START + "\n")[1].split(aat.PAGE_END)[0] == text
    with open(os.path.join(jobs.CHECKOUT, "results", f"{aat.NAME}.md")) as f:
        assert f.read() == text


@pytest.mark.slow  # A subprocess.
def test_render_writes_the_markdown_from_the_json_alone(tmp_path):
    """`--render` reads --results_dir's JSON and writes the .md and the page's table; it
    needs no --workdir and runs nothing."""
    results = tmp_path / "results"
    results.mkdir()
    source = os.path.join(jobs.CHECKOUT, "results", f"{aat.NAME}.json")
    (results / f"{aat.NAME}.json").write_bytes(open(source, "rb").read())
    page = tmp_path / "page.md"
    page.write_text(f"a\n{aat.PAGE_START}\nold\n{aat.PAGE_END}\nb\n")
    arguments = [
        sys.executable, "-m", "experiments.against_adversarial_training", "--render",
        f"--results_dir={results}", f"--results_page={page}",
    ]  # fmt: skip
    subprocess.run(arguments, cwd=jobs.CHECKOUT, check=True, capture_output=True)
    with open(source) as f:
        text = aat.markdown(json.load(f))
    assert (results / f"{aat.NAME}.md").read_text() == text
    assert page.read_text() == f"a\n{aat.PAGE_START}\n{text}{aat.PAGE_END}\nb\n"
