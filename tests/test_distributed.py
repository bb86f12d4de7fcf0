"""XLA under tf.distribute: 1 vs 2 replicas, steps_per_execution.

Logical devices must be configured before TensorFlow runs anything, so every
case runs in a subprocess (tests/distributed_cases.py). `every`, `fraction`
and schedules on 2 replicas: tests/test_distributed_lazy.py (a module of its
own, so that pytest-xdist can run the two subprocesses on two workers); two
workers against one process: tests/test_multi_worker_methods.py.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from cluster import assert_same_weights, run_case

METHODS = ("penalty", "adversarial", "finite_difference")
# With the multi-step members (random starts keyed by global position).
MIRRORED_METHODS = (*METHODS, "pgd", "trades")
# Every test runs subprocesses (the fixtures build all cases at once): slow.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    """Results of every method on 1 device and on 2 replicas, and XLA's dump."""
    tmp = tmp_path_factory.mktemp("mirrored")
    dump = tmp / "xla_dump"
    run_case(
        "mirrored",
        str(tmp / "results.json"),
        extra_env={"XLA_FLAGS": f"--xla_dump_to={dump}"},
        timeout=1200,
    )
    results = json.loads((tmp / "results.json").read_text())
    modules = {name.split(".")[1] for name in os.listdir(dump) if name.startswith("module_")}
    return results, modules


@pytest.mark.parametrize("method", MIRRORED_METHODS)
def test_two_replicas_with_xla_match_one_device(mirrored, method):
    results, _ = mirrored
    one, two = results[f"{method}/one_device"], results[f"{method}/two_replicas"]
    assert (two["num_replicas"], two["jit_compile"]) == (2, True)
    assert_same_weights(one["weights"], two["weights"])
    # The finite difference (L(x + h d) - L(x)) / h multiplies float32 rounding
    # of the replicas' partial sums by sigma / h = 50: its log gets 1e-4. So
    # does TRADES's KL of about 0.01, a difference of O(1) float32 logarithms.
    rtol = 1e-4 if method in ("finite_difference", "trades") else 1e-5
    for key in ("loss", "data_loss", "penalty"):
        np.testing.assert_allclose(two["logs"][key], one["logs"][key], rtol=rtol, err_msg=key)


@pytest.mark.parametrize("method", MIRRORED_METHODS)
def test_steps_per_execution_under_a_strategy(mirrored, method):
    """steps_per_execution=3 under MirroredStrategy (broken in stock Keras 3.15)."""
    results, _ = mirrored
    assert_same_weights(
        results[f"{method}/one_device"]["weights"],
        results[f"{method}/two_replicas_spe3"]["weights"],
    )


@pytest.mark.parametrize("method", MIRRORED_METHODS)
def test_evaluate_on_two_replicas_matches_one_device(mirrored, method):
    results, _ = mirrored
    one = results[f"{method}/one_device"]["evaluation"]
    for name in ("two_replicas", "two_replicas_spe3"):
        two = results[f"{method}/{name}"]["evaluation"]
        assert set(two) == {"loss", "accuracy"}
        np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-5)
        # The same count of correct examples; the cross-replica mean rounds differently.
        np.testing.assert_allclose(two["accuracy"], one["accuracy"], rtol=1e-6)


@pytest.mark.parametrize("method", MIRRORED_METHODS)
def test_custom_loop_on_two_replicas_matches_fit_on_one_device(mirrored, method):
    """kgr.regularized_loss under strategy.run: the same weights as fit on one device."""
    results, _ = mirrored
    assert_same_weights(
        results[f"{method}/one_device"]["weights"],
        results[f"{method}/custom_loop_two_replicas"]["weights"],
    )


def test_each_replica_step_is_compiled_by_xla(mirrored):
    """XLA's own dump names the per-replica steps; the distributed loop is not compiled."""
    _, modules = mirrored
    assert any("regularized_step" in name for name in modules), sorted(modules)
    assert any("inference_forward" in name for name in modules), sorted(modules)
    assert not any("multi_step_on_iterator" in name for name in modules), sorted(modules)
