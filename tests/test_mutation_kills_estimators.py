"""keras_gradreg._estimators: cases added to kill the mutants of the first pass.

Each case's expected value comes from a derivation independent of the
code: the term's definition (0 unless the penalty overflowed), the linear
softmax model's closed form in NumPy (tests/linear_reference.py), or an
identity of the documented design (a subset's rows are weighted by their own
sample weights; random starts are keyed by the row's position in the batch,
so the subset's rows start where the whole batch's would). docs/testing.md,
"Mutation testing", lists the mutants each case kills.
"""

from __future__ import annotations

import math

import keras
import linear_reference as ref
import numpy as np
import pytest
import tensorflow as tf
from conftest import compile_sgd, linear_data, linear_model, plain_linear_model

import keras_gradreg as kgr
from keras_gradreg import _estimators as estimators

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
BATCH = 20


def _problem():
    x, y, w, b = linear_data(BATCH, 0)
    return x, y, w, b, np.linspace(0.2, 2.0, BATCH)


@pytest.mark.parametrize("dtype", [tf.float32, tf.float16])
def test_the_overflow_term_is_zero_at_a_zero_loss_and_nan_after_an_overflow(dtype):
    """0 (and a 0 gradient) while the penalty is finite, at any loss, 0 and inf included;
    NaN once the penalty is not finite."""
    for value in [0.0, 1e-30, 3.5, float("inf")]:
        loss = tf.constant(value, dtype)
        with tf.GradientTape() as tape:
            tape.watch(loss)
            term = estimators.nan_gradient_unless_finite(tf.constant(2.0, dtype), loss)
        assert term.dtype == dtype and float(term) == 0.0
        assert float(tape.gradient(term, loss)) == 0.0
    for penalty in [float("inf"), float("nan")]:
        loss = tf.constant(0.5, dtype)
        with tf.GradientTape() as tape:
            tape.watch(loss)
            term = estimators.nan_gradient_unless_finite(tf.constant(penalty, dtype), loss)
        assert math.isnan(float(term)) and math.isnan(float(tape.gradient(term, loss)))


@pytest.mark.parametrize("every, fraction", [(2, 1.0), (1, 0.5)])
def test_fit_at_clean_weight_0_with_every_or_fraction_keeps_the_clean_loss(every, fraction):
    """`fit`'s step (its `tf.switch_case`) at clean_weight 0 with `every=k` minimises
    L + k (L(x + r*) - L) = k L(x + r*) - (k - 1) L, the clean loss kept; with a subset,
    L on the batch + (L(x + r*) - L) on the subset's rows (NumPy closed form)."""
    x, y, w, b, weights = _problem()
    settings = dict(method="adversarial", p=math.inf, sigma=0.3, clean_weight=0.0)
    reg = kgr.GradientRegularizer(every=every, fraction=fraction, **settings)
    model = compile_sgd(linear_model("functional", reg, w, b), lr=0.1)
    rows = None
    if fraction < 1.0:
        rows = ref.subset_rows(reg.subset_seed_generator().state.numpy(), BATCH, fraction)
    model.fit(
        x, y, sample_weight=weights.astype("float32"), batch_size=BATCH, shuffle=False, verbose=0
    )
    x64, w64, b64 = (np.asarray(a, np.float64) for a in (x, w, b))
    want_w, want_b, _ = ref.scaled_term_gradients(
        x64, y, w64, b64, scale=every, weights=weights, term_rows=rows, **settings
    )
    got_w, got_b = model.get_weights()
    np.testing.assert_allclose(got_w, w64 - 0.1 * want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_b, b64 - 0.1 * want_b, rtol=1e-5, atol=1e-6)


def _same_draws(reg, start_state=None):
    """The step of `reg`, called again and again with the subset and start seeds it has now
    (or `start_state`), the subset's rows (None: the whole batch) and the start seed."""
    reg.build()
    generators = [reg.subset_seed_generator(), reg.start_seed_generator()]
    states = [None if g is None else g.state.numpy() for g in generators]
    if start_state is not None:
        states[1] = start_state

    def term(model, x, y, weights):
        for generator, state in zip(generators, states):
            if generator is not None:
                generator.state.assign(state)
        return kgr.regularized_loss(model, x, y, LOSS, reg, sample_weight=weights)

    rows = None if states[0] is None else ref.subset_rows(states[0], BATCH, reg.fraction)
    return term, rows, states[1]


def test_trades_on_a_subset_weights_each_row_by_its_own_sample_weight():
    """T(rows) = beta / m * sum over the m rows of w_i KL_i, the KL reduced like the loss:
    linear in the weights, each row by its own weight, and blind to the other rows'."""
    x, y, w, b, weights = _problem()
    reg = kgr.GradientRegularizer(method="trades", p=math.inf, sigma=0.3, beta=6.0, fraction=0.3)
    term, rows, _ = _same_draws(reg)
    model = plain_linear_model(w, b)
    assert sorted(rows) != list(range(len(rows)))  # Rows that are not the batch's first m.
    # The per-row terms: weight 1 on one chosen row, 0 on every other.
    per_row = []
    for row in rows:
        one = np.zeros(BATCH)
        one[row] = 1.0
        per_row.append(float(term(model, x, y, one).penalty))
    assert min(per_row) > 0.0
    np.testing.assert_allclose(
        float(term(model, x, y, weights).penalty), np.dot(weights[rows], per_row), rtol=1e-5
    )
    others = np.ones(BATCH)
    others[rows] = 0.0
    assert float(term(model, x, y, others).penalty) == 0.0


@pytest.mark.parametrize("method", ["adversarial", "trades"])
def test_random_starts_on_a_subset_are_the_whole_batchs_starts_of_those_rows(method):
    """Starts are keyed by the row's position in the batch: the subset's moved loss equals
    the whole batch's, weighted to count the subset's rows alone (weights n / m on them)."""
    x, y, w, b, _ = _problem()
    settings = dict(method=method, p=math.inf, sigma=0.3, steps=1, step_size=0.25)
    if method == "adversarial":
        settings.update(random_start=True, clean_weight=0.0)
    subset_term, rows, start = _same_draws(kgr.GradientRegularizer(fraction=0.3, **settings))
    assert sorted(rows) != list(range(len(rows)))
    model = plain_linear_model(w, b)
    whole_term, _, _ = _same_draws(kgr.GradientRegularizer(**settings), start)
    only_rows = np.zeros(BATCH)
    only_rows[rows] = BATCH / len(rows)
    on_rows = float(subset_term(model, x, y, None).penalty)
    np.testing.assert_allclose(
        float(whole_term(model, x, y, only_rows).penalty), on_rows, rtol=1e-5
    )
    # Not what the rows give as a batch of their own (positions 0 to m - 1).
    alone = float(whole_term(model, x[rows], y[rows], None).penalty)
    assert abs(alone - on_rows) > 1e-4


@pytest.mark.parametrize("loss_scale", [None, 1024.0])
def test_the_clean_input_gradient_is_unscaled_under_a_loss_scale(loss_scale):
    """Row i is d(mean loss)/dx_i = g_i / n (the linear softmax model's closed form), and the
    loss is L itself, whatever loss scale the inner gradient was taken at."""
    x, y, w, b, _ = _problem()
    model = plain_linear_model(w, b)

    def forward(inputs):
        y_pred = model(inputs)
        return y_pred, LOSS(y, y_pred)

    passes = estimators.Passes(model, forward, loss_scale)
    _, loss, rows = estimators.clean_pass_and_input_gradient(passes, tf.constant(x))
    x64, w64, b64 = (np.asarray(a, np.float64) for a in (x, w, b))
    want = ref.input_gradients(x64, y, w64, b64) / BATCH
    np.testing.assert_allclose(rows.numpy(), want, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(
        float(loss), ref.per_example_loss(x64, y, w64, b64).mean(), rtol=1e-6
    )
