"""Cheaper regularization: the term every k-th step (`every`) and on a subset (`fraction`)."""

from __future__ import annotations

import math

import keras
import linear_reference as ref
import numpy as np
import pytest
import tensorflow as tf
from conftest import (
    NUM_CLASSES,
    NUM_FEATURES,
    compile_sgd,
    fast_slice,
    linear_data,
    linear_model,
    plain_linear_model,
)

import keras_gradreg as kgr
from keras_gradreg import _subsets as subsets

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
SETTINGS = {
    "penalty": dict(method="penalty", p=2.0, sigma=0.3),
    "adversarial": dict(method="adversarial", p=math.inf, sigma=0.3, clean_weight=0.25),
    "finite_difference": dict(method="finite_difference", p=2.0, sigma=0.3, fd_step=0.05),
}


def problem(n=24, seed=0):
    """`linear_data` and per-example sample weights."""
    return (*linear_data(n, seed), np.linspace(0.2, 2.0, n))


def f64(*arrays):
    return [np.asarray(a, np.float64) for a in arrays]


def fit_linear(regularizer, w, b, x, y, weights, batch_size, lr=0.1, **compile_kwargs):
    model = compile_sgd(linear_model("functional", regularizer, w, b), lr=lr, **compile_kwargs)
    history = model.fit(
        x,
        y,
        sample_weight=weights.astype("float32"),
        batch_size=batch_size,
        shuffle=False,
        verbose=0,
    ).history
    return model, {k: v[0] for k, v in history.items()}


@pytest.mark.parametrize(
    "method, jit_compile",
    # Fast: the penalty with and without XLA, the adversarial estimator with XLA and the
    # finite difference without; CI runs the other two.
    fast_slice(
        [(method, jit) for method in sorted(SETTINGS) for jit in (False, True)],
        lambda method, jit_compile: method == "penalty" or jit_compile == (method == "adversarial"),
        ids=lambda method, jit_compile: f"{method}-{jit_compile}",
    ),
)
def test_every_k_is_k_minus_1_plain_steps_and_one_step_of_k_times_the_term(method, jit_compile):
    """Per cycle of k = 3 steps: the updates sum to 2 plain steps' and one of L + 3 T (NumPy).

    Two cycles, with sample weights; each step's update is taken at the
    weights that step sees. The logs: `data_loss` over all steps, `penalty`
    and `loss` (L + T, not 3 T) over the counted steps only.
    """
    k, batch, lr = 3, 4, 0.1
    x, y, w, b, weights = problem(2 * k * batch)
    reg = kgr.GradientRegularizer(every=k, **SETTINGS[method])
    model, logs = fit_linear(reg, w, b, x, y, weights, batch, lr, jit_compile=jit_compile)

    w64, b64 = f64(w, b)
    updates_w, updates_b, data, penalty, loss = [], [], [], [], []
    for step in range(2 * k):
        rows = slice(step * batch, (step + 1) * batch)
        xs, ys, ws = x[rows].astype(np.float64), y[rows], weights[rows]
        scale = k if step % k == 0 else 0
        gw, gb, step_logs = ref.scaled_term_gradients(
            xs, ys, w64, b64, scale=scale, weights=ws, **SETTINGS[method]
        )
        updates_w.append(-lr * gw)
        updates_b.append(-lr * gb)
        data.append(step_logs["data_loss"])
        if scale:
            penalty.append(step_logs["penalty"])
            loss.append(step_logs["loss"])
        w64, b64 = w64 + updates_w[-1], b64 + updates_b[-1]
    got_w, got_b = model.get_weights()
    np.testing.assert_allclose(got_w - w, sum(updates_w), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got_b - b, sum(updates_b), rtol=1e-4, atol=1e-6)
    # Not the every=1 result: the plain steps did not compute the term.
    every_step, _ = fit_linear(kgr.GradientRegularizer(**SETTINGS[method]), w, b, x, y, weights, 4)
    assert np.abs(every_step.get_weights()[0] - got_w).max() > 1e-3
    np.testing.assert_allclose(logs["data_loss"], np.mean(data), rtol=1e-5)
    np.testing.assert_allclose(logs["penalty"], np.mean(penalty), rtol=1e-5)
    np.testing.assert_allclose(logs["loss"], np.mean(loss), rtol=1e-5)


def test_the_step_counter_is_the_optimizers_iterations():
    """A resumed optimizer (iterations = 1) makes the first step of this fit a plain one."""
    x, y, w, b, weights = problem(8)
    settings = SETTINGS["penalty"]
    model = compile_sgd(linear_model("functional", {"every": 2, **settings}, w, b), lr=0.1)
    model.optimizer.build(model.trainable_variables)
    model.optimizer.iterations.assign(1)
    logs = model.fit(x, y, batch_size=8, epochs=1, verbose=0).history
    gw, gb = ref.loss_gradients(*f64(x), y, *f64(w, b))
    np.testing.assert_allclose(model.get_weights()[0], w - 0.1 * gw, rtol=1e-5, atol=1e-6)
    assert int(model.optimizer.iterations) == 2
    # No step of this epoch computed the term: its means are undefined (NaN), not 0.
    assert math.isnan(logs["penalty"][0]) and math.isnan(logs["loss"][0])
    np.testing.assert_allclose(
        logs["data_loss"][0], ref.per_example_loss(*f64(x), y, *f64(w, b)).mean(), rtol=1e-5
    )


def test_an_epoch_without_a_counted_step_logs_nan_loss_and_penalty():
    """every=8 and 3 steps per epoch: steps 0 and 8 are counted, epoch 2 (steps 3-5) has none."""
    x, y, w, b, weights = problem(12)
    model = compile_sgd(linear_model("functional", {"every": 8, **SETTINGS["penalty"]}, w, b))
    logs = model.fit(x, y, batch_size=4, epochs=3, shuffle=False, verbose=0).history
    assert [math.isnan(v) for v in logs["loss"]] == [False, True, False]
    assert [math.isnan(v) for v in logs["penalty"]] == [False, True, False]
    assert not any(math.isnan(v) for v in logs["data_loss"])


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_subset_term_is_the_numpy_term_on_the_chosen_rows(method):
    """fraction=0.3 of 20 rows: 6 rows from the seed; total = L(batch) + T(rows), weighted."""
    x, y, w, b, weights = problem(20)
    reg = kgr.GradientRegularizer(fraction=0.3, **SETTINGS[method])
    model = plain_linear_model(w, b)
    reg.build()
    seed = reg.subset_seed_generator().state.numpy()
    rows = ref.subset_rows(seed, 20, 0.3)
    assert len(rows) == 6
    np.testing.assert_array_equal(subsets.subset_rows(seed, 20, 0.3).numpy(), rows)
    with tf.GradientTape() as tape:
        result = kgr.regularized_loss(model, x, y, LOSS, reg, sample_weight=weights)
    grad_w, grad_b = tape.gradient(result.total, model.trainable_variables)
    want_w, want_b, logs = ref.scaled_term_gradients(
        *f64(x), y, *f64(w, b), scale=1, weights=weights, term_rows=rows, **SETTINGS[method]
    )
    np.testing.assert_allclose(grad_w.numpy(), want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad_b.numpy(), want_b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(result.data_loss), logs["data_loss"], rtol=1e-5)
    np.testing.assert_allclose(float(result.penalty), logs["penalty"], rtol=1e-5)
    # The next call draws another subset.
    assert not np.array_equal(
        ref.subset_rows(reg.subset_seed_generator().state.numpy(), 20, 0.3), rows
    )


@pytest.mark.slow  # 600 draws.
def test_subset_term_is_unbiased_over_many_draws():
    """The mean of the subset penalty and of its gradient approach the full batch's.

    600 draws of 4 rows out of 16: each row is drawn with probability 1/4 and
    the means are within 4 standard errors of the full-batch values.
    """
    x, y, w, b, weights = problem(16)
    settings = SETTINGS["penalty"]
    model = plain_linear_model(w, b)
    reg = kgr.GradientRegularizer(fraction=0.25, **settings)
    full = kgr.GradientRegularizer(**settings)
    for regularizer in (reg, full):
        regularizer.build()  # Before tracing, as for an optimizer.
    sw = weights.astype("float32")

    @tf.function
    def term(regularizer):
        with tf.GradientTape() as tape:
            result = kgr.regularized_loss(model, x, y, LOSS, regularizer, sample_weight=sw)
            term = result.total - result.data_loss
        return result.penalty, tape.gradient(term, model.trainable_variables)[0]

    draws = 600
    penalties, gradients, counts = [], [], np.zeros(16)
    for _ in range(draws):
        counts[ref.subset_rows(reg.subset_seed_generator().state.numpy(), 16, 0.25)] += 1
        penalty, gradient = term(reg)
        penalties.append(float(penalty))
        gradients.append(gradient.numpy())
    want_penalty, want_gradient = term(full)
    standard_error = np.std(penalties) / math.sqrt(draws)
    assert abs(np.mean(penalties) - float(want_penalty)) < 4 * standard_error
    assert standard_error < 0.02 * float(want_penalty)
    gradient_error = np.std(gradients, axis=0) / math.sqrt(draws)
    assert np.all(
        np.abs(np.mean(gradients, axis=0) - want_gradient.numpy()) < 4 * gradient_error + 1e-6
    )
    # Each row's frequency: binomial(600, 1/4), standard deviation 10.6.
    assert np.all(np.abs(counts - draws / 4) < 4 * math.sqrt(draws * 0.25 * 0.75)), counts


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_fit_with_every_and_fraction_is_the_numpy_sequence(method):
    """every=2, fraction=0.5, XLA and steps_per_execution=2: each step's subset from the seed."""
    k, batch, lr = 2, 6, 0.1
    x, y, w, b, weights = problem(4 * batch)
    reg = kgr.GradientRegularizer(every=k, fraction=0.5, **SETTINGS[method])
    model = compile_sgd(
        linear_model("functional", reg, w, b), lr=lr, jit_compile=True, steps_per_execution=2
    )
    seed = reg.subset_seed_generator().state.numpy()
    model.fit(
        x, y, sample_weight=weights.astype("float32"), batch_size=batch, shuffle=False, verbose=0
    )

    w64, b64 = f64(w, b)
    for step in range(4):
        rows = slice(step * batch, (step + 1) * batch)
        counted = step % k == 0
        term_rows = ref.subset_rows(seed + np.array([0, step // k]), batch, 0.5)
        gw, gb, _ = ref.scaled_term_gradients(
            x[rows].astype(np.float64),
            y[rows],
            w64,
            b64,
            scale=k if counted else 0,
            weights=weights[rows],
            term_rows=term_rows,
            **SETTINGS[method],
        )
        w64, b64 = w64 - lr * gw, b64 - lr * gb
    got_w, got_b = model.get_weights()
    np.testing.assert_allclose(got_w, w64, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_b, b64, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(reg.subset_seed_generator().state.numpy(), seed + [0, 2])


def small_mlp(regularizer, dropout=0.0):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((NUM_FEATURES,))
    hidden = keras.layers.Dense(16, activation="tanh")(inputs)
    if dropout:
        hidden = keras.layers.Dropout(dropout, seed=1)(hidden)
    outputs = keras.layers.Dense(NUM_CLASSES)(hidden)
    return kgr.RegularizedModel(inputs, outputs, regularizer=regularizer)


@pytest.mark.parametrize(
    "method",
    [
        "penalty",
        pytest.param("adversarial", marks=pytest.mark.slow),
        pytest.param("finite_difference", marks=pytest.mark.slow),
    ],
)
def test_eager_graph_and_xla_agree(method):
    """every=2, fraction=0.5 on a tanh MLP: the same weights eagerly, in a graph and in XLA."""
    x, y, _, _, _ = problem(48)
    results = []
    for mode in ("eager", "graph", "xla"):
        reg = kgr.GradientRegularizer(every=2, fraction=0.5, **SETTINGS[method])
        model = compile_sgd(small_mlp(reg), run_eagerly=mode == "eager", jit_compile=mode == "xla")
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        results.append(model.get_weights())
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)


def test_subset_passes_leave_the_state_of_a_plain_step():
    """Dropout seeds and BatchNorm statistics after a subset step are those after a plain step."""
    x, y, _, _, _ = problem(16)

    def model_with(regularizer):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((NUM_FEATURES,))
        hidden = keras.layers.Dense(8)(inputs)
        hidden = keras.layers.BatchNormalization(momentum=0.5)(hidden)
        hidden = keras.layers.Dropout(0.3, seed=2)(hidden)
        model = kgr.RegularizedModel(inputs, keras.layers.Dense(3)(hidden), regularizer=regularizer)
        return compile_sgd(model, lr=0.0)

    states = []
    for reg in ({"sigma": 0.0}, {"sigma": 0.5, "method": "finite_difference", "fraction": 0.5}):
        model = model_with(reg)
        model.fit(x, y, batch_size=16, verbose=0)
        states.append(
            [v.numpy() for v in model.variables if "seed" in v.path or "moving" in v.path]
        )
    assert len(states[0]) == 3
    for a, b in zip(*states):
        np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("policy", ["mixed_float16"])
def test_an_overflowed_counted_step_is_retried_on_the_next_step(policy):
    """LossScaleOptimizer: a skipped step does not advance `iterations`, so the term is retried.

    The first steps' scaled input gradients overflow (see
    test_mixed_precision): the optimizer skips them without advancing
    `iterations`, so with every=2 the term is computed again until a step
    is applied. lr=0 keeps every step's values equal: the logged penalty is
    the NumPy value, not diluted by the plain steps nor NaN.
    """
    keras.mixed_precision.set_global_policy(policy)
    try:
        rng = np.random.default_rng(2)
        x = np.tile(rng.normal(size=(8, 6)).astype("float32") * 1e-3, (40, 1))
        y = np.tile(rng.integers(0, 3, size=8), 40)
        w = rng.normal(size=(6, 3)).astype("float32") * 1e3
        b = np.zeros(3, "float32")
        inputs = keras.Input((6,))
        model = kgr.RegularizedModel(
            inputs, keras.layers.Dense(3)(inputs), regularizer={"sigma": 1.0, "every": 2}
        )
        model.set_weights([w, b])
        optimizer = keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(0.0), initial_scale=2.0**12
        )
        model.compile(optimizer=optimizer, loss=LOSS)
        logs = model.fit(x, y, batch_size=8, shuffle=False, verbose=0).history
    finally:
        keras.mixed_precision.set_global_policy("float32")
    skipped = 40 - int(optimizer.iterations)
    assert skipped > 0 and float(optimizer.dynamic_scale) < 2.0**12
    x64, w64, b64 = x[:8].astype("float64"), w.astype("float64"), b.astype("float64")
    want = float(np.mean(ref.dual_norm(ref.input_gradients(x64, y[:8], w64, b64), 2)))
    np.testing.assert_allclose(logs["penalty"][0], want, rtol=1e-2)


def test_a_custom_loop_needs_the_step_with_every():
    x, y, w, b, _ = problem(8)
    model = plain_linear_model(w, b)
    with pytest.raises(ValueError, match=r"every=2 .*Received: step=None"):
        kgr.regularized_loss(model, x, y, LOSS, {"every": 2})
    with pytest.raises(ValueError, match=r"integer scalar\. Received: step=1\.5"):
        kgr.regularized_loss(model, x, y, LOSS, {"every": 2}, step=1.5)
    counted = kgr.regularized_loss(model, x, y, LOSS, {"every": 2}, step=tf.constant(4, tf.int64))
    skipped = kgr.regularized_loss(model, x, y, LOSS, {"every": 2}, step=5)
    assert float(counted.penalty) > 0 and float(skipped.penalty) == 0.0
    np.testing.assert_allclose(
        float(counted.total), float(counted.data_loss) + 2 * float(counted.penalty), rtol=1e-6
    )
    assert float(skipped.total) == float(skipped.data_loss)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"every": 0}, r"Received: every=0"),
        ({"every": 2.0}, r"Received: every=2\.0"),
        ({"every": True}, r"Received: every=True"),
        ({"fraction": 0.0}, r"Received: fraction=0\.0"),
        ({"fraction": 1.5}, r"Received: fraction=1\.5"),
        ({"fraction": "half"}, r"Received: fraction='half'"),
    ],
)
def test_bad_every_and_fraction_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kgr.GradientRegularizer(**kwargs)


def test_fraction_needs_the_mean_reduction():
    x, y, _, _, _ = problem(8)
    model = keras.Sequential([keras.Input((NUM_FEATURES,)), keras.layers.Dense(NUM_CLASSES)])
    summed = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
    with pytest.raises(ValueError, match=r"Received: loss_fn with reduction='sum'"):
        kgr.regularized_loss(model, x, y, summed, {"fraction": 0.5})
    fitted = kgr.regularize(model, {"fraction": 0.5})
    fitted.compile(optimizer="sgd", loss=summed)
    with pytest.raises(ValueError, match=r"Received: loss with reduction='sum'"):
        fitted.fit(x, y, verbose=0)


def test_fields_round_trip_through_the_config():
    reg = kgr.GradientRegularizer(sigma=0.2, every=4, fraction=0.25)
    config = keras.saving.serialize_keras_object(reg)
    assert (config["config"]["every"], config["config"]["fraction"]) == (4, 0.25)
    assert keras.saving.deserialize_keras_object(config) == reg
    assert kgr.GradientRegularizer().get_config()["every"] == 1
    assert kgr.GradientRegularizer(every=np.int64(3)).every == 3
