"""`every`, `fraction` and a sigma schedule under XLA: 1 vs 2 replicas.

Logical devices must be configured before TensorFlow runs anything, so the
case runs in a subprocess (tests/distributed_cases.py, "lazy").
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from cluster import assert_same_weights, run_case

METHODS = ("penalty", "adversarial", "finite_difference")
# Every test uses the subprocess's results: slow.
pytestmark = pytest.mark.slow

# The finite difference multiplies float32 rounding of the replicas' partial
# sums by every * sigma / h (up to 2 * 0.8 / 0.01 = 160 in the lazy cases).
LAZY_ATOL = {"penalty": 1e-6, "adversarial": 1e-6, "finite_difference": 1e-5}


@pytest.fixture(scope="module")
def lazy(tmp_path_factory):
    """every=2 and fraction=0.5 with a sigma schedule, on 1 device and 2 replicas (XLA)."""
    tmp = tmp_path_factory.mktemp("lazy")
    run_case("lazy", str(tmp / "results.json"))
    return json.loads((tmp / "results.json").read_text())


@pytest.mark.parametrize("method", METHODS)
def test_every_and_a_schedule_on_two_replicas_match_one_device(lazy, method):
    """every=2, sigma changed each epoch, sample weights: 2 replicas (and spe=3) == 1 device.

    The step counter is the optimizer's `iterations`, the same on every
    replica; the traced step is not traced again after the first epoch
    (the first call may trace twice: TensorFlow retraces once after the
    optimizer creates its momentum variables).
    """
    one = lazy[f"{method}/every/one_device"]
    rtol = 1e-4 if method == "finite_difference" else 1e-5
    for name in ("two_replicas", "two_replicas_spe3"):
        two = lazy[f"{method}/every/{name}"]
        assert two["num_replicas"] == 2
        assert_same_weights(one["weights"], two["weights"], LAZY_ATOL[method])
        for key in ("loss", "data_loss", "penalty", "sigma"):
            np.testing.assert_allclose(two["logs"][key], one["logs"][key], rtol=rtol, err_msg=key)
    for result in (
        one,
        lazy[f"{method}/every/two_replicas"],
        lazy[f"{method}/fraction/two_replicas"],
    ):
        assert result["traces"] == result["traces_after_first_epoch"]
    assert one["logs"]["sigma"] == [0.5, 0.2, 0.8]


@pytest.mark.parametrize("method", METHODS)
def test_subsets_on_two_replicas_are_each_replicas_rows(lazy, method):
    """fraction=0.5 on 2 replicas: the weights of the one-device computation of the same terms.

    Each replica draws ceil(0.5 * 8) rows of its local batch from the same
    seed; its term, reduced over its rows with their sample weights and
    divided by the replicas, sums to the term on the union of the rows
    (tests/distributed_cases.py, `subset_reference`).
    """
    result = lazy[f"{method}/fraction/two_replicas"]
    assert_same_weights(result["weights"], result["reference"], LAZY_ATOL[method])
    every_only = lazy[f"{method}/every/two_replicas"]["weights"]
    assert (
        max(np.abs(np.array(a) - np.array(b)).max() for a, b in zip(result["weights"], every_only))
        > 1e-3
    )
