"""Changing sigma and clean_weight between steps: callbacks, assignment, saving; no retracing."""

from __future__ import annotations

import math
import warnings

import keras
import linear_reference as ref
import numpy as np
import pytest
from conftest import NUM_CLASSES, NUM_FEATURES, linear_data

import keras_gradreg as kgr

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@keras.saving.register_keras_serializable(package="keras_gradreg_tests")
class CountingModel(kgr.RegularizedModel):
    """Counts the traces of its training step (Python runs only while tracing)."""

    traces: list = []

    def regularized_step(self, *args, **kwargs):
        CountingModel.traces.append(self.name)
        return super().regularized_step(*args, **kwargs)


@pytest.fixture(autouse=True)
def fresh_trace_counts():
    """Each test counts its own traces (a rerun in the same process starts from 0)."""
    CountingModel.traces.clear()
    yield
    CountingModel.traces.clear()


def counting_linear(regularizer, w, b, name):
    inputs = keras.Input((NUM_FEATURES,))
    model = CountingModel(
        inputs, keras.layers.Dense(NUM_CLASSES)(inputs), regularizer=regularizer, name=name
    )
    model.set_weights([w, b])
    return model


def traces_of(name: str) -> int:
    return CountingModel.traces.count(name)


def problem(n=12, seed=0):
    return linear_data(n, seed)


def numpy_step(x, y, w, b, lr, scale=1, **settings):
    """One SGD step on L + scale * T with `settings` (sigma 0: a plain step); its logs."""
    if settings["sigma"] == 0.0:
        gw, gb = ref.loss_gradients(x, y, w, b)
        loss = ref.mean(ref.per_example_loss(x, y, w, b))
        return w - lr * gw, b - lr * gb, {"loss": loss, "data_loss": loss, "penalty": 0.0}
    gw, gb, logs = ref.scaled_term_gradients(x, y, w, b, scale=scale, **settings)
    return w - lr * gw, b - lr * gb, logs


@pytest.mark.parametrize(
    "method, schedule",
    [
        ("penalty", [{"sigma": 0.0}, {"sigma": 0.2}, {"sigma": 0.5}]),
        pytest.param(
            "finite_difference",
            [{"sigma": 0.5}, {"sigma": 0.0}, {"sigma": 0.1}],
            marks=pytest.mark.slow,
        ),
        (
            "adversarial",
            [
                {"sigma": 0.3, "clean_weight": 0.0},
                {"sigma": 0.3, "clean_weight": 0.5},
                {"sigma": 0.1, "clean_weight": 0.0},
            ],
        ),
    ],
)
def test_schedule_values_are_used_by_the_next_step_without_retracing(method, schedule):
    """One step per epoch: epoch e's step uses schedule[e] (NumPy), with one trace under XLA."""
    x, y, w, b = problem()
    settings = dict(p=2.0, method=method, fd_step=0.05)
    name = f"scheduled_{method}"
    model = counting_linear({"sigma": 0.7, **settings}, w, b, name)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS, jit_compile=True)
    callback = kgr.callbacks.RegularizerScheduler(lambda epoch: schedule[epoch])
    history = model.fit(x, y, batch_size=12, epochs=3, verbose=0, callbacks=[callback]).history
    assert traces_of(name) == 1

    w64, b64 = w.astype(np.float64), b.astype(np.float64)
    for epoch, values in enumerate(schedule):
        w64, b64, logs = numpy_step(x.astype(np.float64), y, w64, b64, 0.1, **settings, **values)
        for key in ("loss", "data_loss", "penalty"):
            np.testing.assert_allclose(history[key][epoch], logs[key], rtol=1e-5, err_msg=key)
        for key, value in values.items():
            assert history[key][epoch] == value
    np.testing.assert_allclose(model.get_weights()[0], w64, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.get_weights()[1], b64, rtol=1e-5, atol=1e-6)
    assert model.regularizer.sigma == schedule[-1]["sigma"]


def test_assigning_sigma_between_steps_needs_no_retrace():
    """`model.regularizer.sigma = s` before each train_on_batch (every=2, XLA, 4 steps)."""
    x, y, w, b = problem()
    model = counting_linear({"sigma": 0.1, "every": 2}, w, b, "assigned")
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS, jit_compile=True)
    sigmas = [0.4, 0.3, 0.0, 0.2]
    w64, b64 = w.astype(np.float64), b.astype(np.float64)
    for step, sigma in enumerate(sigmas):
        model.regularizer.sigma = sigma
        model.train_on_batch(x, y)
        counted = step % 2 == 0
        w64, b64, _ = numpy_step(
            x.astype(np.float64),
            y,
            w64,
            b64,
            0.1,
            p=2.0,
            sigma=sigma if counted else 0.0,
            method="penalty",
            scale=2,
        )
    assert traces_of("assigned") == 1
    np.testing.assert_allclose(model.get_weights()[0], w64, rtol=1e-5, atol=1e-6)


def test_every_fraction_and_schedule_under_xla_and_steps_per_execution_trace_once():
    """Three epochs of every=4, fraction=0.5, steps_per_execution=3, sigma changed each epoch."""
    x, y, w, b = problem(48)
    model = counting_linear({"sigma": 0.1, "every": 4, "fraction": 0.5}, w, b, "combined")
    model.compile(
        optimizer=keras.optimizers.SGD(0.1), loss=LOSS, jit_compile=True, steps_per_execution=3
    )
    schedule = kgr.callbacks.RegularizerScheduler(kgr.callbacks.linear_warmup(0.3, epochs=2))
    history = model.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[schedule]).history
    assert traces_of("combined") == 1
    np.testing.assert_allclose(history["sigma"], [0.15, 0.3, 0.3])
    assert int(model.optimizer.iterations) == 18
    assert all(np.isfinite(history["penalty"])) and min(history["penalty"]) > 0


def test_linear_warmup_values():
    schedule = kgr.callbacks.linear_warmup(0.4, epochs=4, start=0.2)
    assert [schedule(e)["sigma"] for e in range(6)] == pytest.approx(
        [0.25, 0.3, 0.35, 0.4, 0.4, 0.4]
    )
    assert kgr.callbacks.linear_warmup(0.3, epochs=1)(0) == {"sigma": 0.3}


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: kgr.callbacks.linear_warmup(-1.0, 3), r"Received: sigma=-1\.0"),
        (lambda: kgr.callbacks.linear_warmup(0.1, 0), r"Received: epochs=0"),
        (lambda: kgr.callbacks.linear_warmup(0.1, 2, start=math.nan), r"Received: start=nan"),
        (lambda: kgr.callbacks.RegularizerScheduler(0.1), r"Received: schedule=0\.1"),
    ],
)
def test_bad_schedule_arguments_are_rejected(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "values, match",
    [
        ({"p": 1.0}, r"keys from \('sigma', 'clean_weight'\)\. Received: \{'p': 1\.0\}"),
        (0.1, r"Received: 0\.1"),
        ({"sigma": -0.5}, r"Received: sigma=-0\.5"),
        ({"clean_weight": 2.0}, r"Received: clean_weight=2\.0"),
    ],
)
def test_bad_schedule_values_stop_fit_before_the_epoch(values, match):
    x, y, w, b = problem()
    model = counting_linear({"sigma": 0.1}, w, b, "bad_values")
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    callback = kgr.callbacks.RegularizerScheduler(lambda epoch: values)
    with pytest.raises(ValueError, match=match):
        model.fit(x, y, verbose=0, callbacks=[callback])
    np.testing.assert_array_equal(model.get_weights()[0], w)


def test_schedule_needs_a_regularized_model():
    x, y, _, _ = problem()
    plain = keras.Sequential([keras.Input((NUM_FEATURES,)), keras.layers.Dense(NUM_CLASSES)])
    plain.compile(optimizer="sgd", loss=LOSS)
    callback = kgr.callbacks.RegularizerScheduler(lambda epoch: {"sigma": 0.1})
    with pytest.raises(ValueError, match=r"Received: model of type Sequential"):
        plain.fit(x, y, verbose=0, callbacks=[callback])


def test_the_old_name_regularizer_schedule_warns_and_sets_the_same_values():
    x, y, w, b = problem()
    values = {}
    for name in ("RegularizerScheduler", "RegularizerSchedule"):
        model = counting_linear({"sigma": 0.1}, w, b, f"renamed_{name}")
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            callback = getattr(kgr.callbacks, name)(lambda e: {"sigma": 0.25, "clean_weight": 0.5})
        deprecations = [str(w.message) for w in caught if w.category is DeprecationWarning]
        if name == "RegularizerSchedule":
            assert isinstance(callback, kgr.callbacks.RegularizerScheduler)
            assert deprecations == [
                "`kgr.callbacks.RegularizerSchedule` is deprecated and will be removed in "
                "keras_gradreg 0.3.0: use `kgr.callbacks.RegularizerScheduler`."
            ]
        else:
            assert deprecations == []
        history = model.fit(x, y, batch_size=12, epochs=1, verbose=0, callbacks=[callback])
        values[name] = (history.history["loss"], model.get_weights()[0])
    assert values["RegularizerSchedule"][0] == values["RegularizerScheduler"][0]
    np.testing.assert_array_equal(
        values["RegularizerSchedule"][1], values["RegularizerScheduler"][1]
    )


def test_assignment_is_validated_and_the_step_reads_the_variable():
    reg = kgr.GradientRegularizer(sigma=0.1)
    with pytest.raises(ValueError, match=r"Received: sigma=-1"):
        reg.sigma = -1
    with pytest.raises(ValueError, match=r"Received: clean_weight=1\.5"):
        reg.clean_weight = 1.5
    assert reg.sigma == 0.1
    reg.sigma = 0.25
    assert float(reg.sigma_tensor()) == 0.25 and reg.get_config()["sigma"] == 0.25
    with pytest.raises(AttributeError):
        reg.every = 2  # Fixed fields: a new regularizer rebuilds the step.


@pytest.mark.parametrize(
    "saving", [pytest.param("keras_file", marks=pytest.mark.slow), "weights_file"]
)
def test_scheduled_values_and_subset_seeds_are_saved_and_restored(tmp_path, saving):
    """After a schedule set sigma and clean_weight, save and restore: the next step is the same."""
    x, y, w, b = problem(24)
    settings = {"sigma": 0.1, "method": "adversarial", "fraction": 0.5, "every": 2}
    model = counting_linear(settings, w, b, "saved")
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    callback = kgr.callbacks.RegularizerScheduler(lambda e: {"sigma": 0.35, "clean_weight": 0.125})
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[callback])
    if saving == "keras_file":
        path = tmp_path / "model.keras"
        model.save(path)
        restored = keras.models.load_model(path)
    else:
        path = tmp_path / "model.weights.h5"
        model.save_weights(path)
        restored = counting_linear(settings, w, b, "restored")
        restored.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
        restored.optimizer.build(restored.trainable_variables)
        restored.load_weights(path)
        restored.optimizer.iterations.assign(model.optimizer.iterations)
    assert (restored.regularizer.sigma, restored.regularizer.clean_weight) == (0.35, 0.125)
    assert float(restored.regularizer.sigma_tensor()) == np.float32(0.35)
    np.testing.assert_array_equal(
        restored.regularizer.subset_seed_generator().state.numpy(),
        model.regularizer.subset_seed_generator().state.numpy(),
    )
    for trained in (model, restored):
        trained.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, c in zip(model.get_weights(), restored.get_weights()):
        np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-7)
