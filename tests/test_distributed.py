"""XLA under tf.distribute: 1 vs 2 replicas, steps_per_execution, multi-worker.

Logical devices must be configured before TensorFlow runs anything, so every
case runs in a subprocess (tests/distributed_cases.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

CASES = Path(__file__).with_name("distributed_cases.py")
ROOT = CASES.parent.parent
METHODS = ("penalty", "adversarial", "finite_difference")
# With the multi-step members (random starts keyed by global position).
MIRRORED_METHODS = (*METHODS, "pgd", "trades")
# The subprocesses import this checkout's package, not another installed copy.
PYTHONPATH = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
# Every test runs subprocesses (the fixtures build all cases at once): slow.
pytestmark = pytest.mark.slow


def run_case(*args: str, env: dict | None = None, timeout: int = 600) -> None:
    result = subprocess.run(
        [sys.executable, str(CASES), *args],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": PYTHONPATH, **(env or {})},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    """Results of every method on 1 device and on 2 replicas, and XLA's dump."""
    tmp = tmp_path_factory.mktemp("mirrored")
    dump = tmp / "xla_dump"
    run_case(
        "mirrored",
        str(tmp / "results.json"),
        env={"XLA_FLAGS": f"--xla_dump_to={dump}"},
        timeout=1200,
    )
    results = json.loads((tmp / "results.json").read_text())
    modules = {name.split(".")[1] for name in os.listdir(dump) if name.startswith("module_")}
    return results, modules


def assert_same_weights(a, b, atol=1e-6):
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.array(x), np.array(y), rtol=1e-5, atol=atol)


# The finite difference multiplies float32 rounding of the replicas' partial
# sums by every * sigma / h (up to 2 * 0.8 / 0.01 = 160 in the lazy cases).
LAZY_ATOL = {"penalty": 1e-6, "adversarial": 1e-6, "finite_difference": 1e-5}


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


def reserve_ports(count: int) -> list[int]:
    """`count` distinct ports that are free on every interface.

    Every socket stays bound until all ports are chosen, so the ports differ
    (two successive `bind(0)` calls may return the same port). TensorFlow's
    gRPC server binds 0.0.0.0 without SO_REUSEPORT, so a port cannot stay held
    while a worker starts: the ports come from below the range the OS hands out
    to `bind(0)` and outgoing connections, where no other process is likely to
    take one in the moment before the workers bind it, and `run_workers` tries
    again with new ports if one did.
    """
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    draw = random.SystemRandom()  # Not the seeded global generator: runs draw apart.
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        while len(ports) < count:
            s = stack.enter_context(socket.socket())
            try:
                s.bind(("", draw.randrange(20000, ephemeral_low) if ephemeral_low > 20100 else 0))
            except OSError:
                continue
            if s.getsockname()[1] not in ports:
                ports.append(s.getsockname()[1])
        return ports


PORT_TAKEN = "Could not start gRPC server"


def run_workers(command, count: int = 2, attempts: int = 3, timeout: int = 600) -> None:
    """Runs `command(index)` as `count` workers of one cluster on 127.0.0.1 until they pass.

    A worker whose port was taken fails to start its server: then the others
    are stopped and the cluster starts again on new ports (up to `attempts`).
    """
    for attempt in range(attempts):
        cluster = {"worker": [f"127.0.0.1:{port}" for port in reserve_ports(count)]}
        workers = []
        for index in range(count):
            tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
            workers.append(
                subprocess.Popen(
                    command(index),
                    env={
                        **os.environ,
                        "TF_CPP_MIN_LOG_LEVEL": "2",
                        "PYTHONPATH": PYTHONPATH,
                        "TF_CONFIG": json.dumps(tf_config),
                    },
                    cwd=ROOT,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        deadline = time.monotonic() + timeout
        while any(w.poll() is None for w in workers) and time.monotonic() < deadline:
            if any(w.returncode not in (None, 0) for w in workers):
                break  # One failed: the others would wait for it until the timeout.
            time.sleep(0.5)
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
        outputs = [worker.communicate()[0] for worker in workers]
        if all(worker.returncode == 0 for worker in workers):
            return
        if attempt + 1 < attempts and any(PORT_TAKEN in output for output in outputs):
            continue
        failed = next(i for i, w in enumerate(workers) if w.returncode != 0)
        raise AssertionError(f"worker {failed} failed:\n" + outputs[failed][-5000:])


def test_multi_worker_matches_single_worker(tmp_path):
    """Two workers on 127.0.0.1 end with identical weights, equal to one worker's.

    `evaluate` on the workers (broken in stock Keras 3.15 under this strategy)
    gives the single worker's loss.
    """
    run_workers(
        lambda index: [sys.executable, str(CASES), "worker", str(tmp_path / f"worker{index}.npz")]
    )
    run_case("single", str(tmp_path / "single.npz"))
    first, second, single = (
        np.load(tmp_path / name) for name in ("worker0.npz", "worker1.npz", "single.npz")
    )
    for key in single.files:
        np.testing.assert_array_equal(first[key], second[key])
        np.testing.assert_allclose(first[key], single[key], rtol=1e-5, atol=1e-6)
