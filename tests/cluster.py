"""Helpers shared by the distributed, multi-worker and fault tests.

`run_case` runs tests/distributed_cases.py; `reserve_ports` picks distinct
free ports for a cluster on 127.0.0.1 and `run_workers` starts its workers,
again on new ports if one was taken in the meantime.
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
from collections.abc import Callable
from pathlib import Path

import numpy as np

CASES = Path(__file__).with_name("distributed_cases.py")
ROOT = CASES.parent.parent
# The subprocesses import this checkout's package, not another installed copy.
PYTHONPATH = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
PORT_TAKEN = "Could not start gRPC server"


def env(**extra: str) -> dict:
    """The environment of a subprocess: this checkout first, TensorFlow's info logs off."""
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": PYTHONPATH, **extra}


def run_case(*args: str, extra_env: dict | None = None, timeout: int = 600) -> None:
    """Runs `python tests/distributed_cases.py *args`; fails with its output if it fails."""
    result = subprocess.run(
        [sys.executable, str(CASES), *args],
        env=env(**(extra_env or {})),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


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


def tf_config(ports: list[int], index: int) -> str:
    """TF_CONFIG of worker `index` of a cluster on 127.0.0.1 at `ports`."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    return json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})


def run_workers(
    command: Callable[[int], list[str]], count: int = 2, attempts: int = 3, timeout: int = 900
) -> None:
    """Runs `command(index)` as `count` workers of one cluster on 127.0.0.1 until they pass.

    A worker whose port was taken fails to start its server: then the others
    are stopped and the cluster starts again on new ports (up to `attempts`).
    """
    for attempt in range(attempts):
        ports = reserve_ports(count)
        workers = [
            subprocess.Popen(
                command(index),
                env=env(TF_CONFIG=tf_config(ports, index)),
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for index in range(count)
        ]
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


def assert_same_weights(a, b, atol: float = 1e-6) -> None:
    """Two runs' weight lists agree to float32 rounding (rtol 1e-5, `atol`)."""
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.array(x), np.array(y), rtol=1e-5, atol=atol)
