"""Callbacks that change a `RegularizedModel`'s regularizer during `fit`.

`sigma` and `clean_weight` live in variables that the compiled training step
reads, so changing them between steps costs no retracing and no XLA
recompilation (tests/test_schedule.py counts the traces). In a custom loop
with `kgr.regularized_loss`, a sigma or clean_weight that was 0 when its
default traced a step cannot be scheduled away from 0 while that step exists
(trace a new one, or pass `fixed_settings=False`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras

from keras_gradreg import _checks, _deprecated

SCHEDULABLE = ("sigma", "clean_weight")

__all__ = ["RegularizerScheduler", "linear_warmup"]


class RegularizerScheduler(keras.callbacks.Callback):
    """Sets the regularizer's `sigma` and/or `clean_weight` at the start of each epoch.

    The regularizer's counterpart of `keras.callbacks.LearningRateScheduler`.

    ```python
    schedule = kgr.callbacks.RegularizerScheduler(lambda epoch: {"sigma": 0.1 * min(1, epoch / 5)})
    model.fit(x, y, epochs=20, callbacks=[schedule])
    ```

    The values set are used from the epoch's first step on, and are logged
    at the epoch's end (`sigma`, `clean_weight`: the keys the schedule set).
    The regularizer keeps them after `fit` (and a saved model saves them).

    Args:
        schedule: A function `epoch -> dict` (epochs counted from 0, as
            Keras does) mapping "sigma" and/or "clean_weight" to their value
            for that epoch; see also `linear_warmup`.
        verbose: 1 prints the values set at each epoch.
    """

    def __init__(self, schedule: Callable[[int], dict[str, float]], verbose: int = 0):
        super().__init__()
        if not callable(schedule):
            raise ValueError(
                "`schedule` must be a function epoch -> dict of sigma and/or clean_weight. "
                f"Received: schedule={schedule!r}"
            )
        self.schedule = schedule
        self.verbose = _checks.check_choice(verbose, "verbose", (0, 1))
        self._scheduled: tuple[str, ...] = ()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        values = self.schedule(epoch)
        if not isinstance(values, dict) or not values or not set(values) <= set(SCHEDULABLE):
            raise ValueError(
                f"`schedule({epoch})` must return a dict with keys from {SCHEDULABLE}. "
                f"Received: {values!r}"
            )
        regularizer = _regularizer_of(self.model)
        for name, value in values.items():
            setattr(regularizer, name, value)  # Validated by the regularizer.
        self._scheduled = tuple(values)
        if self.verbose:
            settings = ", ".join(f"{name}={getattr(regularizer, name):g}" for name in values)
            print(f"\nEpoch {epoch + 1}: RegularizerScheduler set {settings}.")

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            regularizer = _regularizer_of(self.model)
            for name in self._scheduled:
                logs[name] = getattr(regularizer, name)


class RegularizerSchedule(RegularizerScheduler):
    """Deprecated: `RegularizerScheduler` (the name Keras's `LearningRateScheduler` suggests)."""

    def __init__(self, schedule: Callable[[int], dict[str, float]], verbose: int = 0):
        _deprecated.warn(
            "kgr.callbacks.RegularizerSchedule", "`kgr.callbacks.RegularizerScheduler`"
        )
        super().__init__(schedule, verbose)


def linear_warmup(sigma: float, epochs: int, start: float = 0.0) -> Callable[[int], dict]:
    """A `RegularizerScheduler` function that raises sigma linearly over `epochs` epochs.

    Epoch e (from 0) gets `start + (sigma - start) * min(1, (e + 1) / epochs)`:
    with `epochs=4`, sigma / 4, sigma / 2, 3 sigma / 4, then sigma from the
    fourth epoch on (for `start=0`).

    Args:
        sigma: The final sigma, >= 0.
        epochs: Epochs until sigma is reached, an integer >= 1.
        start: The value the ramp starts from (reached at epoch -1), >= 0.

    Returns:
        A function `epoch -> {"sigma": value}`.
    """
    sigma = _checks.check_nonnegative(sigma, "sigma")
    epochs = _checks.check_count(epochs, "epochs")
    start = _checks.check_nonnegative(start, "start")

    def schedule(epoch: int) -> dict[str, float]:
        return {"sigma": start + (sigma - start) * min(1.0, (epoch + 1) / epochs)}

    return schedule


def _regularizer_of(model: Any):
    regularizer = getattr(model, "regularizer", None)
    if not hasattr(regularizer, "sigma") or not hasattr(regularizer, "clean_weight"):
        raise ValueError(
            "RegularizerScheduler needs a kgr.RegularizedModel (a model with a "
            f"`regularizer`). Received: model of type {type(model).__name__}"
        )
    return regularizer
