"""`kgr.regularized_loss` in custom loops: docs/guide.md's loop, NumPy goldens, arguments."""

from __future__ import annotations

import math

import keras
import linear_reference as ref
import numpy as np
import pytest
import tensorflow as tf
from conftest import NUM_CLASSES, NUM_FEATURES, plain_linear_model
from readme_code import GUIDE, code_block

import keras_gradreg as kgr

METHODS = ["penalty", "adversarial", "finite_difference"]
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.fixture(scope="module")
def custom_loop():
    """Runs docs/guide.md's custom-loop block as written (small MNIST-shaped random data)."""
    rng = np.random.default_rng(0)
    namespace = {
        "x_train": rng.uniform(size=(200, 784)).astype("float32"),
        "y_train": rng.integers(0, 10, size=200),
    }
    exec(compile(code_block(GUIDE, "custom-loop"), str(GUIDE), "exec"), namespace)  # noqa: S102
    return namespace


def dropout_mlp(seed=0, inputs=NUM_FEATURES, batch_norm=False, kernel_regularizer=None):
    """A plain Keras MLP with dropout; the same seed gives the same weights and masks."""
    keras.utils.set_random_seed(seed)
    layers = [
        keras.Input((inputs,)),
        keras.layers.Dense(16, activation="tanh", kernel_regularizer=kernel_regularizer),
    ]
    if batch_norm:
        layers.append(keras.layers.BatchNormalization(momentum=0.5))
    layers += [keras.layers.Dropout(0.3), keras.layers.Dense(NUM_CLASSES)]
    return keras.Sequential(layers)


def data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, NUM_FEATURES)).astype("float32"), rng.integers(0, 3, size=n)


def test_readme_example_runs_as_written(custom_loop):
    """Smoke test: the block trains its own model; the loss stays finite."""
    model = custom_loop["model"]
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())


@pytest.mark.parametrize(
    "settings",
    [
        dict(method="penalty", p=2),
        pytest.param(dict(method="penalty", p=math.inf), marks=pytest.mark.slow),
        pytest.param(dict(method="adversarial", p=2, clean_weight=0.0), marks=pytest.mark.slow),
        dict(method="adversarial", p=math.inf, clean_weight=0.5),
        pytest.param(dict(method="finite_difference", p=2, fd_step=0.05), marks=pytest.mark.slow),
        pytest.param(dict(method="penalty", p=2, sigma=0.0), marks=pytest.mark.slow),
        pytest.param(dict(method="penalty", p=2, every=3, fraction=0.5), marks=pytest.mark.slow),
        pytest.param(
            dict(method="adversarial", p=2, clean_weight=0.0, every=2), marks=pytest.mark.slow
        ),
        dict(method="finite_difference", p=2, fd_step=0.05, every=2, fraction=0.4),
    ],
    ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()),
)
def test_readme_loop_matches_fit(custom_loop, settings, capsys):
    """The guide's train_custom and fit end with the same weights (1e-6), with dropout.

    With `every` and `fraction` too: the loop passes the optimizer's
    iterations as the step, and both draw their subsets from the
    regularizer's seed generator, reset in between. The finite difference's
    tolerance is 1e-6 / fd_step: its quotient divides the float32 rounding of
    two losses, which the loop and `fit` round differently, by the step
    (measured: 1.8e-6 on one weight of 96 with fd_step 0.05, at
    --randomly-seed=624315881).
    """
    reg = kgr.GradientRegularizer(**{"sigma": 0.5, **settings})
    reg.build()
    initial_state = reg.save_state()
    x, y = data()
    plain = dropout_mlp()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    custom_loop["train_custom"](plain, dataset, reg, keras.optimizers.SGD(0.1, momentum=0.5), 2)
    printed = capsys.readouterr().out.strip().splitlines()

    reg.load_state(initial_state)
    fitted = kgr.regularize(dropout_mlp(), reg)
    fitted.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.5), loss=LOSS)
    history = fitted.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0).history
    tol = 1e-6 / settings.get("fd_step", 1.0)
    for got, want in zip(plain.get_weights(), fitted.get_weights()):
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    assert printed[-2].startswith("epoch 0: loss ") and printed[-1].startswith("epoch 1: loss ")
    assert history["penalty"][-1] >= 0.0


def test_model_losses_are_added_like_fit():
    """Weight regularisers (model.losses) enter the custom loop's loss as fit's."""
    reg = kgr.GradientRegularizer(p=2, sigma=0.5)
    l2 = keras.regularizers.L2(0.05)
    x, y = data(8)
    plain = dropout_mlp(kernel_regularizer=l2)
    fitted = kgr.regularize(dropout_mlp(kernel_regularizer=l2), reg)
    fitted.compile(optimizer=keras.optimizers.SGD(0.0), loss=LOSS)
    logs = fitted.fit(x, y, batch_size=8, shuffle=False, verbose=0).history
    result = kgr.regularized_loss(plain, x, y, LOSS, reg)
    penalty_weight = 0.05 * np.sum(plain.layers[0].kernel.numpy() ** 2)
    assert penalty_weight > 0.01
    np.testing.assert_allclose(float(result.data_loss), logs["data_loss"][0], rtol=1e-6)
    np.testing.assert_allclose(float(result.total), logs["loss"][0], rtol=1e-6)
    without = kgr.regularized_loss(dropout_mlp(), x, y, LOSS, reg)
    np.testing.assert_allclose(
        float(result.data_loss) - float(without.data_loss), penalty_weight, rtol=1e-5
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("p", [1.0, 2.0, math.inf, 3.0])
def test_linear_golden_with_sample_weights(linear_problem, method, p):
    """Losses and parameter gradients match the NumPy closed form, sample weights included."""
    x, y, w, b = linear_problem
    settings = dict(p=p, sigma=0.3, method=method, clean_weight=0.25, fd_step=0.05)
    weights = np.linspace(0.2, 2.0, len(y))
    model = plain_linear_model(w, b)
    with tf.GradientTape() as tape:
        result = kgr.regularized_loss(
            model, x, y, LOSS, settings, sample_weight=weights.astype("float32")
        )
    grad_w, grad_b = tape.gradient(result.total, model.trainable_variables)
    x64, w64, b64 = (a.astype("float64") for a in (x, w, b))
    want_w, want_b, logs = ref.one_step(x64, y, w64, b64, lr=1.0, weights=weights, **settings)
    np.testing.assert_allclose(grad_w.numpy(), w64 - want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad_b.numpy(), b64 - want_b, rtol=1e-5, atol=1e-6)
    for key, value in (("loss", result.total), ("data_loss", result.data_loss)):
        np.testing.assert_allclose(float(value), logs[key], rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(float(result.penalty), logs["penalty"], rtol=1e-5)
    np.testing.assert_allclose(result.y_pred.numpy(), x64 @ w64 + b64, rtol=1e-5, atol=1e-6)


def test_loss_reduction_is_the_loss_objects_own(linear_problem):
    """reduction="sum" sums losses and penalties; a per-example function gets the mean."""
    x, y, w, b = linear_problem
    model = plain_linear_model(w, b)
    reg = kgr.GradientRegularizer(p=2, sigma=0.3)
    mean = kgr.regularized_loss(model, x, y, LOSS, reg)
    summed_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
    summed = kgr.regularized_loss(model, x, y, summed_loss, reg)
    np.testing.assert_allclose(float(summed.penalty), len(y) * float(mean.penalty), rtol=1e-5)
    np.testing.assert_allclose(float(summed.total), len(y) * float(mean.total), rtol=1e-5)

    def per_example(y_true, y_pred):
        return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)

    by_function = kgr.regularized_loss(model, x, y, per_example, reg)
    np.testing.assert_allclose(float(by_function.total), float(mean.total), rtol=1e-6)
    g = ref.input_gradients(x.astype("float64"), y, w.astype("float64"), b.astype("float64"))
    np.testing.assert_allclose(float(mean.penalty), 0.3 * ref.dual_norm(g, 2).mean(), rtol=1e-5)


def test_finite_difference_reads_each_examples_part_of_any_linear_reduction(linear_problem):
    """The examples' parts come from the loss's own weighting: "sum" gives n times the
    mean's term; "mean_with_sample_weight" (not linear in the weights) is refused."""
    x, y, w, b = linear_problem
    model = plain_linear_model(w, b)
    reg = kgr.GradientRegularizer(p=math.inf, sigma=0.3, method="finite_difference")
    mean = kgr.regularized_loss(model, x, y, LOSS, reg)
    summed_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
    summed = kgr.regularized_loss(model, x, y, summed_loss, reg)
    np.testing.assert_allclose(float(summed.penalty), len(y) * float(mean.penalty), rtol=1e-5)
    _, _, logs = ref.one_step(
        x.astype("float64"), y, w.astype("float64"), b.astype("float64"),
        p=math.inf, sigma=0.3, method="finite_difference",
    )  # fmt: skip
    np.testing.assert_allclose(float(mean.penalty), logs["penalty"], rtol=1e-4)
    by_weight_sum = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="mean_with_sample_weight"
    )
    match = r"Received: loss_fn with reduction='mean_with_sample_weight'"
    with pytest.raises(ValueError, match=match):
        kgr.regularized_loss(model, x, y, by_weight_sum, reg)
    fitted = kgr.regularize(model, reg)
    fitted.compile(optimizer="sgd", loss=by_weight_sum)
    with pytest.raises(ValueError, match=match.replace("loss_fn", "loss")):
        fitted.fit(x, y, verbose=0)


def test_finite_difference_refuses_a_loss_that_ignores_sample_weight(linear_problem):
    """The examples' parts are read through the sample weights: a `compute_loss`
    override that drops them would give a zero term; the step refuses it instead."""
    x, y, _, _ = linear_problem

    class Unweighted(kgr.RegularizedModel):
        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
            del sample_weight  # The override this test is about.
            return super().compute_loss(x, y, y_pred, None, training=training)

    inputs = keras.Input((NUM_FEATURES,))
    model = Unweighted(
        inputs,
        keras.layers.Dense(NUM_CLASSES)(inputs),
        regularizer=kgr.GradientRegularizer(sigma=0.1, method="finite_difference"),
    )
    model.compile(optimizer="sgd", loss=LOSS)
    with pytest.raises(ValueError, match="a loss that does not depend on sample_weight"):
        model.fit(x, y, verbose=0)


@pytest.mark.parametrize("method", ["adversarial", "finite_difference"])
def test_probe_pass_leaves_batch_norm_alone(method):
    """BatchNorm's moving statistics move once, with the clean batch."""
    x, y = data(16)
    model = dropout_mlp(batch_norm=True)
    bn = model.layers[1]
    before = bn.moving_mean.numpy()
    reg = kgr.GradientRegularizer(p=math.inf, sigma=2.0, method=method, fd_step=1.0)
    kgr.regularized_loss(model, x, y, LOSS, reg)
    features = model.layers[0](x).numpy()
    want = 0.5 * before + 0.5 * features.mean(axis=0)
    np.testing.assert_allclose(bn.moving_mean.numpy(), want, rtol=1e-5, atol=1e-6)


def test_adversarial_pass_shares_dropout_masks():
    """With a tiny radius the moved loss equals the clean loss only if the masks match."""
    x, y = data(64)
    reg = kgr.GradientRegularizer(p=2, sigma=1e-6, method="adversarial")
    result = kgr.regularized_loss(dropout_mlp(), x, y, LOSS, reg)
    np.testing.assert_allclose(float(result.penalty), float(result.data_loss), rtol=1e-5)


@pytest.mark.parametrize(
    "method, form",
    [
        ("penalty", "object"),
        ("finite_difference", "dict"),
        pytest.param("adversarial", "object", marks=pytest.mark.slow),
        pytest.param("finite_difference", "object", marks=pytest.mark.slow),
        pytest.param("penalty", "dict", marks=pytest.mark.slow),
        pytest.param("adversarial", "dict", marks=pytest.mark.slow),
    ],
)
def test_eager_graph_and_xla_agree(method, form):
    """Also with the regularizer given as a dict: each trace must read the same variables."""
    x, y = data(16)
    arguments = {"p": 2, "sigma": 0.5, "method": method, "fd_step": 0.1}
    reg = kgr.GradientRegularizer(**arguments) if form == "object" else arguments
    results = []
    for wrap in (lambda f: f, tf.function, lambda f: tf.function(f, jit_compile=True)):
        model = dropout_mlp()
        model.layers[1].rate = 0.0  # XLA draws other masks than TF's kernels.

        def step(x, y, model=model):
            with tf.GradientTape() as tape:
                result = kgr.regularized_loss(model, x, y, LOSS, reg)
            return result.total, tape.gradient(result.total, model.trainable_variables)

        total, gradients = wrap(step)(tf.constant(x), tf.constant(y))
        results.append([total.numpy()] + [g.numpy() for g in gradients])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_loss_and_input_gradient_golden(linear_problem):
    """Per-example losses, logits and (softmax - onehot) W^T from one pass."""
    x, y, w, b = linear_problem
    model = plain_linear_model(w, b)
    result = kgr.loss_and_input_gradient(model, x, y, LOSS)
    x64, w64, b64 = (a.astype("float64") for a in (x, w, b))
    np.testing.assert_allclose(result.losses.numpy(), ref.per_example_loss(x64, y, w64, b64), 1e-5)
    np.testing.assert_allclose(result.y_pred.numpy(), x64 @ w64 + b64, rtol=1e-5, atol=1e-6)
    want = ref.input_gradients(x64, y, w64, b64)
    np.testing.assert_allclose(result.gradient.numpy(), want, rtol=1e-5, atol=1e-7)
    compiled = tf.function(kgr.loss_and_input_gradient, jit_compile=True)
    np.testing.assert_allclose(
        compiled(model, tf.constant(x), tf.constant(y), LOSS).gradient.numpy(),
        want,
        rtol=1e-5,
        atol=1e-7,
    )


def test_loss_and_input_gradient_structured_input():
    """A dict input: gradients for float inputs, None for integer ones."""
    a = keras.Input((2,), name="a")
    ids = keras.Input((1,), dtype="int32", name="ids")
    outputs = keras.layers.Dense(NUM_CLASSES)(a) + keras.ops.cast(ids, "float32") * 0.0
    model = keras.Model({"a": a, "ids": ids}, outputs)
    x = {"a": np.ones((4, 2), "float32"), "ids": np.zeros((4, 1), "int32")}
    result = kgr.loss_and_input_gradient(model, x, np.zeros(4, "int64"), LOSS)
    assert result.gradient["ids"] is None
    assert result.gradient["a"].shape == (4, 2)
    assert result.losses.shape == (4,)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(model="net"), r"Received: model='net'"),
        (dict(regularizer={"sigm": 1}), r"Received: regularizer="),
        (dict(loss_fn=3), r"Received: loss_fn=3"),
        (dict(loss_fn="no_such_loss"), r"Received: loss_fn='no_such_loss'"),
        (
            dict(loss_fn=keras.losses.MeanSquaredError(reduction="none")),
            r"Received: loss_fn with reduction='none'",
        ),
        (dict(training="yes"), r"Received: training='yes'"),
        (dict(loss_scale=0.0), r"Received: loss_scale=0\.0"),
        (dict(loss_scale=True), r"Received: loss_scale=True"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, match):
    x, y = data(4)
    args = dict(model=dropout_mlp(), x=x, y=y, loss_fn=LOSS, regularizer=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        kgr.regularized_loss(**args)


def test_integer_only_input_is_refused_while_sigma_is_positive():
    ids = keras.Input((2,), dtype="int32")
    model = keras.Model(ids, keras.layers.Dense(NUM_CLASSES)(keras.ops.cast(ids, "float32")))
    x, y = np.zeros((4, 2), "int32"), np.zeros(4, "int64")
    with pytest.raises(ValueError, match=r"Received: input dtypes=\['int32'\]"):
        kgr.regularized_loss(model, x, y, LOSS, None)
    result = kgr.regularized_loss(model, x, y, LOSS, {"sigma": 0.0})
    assert float(result.penalty) == 0.0
