"""Training state saved at the end of every epoch, atomically, for resumption.

`keras.callbacks.BackupAndRestore` writes the weights file and then the
epoch number in place: a process killed between the two writes leaves
weights of epoch k labelled epoch k - 1, and a resumed run would train epoch
k twice. Here the state of epoch k (model weights with the optimizer's
variables and, for `kgr.RegularizedModel`, the dropout seed states) is
written into a new directory that is renamed into place only when complete,
so `backup/epoch_000003/` either holds the whole state after 3 epochs or
does not exist. The previous state is kept until the next one is complete.
"""

from __future__ import annotations

import os
import re
import shutil

import keras
from absl import logging

WEIGHTS = "state.weights.h5"
_EPOCH_DIR = re.compile(r"^epoch_(\d{6})$")


def _fsync(path: str) -> None:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else os.O_RDONLY
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class TrainingState:
    """The epoch states in one directory.

    Args:
        directory: Where the states live (created on the first save).
    """

    def __init__(self, directory: str):
        self.directory = directory

    def epochs(self) -> list[int]:
        """Epoch counts of the complete states, newest first."""
        if not os.path.isdir(self.directory):
            return []
        found = [_EPOCH_DIR.match(name) for name in os.listdir(self.directory)]
        return sorted((int(m.group(1)) for m in found if m), reverse=True)

    def _path(self, epoch: int) -> str:
        return os.path.join(self.directory, f"epoch_{epoch:06d}")

    def save(self, model: keras.Model, epoch: int) -> None:
        """Writes the state after `epoch` completed epochs; drops older ones but one."""
        final = self._path(epoch)
        partial = f"{final}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        weights = os.path.join(partial, WEIGHTS)
        model.save_weights(weights)
        _fsync(weights)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(partial, final)
        _fsync(self.directory)
        for old in self.epochs()[2:]:
            shutil.rmtree(self._path(old), ignore_errors=True)

    def restore(self, model: keras.Model) -> int:
        """Loads the newest readable state into `model` (compiled, built).

        Returns:
            The number of completed epochs it holds (0 if there is none).
        """
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        for epoch in self.epochs():
            try:
                model.load_weights(os.path.join(self._path(epoch), WEIGHTS))
            except (OSError, ValueError) as error:
                logging.warning("Backup of epoch %d unreadable (%s); trying older.", epoch, error)
                continue
            return epoch
        return 0


class SaveTrainingState(keras.callbacks.Callback):
    """Saves a `TrainingState` at the end of every epoch.

    Put it last among the callbacks: an epoch counts as done (a resumed run
    starts after it) only once everything before it has been written.
    """

    def __init__(self, state: TrainingState):
        super().__init__()
        self.state = state

    def on_epoch_end(self, epoch, logs=None):
        self.state.save(self.model, epoch + 1)
