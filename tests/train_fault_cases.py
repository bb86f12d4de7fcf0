"""Runs train_and_evaluate and SIGKILLs itself at a chosen point (fault tests).

    python tests/train_fault_cases.py WORKDIR SETTINGS_JSON KILL

KILL is where the process kills itself with SIGKILL:
- "none": nowhere.
- "step:E:S": after training step S (0-based) of epoch E (0-based).
- "state:N": while writing the training state after N epochs: the weights
  file is written, cut to half its size (a torn write), then the kill.
- "evaluate:K": at the K-th call (1-based) of `keras.Model.evaluate` (each
  epoch's test evaluation, then the final one).
- "robustness": when the robustness report starts.
Data: `tfds.testing.mock_data` with 32 examples. TF_CONFIG makes it a worker.
"""

from __future__ import annotations

import json
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# This checkout's packages, not an installed copy's.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

import keras_gradreg as kgr  # noqa: E402
from train import config, train_lib  # noqa: E402


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class KillAtStep(keras.callbacks.Callback):
    def __init__(self, epoch: int, step: int):
        super().__init__()
        self.kill_epoch, self.step, self.epoch = epoch, step, -1

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.epoch == self.kill_epoch and batch == self.step:
            die()


def arm(kill: str) -> list[keras.callbacks.Callback]:
    """Installs the kill point; returns the callbacks it needs."""
    kind, *args = kill.split(":")
    if kind == "step":
        return [KillAtStep(int(args[0]), int(args[1]))]
    if kind == "state":
        original = keras.Model.save_weights
        target = f"epoch_{int(args[0]):06d}.partial"

        def save_weights(self, filepath, *a, **k):
            original(self, filepath, *a, **k)
            if target in str(filepath):
                with open(filepath, "r+b") as f:
                    f.truncate(os.path.getsize(filepath) // 2)
                die()

        keras.Model.save_weights = save_weights
    elif kind == "evaluate":
        original_evaluate = keras.Model.evaluate
        calls = [0]

        def evaluate(self, *a, **k):
            calls[0] += 1
            if calls[0] == int(args[0]):
                die()
            return original_evaluate(self, *a, **k)

        keras.Model.evaluate = evaluate
    elif kind == "robustness":
        kgr.evaluate_robustness = lambda *a, **k: die()
    elif kind != "none":
        raise ValueError(kill)
    return []


if __name__ == "__main__":
    workdir, settings, kill = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    cfg = config.make_config(settings.pop("preset", None), **settings)
    callbacks = arm(kill)
    with tfds.testing.mock_data(num_examples=32):
        train_lib.train_and_evaluate(cfg, workdir, callbacks=callbacks)
