"""RegularizedModel behaviour: estimators, randomness, modes, inputs, errors."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import NUM_CLASSES, NUM_FEATURES, compile_sgd, fast_slice, linear_model

import keras_gradreg as kgr
from keras_gradreg import _internals

METHODS = ["penalty", "adversarial", "finite_difference"]
# The norm each method is checked at under XLA in the fast set (the others in CI).
METHOD_NORM = {"penalty": 1.0, "adversarial": math.inf, "finite_difference": 2.0}


def mlp(regularizer, dropout=0.0, seed=0):
    """A small tanh MLP (optionally with seeded dropout), fixed initial weights."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((NUM_FEATURES,))
    hidden = keras.layers.Dense(16, activation="tanh")(inputs)
    if dropout:
        hidden = keras.layers.Dropout(dropout, seed=seed)(hidden)
    outputs = keras.layers.Dense(NUM_CLASSES)(hidden)
    return kgr.RegularizedModel(inputs, outputs, regularizer=regularizer)


def data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, NUM_FEATURES)).astype("float32")
    y = rng.integers(0, NUM_CLASSES, size=n)
    return x, y


def fit(model, x, y, batch_size=8, epochs=1, **kwargs):
    history = model.fit(
        x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0, **kwargs
    )
    return {k: v[-1] for k, v in history.history.items()}


def test_fgsm_special_case_is_goodfellows_objective():
    """p=inf, adversarial, clean_weight=0.5 == 0.5 L(x) + 0.5 L(x + eps sign(grad_x L))."""
    eps = 0.25
    x, y = data(16)
    reg = kgr.GradientRegularizer(p="inf", sigma=eps, method="adversarial", clean_weight=0.5)
    model = compile_sgd(mlp(reg))
    reference = mlp(None)
    reference.set_weights(model.get_weights())
    fit(model, x, y, batch_size=16)

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        clean_loss = loss_fn(y, reference(xt))
    x_adv = xt + eps * tf.sign(tape.gradient(clean_loss, xt))
    with tf.GradientTape() as tape:
        objective = 0.5 * loss_fn(y, reference(xt)) + 0.5 * loss_fn(y, reference(x_adv))
    grads = tape.gradient(objective, reference.trainable_weights)
    for got, var, grad in zip(model.get_weights(), reference.trainable_weights, grads):
        np.testing.assert_allclose(got, var.numpy() - 0.1 * grad.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", METHODS)
def test_penalty_does_not_depend_on_batch_size(method):
    x, y = data(32)
    logged = []
    for batch_size in (16, 4):
        model = compile_sgd(mlp(kgr.GradientRegularizer(p=2, sigma=0.5, method=method)), lr=0.0)
        logged.append(fit(model, x, y, batch_size=batch_size))
    for key in ("penalty", "data_loss", "loss"):
        np.testing.assert_allclose(logged[0][key], logged[1][key], rtol=1e-5, err_msg=key)


@pytest.mark.parametrize(
    "method, p, jit_compile",
    # Fast: every method and norm without XLA, and with XLA each method at one norm.
    fast_slice(
        [(m, p, jit) for m in METHODS for p in (1.0, 2.0, math.inf, 3.0) for jit in (False, True)],
        lambda method, p, jit_compile: not jit_compile or p == METHOD_NORM[method],
        ids=lambda method, p, jit_compile: f"{method}-{p}-{jit_compile}",
    ),
)
def test_zero_input_gradients_stay_finite(method, p, jit_compile):
    """W = 0 makes every input gradient exactly zero: losses and weights stay finite."""
    x, y = data(16)
    reg = kgr.GradientRegularizer(p=p, sigma=0.5, method=method)
    model = linear_model("functional", reg)
    model.set_weights([np.zeros((NUM_FEATURES, NUM_CLASSES), "float32"), np.zeros(3, "float32")])
    compile_sgd(model, jit_compile=jit_compile)
    logs = fit(model, x, y, batch_size=16)
    assert logs["penalty"] == pytest.approx(0.0 if method != "adversarial" else math.log(3))
    assert logs["data_loss"] == pytest.approx(math.log(3), rel=1e-6)
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())
    # The data-loss gradient still moves the weights off zero.
    assert np.abs(model.get_weights()[0]).max() > 0


@pytest.mark.parametrize("method", METHODS)
def test_eager_graph_and_xla_agree(method):
    x, y = data(32)
    results = []
    for mode in ("eager", "graph", "xla"):
        reg = kgr.GradientRegularizer(p=2, sigma=0.5, method=method, clean_weight=0.3)
        model = compile_sgd(mlp(reg), run_eagerly=mode == "eager", jit_compile=mode == "xla")
        fit(model, x, y, batch_size=8, epochs=2)
        results.append(model.get_weights())
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_sigma_zero_trains_like_a_plain_model():
    x, y = data(32)
    model = compile_sgd(mlp(kgr.GradientRegularizer(sigma=0.0)))
    plain = keras.Model(*_clone_graph(model))
    plain.set_weights(model.get_weights())
    compile_sgd(plain)
    logs = fit(model, x, y, epochs=2)
    plain_logs = fit(plain, x, y, epochs=2)
    for a, b in zip(model.get_weights(), plain.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert logs["loss"] == plain_logs["loss"] and logs["penalty"] == 0.0


def _clone_graph(model):
    clone = keras.models.clone_model(keras.Model(model.inputs, model.outputs))
    return clone.inputs, clone.outputs


def test_finite_difference_converges_to_penalty():
    """|FD - penalty| shrinks as h -> 0 (no dropout, weights frozen)."""
    x, y = data(32)
    exact = fit(compile_sgd(mlp(kgr.GradientRegularizer(p=2, sigma=0.5)), lr=0.0), x, y)
    errors = []
    for h in (0.3, 0.1, 0.03):
        reg = kgr.GradientRegularizer(p=2, sigma=0.5, method="finite_difference", fd_step=h)
        logs = fit(compile_sgd(mlp(reg), lr=0.0), x, y)
        errors.append(abs(logs["penalty"] - exact["penalty"]) / exact["penalty"])
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.01


def test_finite_difference_with_dropout_shares_masks():
    """With dropout, FD's logged penalty stays within 5% of the exact penalty.

    Both passes of a step see the same masks; were they drawn anew, the
    difference quotient would measure mask noise, not the gradient.
    """
    x, y = data(64)
    penalties = {}
    for method in ("penalty", "finite_difference"):
        reg = kgr.GradientRegularizer(p=2, sigma=0.5, method=method)
        model = compile_sgd(mlp(reg, dropout=0.5), lr=0.0)
        penalties[method] = fit(model, x, y, batch_size=16)["penalty"]
    assert penalties["penalty"] > 0
    relative = abs(penalties["finite_difference"] - penalties["penalty"]) / penalties["penalty"]
    assert relative < 0.05, penalties


def test_adversarial_pass_uses_the_clean_pass_masks():
    """With a tiny radius the perturbed loss equals the clean one only if masks match."""
    x, y = data(64)
    reg = kgr.GradientRegularizer(p=2, sigma=1e-6, method="adversarial")
    logs = fit(compile_sgd(mlp(reg, dropout=0.5), lr=0.0), x, y, batch_size=16)
    np.testing.assert_allclose(logs["penalty"], logs["data_loss"], rtol=1e-4)


def test_several_inputs_use_the_concatenated_norm():
    """Two float inputs (and an integer one, skipped) act like one concatenated input."""
    x, y = data(16)
    reg = kgr.GradientRegularizer(p=2, sigma=0.5)
    single = compile_sgd(mlp(reg))
    a = keras.Input((2,), name="a")
    b = keras.Input((NUM_FEATURES - 2,), name="b")
    ids = keras.Input((1,), dtype="int32", name="ids")
    joined = keras.layers.Concatenate()([a, b])
    hidden = single.layers[1](joined)
    offset = keras.ops.cast(ids, "float32") * 0.0
    outputs = single.layers[2](hidden) + offset
    split = compile_sgd(kgr.RegularizedModel([a, b, ids], outputs, regularizer=reg))
    initial = single.get_weights()
    single_logs = fit(single, x, y, batch_size=16)
    trained = single.get_weights()
    split.set_weights(initial)
    inputs = [x[:, :2], x[:, 2:], np.zeros((16, 1), "int32")]
    split_logs = fit(split, inputs, y, batch_size=16)
    np.testing.assert_allclose(split_logs["penalty"], single_logs["penalty"], rtol=1e-6)
    for got, want in zip(split.get_weights(), trained):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_input_gradients_are_per_example(linear_problem):
    """Matches (softmax - onehot) W^T and does not depend on the batch."""
    import linear_reference as ref

    x, y, w, b = linear_problem
    model = linear_model("functional", None, w, b)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    full = kgr.input_gradients(model, x, y, loss).numpy()
    want = ref.input_gradients(*(a.astype("float64") for a in (x,)), y, w, b)
    np.testing.assert_allclose(full, want, rtol=1e-5, atol=1e-7)
    first = kgr.input_gradients(model, x[:1], y[:1], loss).numpy()
    np.testing.assert_allclose(first, full[:1], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"p": 0.5}, r"Received: p=0.5"),
        ({"p": float("nan")}, r"Received: p=nan"),
        ({"sigma": -0.1}, r"Received: sigma=-0.1"),
        ({"method": "pgd"}, r"Received: method='pgd'"),
        ({"clean_weight": 1.5}, r"Received: clean_weight=1.5"),
        ({"fd_step": 0.0}, r"Received: fd_step=0.0"),
        ({"fd_step": -1}, r"Received: fd_step=-1"),
    ],
)
def test_bad_settings_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kgr.GradientRegularizer(**kwargs)


def test_bad_regularizer_argument_is_rejected():
    with pytest.raises(ValueError, match=r"Received: regularizer=3"):
        mlp(3)


def test_fit_without_a_loss_is_a_clear_error():
    x, y = data(8)
    model = mlp(None)
    model.compile(optimizer="sgd")
    with pytest.raises(ValueError, match=r"compile\(loss=\.\.\.\)"):
        model.fit(x, y, verbose=0)


def test_regularizer_fields_are_readable():
    reg = kgr.GradientRegularizer(p="inf", sigma=0.2, method="adversarial", clean_weight=0.5)
    model = mlp(reg)
    assert model.regularizer is reg
    assert (reg.p, reg.sigma, reg.method, reg.clean_weight, reg.fd_step, reg.q) == (
        math.inf,
        0.2,
        "adversarial",
        0.5,
        0.01,
        1.0,
    )


def test_evaluate_reports_clean_metrics_only():
    x, y = data(16)
    model = compile_sgd(mlp(kgr.GradientRegularizer()), metrics=["accuracy"])
    fit(model, x, y)
    logs = model.evaluate(x, y, verbose=0, return_dict=True)
    assert set(logs) == {"loss", "accuracy"}
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
        y, model.predict(x, verbose=0)
    )
    np.testing.assert_allclose(logs["loss"], float(loss), rtol=1e-5)


def test_subclassed_and_functional_coexist():
    """Functional use must not rewrite the class hierarchy for later subclassing."""
    from conftest import LinearNet

    functional = linear_model("functional", None)
    subclassed = LinearNet()
    assert kgr.RegularizedModel.__bases__ == (keras.Model,)
    assert isinstance(functional, kgr.RegularizedModel)
    assert not isinstance(subclassed, _internals.functional_class())
    x, y = data(8)
    for model in (functional, subclassed):
        assert "penalty" in fit(compile_sgd(model), x, y)


@pytest.mark.parametrize("method", ["adversarial", "finite_difference"])
def test_moved_pass_leaves_no_trace(method):
    """Per-output loss logs are the clean losses; BatchNorm sees the clean batch only."""
    x, y = data(16)
    inputs = keras.Input((NUM_FEATURES,))
    hidden = keras.layers.BatchNormalization(momentum=0.5)(keras.layers.Dense(8)(inputs))
    outputs = {
        "a": keras.layers.Dense(NUM_CLASSES, name="a")(hidden),
        "b": keras.layers.Dense(NUM_CLASSES, name="b")(hidden),
    }
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    reg = kgr.GradientRegularizer(p="inf", sigma=5.0, method=method, fd_step=1.0)
    model = kgr.RegularizedModel(inputs, outputs, regularizer=reg)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss={"a": loss, "b": loss})
    plain = keras.Model(inputs, outputs)  # Same layers: the clean pass's reference.
    with_batch_stats = plain(x, training=True)  # What one clean training pass computes.
    model.set_weights(plain.get_weights())
    moving_before = [v.numpy() for v in model.non_trainable_variables]
    logs = model.fit(x, {"a": y, "b": y}, batch_size=16, verbose=0).history
    for name in ("a", "b"):
        want = float(loss(y, with_batch_stats[name]))
        np.testing.assert_allclose(logs[f"{name}_loss"][0], want, rtol=1e-5)
    np.testing.assert_allclose(logs["a_loss"][0] + logs["b_loss"][0], logs["data_loss"][0], 1e-5)
    # The moving statistics moved once, with the clean batch (momentum 0.5).
    features = model.layers[1](x).numpy()
    mean_index = [i for i, v in enumerate(model.non_trainable_variables) if "moving_mean" in v.path]
    moved_mean = model.non_trainable_variables[mean_index[0]].numpy()
    want_mean = 0.5 * moving_before[mean_index[0]] + 0.5 * features.mean(axis=0)
    np.testing.assert_allclose(moved_mean, want_mean, rtol=1e-5, atol=1e-6)


def test_regularizer_can_change_during_fit():
    """A callback may change the regularizer between epochs (a sigma warm-up)."""
    x, y = data(16)

    class WarmUp(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.model.regularizer = kgr.GradientRegularizer(p=2, sigma=0.5 * epoch)

    model = compile_sgd(mlp(kgr.GradientRegularizer(sigma=0.0)), lr=0.0)
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[WarmUp()]).history
    exact = fit(compile_sgd(mlp(kgr.GradientRegularizer(p=2, sigma=0.5)), lr=0.0), x, y, 16)
    assert history["penalty"][0] == 0.0
    np.testing.assert_allclose(history["penalty"][1], exact["penalty"], rtol=1e-5)


def test_numpy_scalars_are_accepted():
    reg = kgr.GradientRegularizer(p=np.int64(2), sigma=np.float32(0.25), fd_step=np.float64(0.1))
    assert (reg.p, reg.sigma, reg.fd_step) == (2.0, 0.25, 0.1)
    assert isinstance(reg.sigma, float)
    assert kgr.layers.Maxout(np.int64(3)).num_units == 3


def test_unknown_regularizer_key_is_a_value_error():
    with pytest.raises(ValueError, match=r"unknown keys \['sigm'\].*Received: regularizer="):
        mlp({"sigm": 0.1})
