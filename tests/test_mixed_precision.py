"""Mixed precision: the input gradient is loss-scaled and the penalty is float32."""

from __future__ import annotations

import math

import keras
import linear_reference as ref
import numpy as np
import pytest
import tensorflow as tf
from readme_code import GUIDE, code_block

import keras_gradreg as kgr


@pytest.fixture
def policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    keras.mixed_precision.set_global_policy("float32")


def confident_linear_problem():
    """Tiny weights and confident predictions: float16 input gradients underflow.

    d loss / d logits is about 1e-4 / batch and W about 2e-4, so d loss / d x is
    about 1e-9 per entry, below float16's smallest subnormal (6e-8).
    """
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 6)).astype("float32")
    y = np.zeros(16, "int64")
    w = (rng.normal(size=(6, 3)) * 2e-4).astype("float32")
    b = np.array([9.0, 0.0, 0.0], "float32")
    return x, y, w, b


def linear(regularizer, w, b):
    inputs = keras.Input((6,))
    outputs = keras.layers.Dense(3)(inputs)
    model = kgr.RegularizedModel(inputs, outputs, regularizer=regularizer)
    model.set_weights([w, b])
    return model


@pytest.mark.parametrize("policy", ["mixed_float16"], indirect=True)
def test_underflowing_float16_gradient_still_gives_the_penalty(policy):
    """The exact penalty's inner gradient is loss-scaled like the outer one.

    (finite_difference cannot resolve a penalty this small in float16: its
    two forward passes differ by less than float16's spacing of the logits.)
    """
    x, y, w, b = confident_linear_problem()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model = linear(kgr.GradientRegularizer(p=2, sigma=1.0), w, b)

    # Without loss scaling, float16 backpropagation loses the input gradient.
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        unscaled = loss(y, model(xt))
    np.testing.assert_array_equal(tape.gradient(unscaled, xt).numpy(), 0.0)

    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=loss)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    logs = model.fit(x, y, batch_size=16, verbose=0).history
    g = ref.input_gradients(x.astype("float64"), y, w.astype("float64"), b.astype("float64"))
    want = float(np.mean(ref.dual_norm(g, 2)))
    assert want > 0
    np.testing.assert_allclose(logs["penalty"][0], want, rtol=2e-2)


# Allowed differences from float32, relative to the largest entry of each tensor's
# update. Measured worst cases: float16 0.9%; bfloat16 2% (12% for the finite
# difference, whose two forward passes differ by a few bfloat16 spacings). The
# term moves each tensor by 40-55% of its update: a missing or wrong term fails.
UPDATE_RTOL = {
    ("mixed_float16", "penalty"): 0.02,
    ("mixed_float16", "adversarial"): 0.02,
    ("mixed_float16", "finite_difference"): 0.03,
    ("mixed_bfloat16", "penalty"): 0.05,
    ("mixed_bfloat16", "adversarial"): 0.05,
    ("mixed_bfloat16", "finite_difference"): 0.2,
}


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"], indirect=True)
@pytest.mark.parametrize("method", ["penalty", "adversarial", "finite_difference"])
def test_mixed_policies_match_float32(policy, method):
    """Logged penalty and one SGD step's weight update agree with float32.

    The updates (w_after - w_before) are compared with a tolerance well below
    their size and below the part of them that the term contributes (checked
    against an unregularised float32 step).
    """
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 6)).astype("float32")
    y = rng.integers(0, 3, size=32)
    reg = kgr.GradientRegularizer(p=2, sigma=0.5, method=method, fd_step=0.1)

    def run(regularizer):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((6,))
        hidden = keras.layers.Dense(16, activation="tanh")(inputs)
        outputs = keras.layers.Dense(3)(hidden)
        model = kgr.RegularizedModel(inputs, outputs, regularizer=regularizer)
        model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        before = model.get_weights()
        logs = model.fit(x, y, batch_size=32, verbose=0).history
        after = model.get_weights()
        assert all(a.dtype == np.float32 for a in after)
        return logs["penalty"][0], [a - b for a, b in zip(after, before)]

    mixed_penalty, mixed_updates = run(reg)
    keras.mixed_precision.set_global_policy("float32")
    penalty, updates = run(reg)
    _, plain_updates = run({"sigma": 0.0})
    np.testing.assert_allclose(
        mixed_penalty, penalty, rtol=1e-2 if policy == "mixed_bfloat16" else 2e-3
    )
    rtol = UPDATE_RTOL[policy, method]
    for mixed, want, plain in zip(mixed_updates, updates, plain_updates):
        size = np.abs(want).max()
        assert size > 1e-3  # A whole step, not a skipped one.
        # The tolerance resolves the term's share of the update.
        assert np.abs(want - plain).max() > 2 * rtol * size
        np.testing.assert_allclose(mixed, want, rtol=0, atol=rtol * size)


@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
@pytest.mark.parametrize("policy", ["mixed_float16"], indirect=True)
def test_overflowing_loss_scale_steps_are_left_out_of_the_logged_means(policy, p):
    """Steps whose scaled input gradient overflows are skipped and not logged.

    Large weights and small inputs: with loss scale 2**12 the float16 input
    gradient (errors @ W.T, about 2e5) overflows while every parameter
    gradient stays finite, so the optimizer only sees the overflow through
    the penalty (for p = 1 and inf the norm's own gradient at a NaN row is 0).
    It must skip those steps and lower the scale; lr=0 keeps every step's
    penalty equal, so the epoch means are the NumPy values, not 0 or NaN.
    """
    rng = np.random.default_rng(2)
    x = np.tile(rng.normal(size=(8, 6)).astype("float32") * 1e-3, (40, 1))
    y = np.tile(rng.integers(0, 3, size=8), 40)
    w = rng.normal(size=(6, 3)).astype("float32") * 1e3
    b = np.zeros(3, "float32")
    model = linear(kgr.GradientRegularizer(p=p, sigma=1.0), w, b)
    optimizer = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.0), initial_scale=2.0**12
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    logs = model.fit(x, y, batch_size=8, shuffle=False, verbose=0).history
    assert float(optimizer.dynamic_scale) < 2.0**12  # Overflow steps were skipped.
    # Each skipped step logged as 0 would lower the means by 1/40 = 2.5%, over the 1% allowed.
    assert int(optimizer.iterations) < 40

    x64, w64, b64 = x[:8].astype("float64"), w.astype("float64"), b.astype("float64")
    want_penalty = float(np.mean(ref.dual_norm(ref.input_gradients(x64, y[:8], w64, b64), p)))
    want_loss = float(np.mean(ref.per_example_loss(x64, y[:8], w64, b64)))
    np.testing.assert_allclose(logs["penalty"][0], want_penalty, rtol=1e-2)
    np.testing.assert_allclose(logs["data_loss"][0], want_loss, rtol=1e-2)
    np.testing.assert_allclose(logs["loss"][0], want_loss + want_penalty, rtol=1e-2)


@pytest.mark.parametrize("method", ["penalty", "adversarial"])
@pytest.mark.parametrize("policy", ["mixed_float16"], indirect=True)
def test_readme_custom_loop_scales_the_input_gradient_like_fit(policy, method):
    """The guide's loop with a LossScaleOptimizer gives fit's weights on a gradient float16 loses.

    One step on the problem whose unscaled float16 input gradient is exactly
    0 (see above): the regularised weights differ from the unregularised ones
    only if the input gradient was loss-scaled.
    """
    namespace = {}
    code = code_block(GUIDE, "custom-loop").split("\nmodel = keras.Sequential(")[0]  # The function.
    exec(code, namespace)  # noqa: S102
    x, y, w, b = confident_linear_problem()
    reg = kgr.GradientRegularizer(p=2, sigma=1.0, method=method)
    plain = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    plain.set_weights([w, b])
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(100.0))
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    namespace["train_custom"](plain, dataset, reg, optimizer, 1)

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    weights = {}
    for name, regularizer in (("fit", reg), ("unregularized", {"sigma": 0.0})):
        model = linear(regularizer, w, b)
        model.compile(optimizer=keras.optimizers.SGD(100.0), loss=loss)
        model.fit(x, y, batch_size=16, shuffle=False, verbose=0)
        weights[name] = model.get_weights()
    for got, want in zip(plain.get_weights(), weights["fit"]):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert np.abs(weights["fit"][0] - weights["unregularized"][0]).max() > 1e-4
