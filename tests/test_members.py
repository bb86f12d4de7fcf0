"""The multi-step members (PGD, fast FGSM training, TRADES) against NumPy and `kgr.attacks.pgd`."""

from __future__ import annotations

import math

import keras
import linear_reference as ref
import members_reference as mref
import numpy as np
import pytest
import tensorflow as tf
from conftest import compile_sgd, linear_data, linear_model

import keras_gradreg as kgr
from keras_gradreg import _hashing as hashing
from keras_gradreg.balls import random_in_ball

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
LOGS = ("loss", "data_loss", "penalty")


def start_seed(regularizer) -> np.ndarray:
    """The seed the next step's random start draws (the generator's state before it)."""
    return regularizer.start_seed_generator().state.numpy()


# TRADES's first ascent step starts 0.001 from x, where float32 decides the sign
# of the KL's gradient only where it is not nearly 0: a seed whose starts keep
# every coordinate well away from 0 (checked by `check_conditioning`).
TRADES_SEED = (10, 0)


def fix_start_seed(regularizer, seed) -> np.ndarray:
    """Sets the next step's random-start seed; returns it."""
    state = regularizer.start_seed_generator().state
    state.assign(np.asarray(seed).astype(state.numpy().dtype))
    return state.numpy()


def check_conditioning(logs) -> None:
    """The golden's sign steps are decided far above float32's rounding (see TRADES_SEED)."""
    assert logs["conditioning"] > 1e-2, logs["conditioning"]


def fit_one_step(model, x, y, **kwargs):
    history = model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0, **kwargs)
    return {k: v[0] for k, v in history.history.items()}


def as64(*arrays):
    return [np.asarray(a, np.float64) for a in arrays]


def check_step(model, logs, want_w, want_b, want_logs, log_atol=0.0):
    """Weights and logs after one step. `log_atol`: TRADES's KL of about 0.01 is a
    difference of O(1) float32 logarithms, exact to about 1e-6 only."""
    got_w, got_b = model.get_weights()
    np.testing.assert_allclose(got_w, want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_b, want_b, rtol=1e-5, atol=1e-6)
    for key in LOGS:
        np.testing.assert_allclose(
            logs[key], want_logs[key], rtol=1e-5, atol=log_atol, err_msg=key
        )


ADVERSARIAL_CASES = {
    # Madry et al.'s PGD adversarial training: random start, clean_weight 0, a box.
    "pgd_linf": dict(p=math.inf, steps=3, random_start=True, clip=(-1.0, 1.5), clean_weight=0.0),
    # Fast FGSM training: one step of 1.25 sigma from a random start.
    "fast_fgsm": dict(p=math.inf, steps=1, random_start=True, clip=None, clean_weight=0.5),
    # L2 ascent without a random start, in a box (coordinates against it are left out).
    "l2_box": dict(p=2.0, steps=4, random_start=False, clip=(-1.0, 1.0), clean_weight=0.25),
}


@pytest.mark.parametrize("case", sorted(ADVERSARIAL_CASES))
def test_multi_step_adversarial_step_matches_numpy(case):
    x, y, w, b = linear_data(16)
    settings = dict(sigma=0.3, method="adversarial", **ADVERSARIAL_CASES[case])
    regularizer = kgr.GradientRegularizer(**settings)
    model = compile_sgd(linear_model("functional", regularizer, w, b))
    seed = start_seed(regularizer) if regularizer.random_start else None
    logs = fit_one_step(model, x, y)
    ascent = {k: settings[k] for k in ("p", "sigma", "steps", "random_start", "clip")}
    want = mref.adversarial_step(
        *as64(x), y, *as64(w, b), clean_weight=settings["clean_weight"], lr=0.1,
        step_size=regularizer.step_size, seed=seed, **ascent,
    )
    check_step(model, logs, *want)


def test_fast_fgsm_step_size_and_pgd_defaults():
    """The documented defaults: 1.25 for one step from a random start, 2.5 / k otherwise."""
    fast = kgr.GradientRegularizer(p="inf", method="adversarial", random_start=True)
    assert (fast.steps, fast.step_size) == (1, 1.25)
    pgd = kgr.GradientRegularizer(p="inf", method="adversarial", steps=10, random_start=True)
    assert pgd.step_size == pytest.approx(0.25)
    trades = kgr.GradientRegularizer(p="inf", method="trades")
    assert (trades.steps, trades.step_size, trades.beta) == (10, 0.25, 6.0)


def test_one_step_without_random_start_is_the_closed_form_r_star():
    """steps=1 and no random start is today's r*, moved into the box when one is given."""
    x, y, w, b = linear_data(16)
    for clip in (None, (-0.5, 0.5)):
        regularizer = kgr.GradientRegularizer(p=2, sigma=0.3, method="adversarial", clip=clip)
        model = compile_sgd(linear_model("functional", regularizer, w, b))
        logs = fit_one_step(model, x, y)
        x64, w64, b64 = as64(x, w, b)
        g = ref.input_gradients(x64, y, w64, b64)
        x_adv = x64 + 0.3 * ref.direction(g, 2.0)
        x_adv = x_adv if clip is None else np.clip(x_adv, *clip)
        want = ref.mean(ref.per_example_loss(x_adv, y, w64, b64))
        np.testing.assert_allclose(logs["penalty"], want, rtol=1e-5)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("p", [math.inf, 2.0])
def test_trades_step_matches_numpy(p, weighted):
    x, y, w, b = linear_data(16)
    settings = dict(p=p, sigma=0.3, method="trades", steps=3, beta=2.0)
    regularizer = kgr.GradientRegularizer(**settings)
    model = compile_sgd(linear_model("functional", regularizer, w, b))
    weights = np.linspace(0.2, 2.0, len(y)) if weighted else None
    seed = fix_start_seed(regularizer, TRADES_SEED)
    kwargs = {} if weights is None else {"sample_weight": weights.astype("float32")}
    logs = fit_one_step(model, x, y, **kwargs)
    want = mref.trades_step(
        *as64(x), y, *as64(w, b), beta=2.0, lr=0.1, weights=weights, p=p, sigma=0.3,
        steps=3, step_size=0.25, clip=None, seed=seed,
    )
    if math.isinf(p):  # Sign steps; an L2 step does not flip with a coordinate's sign.
        check_conditioning(want[2])
    check_step(model, logs, *want, log_atol=5e-6)


def test_trades_every_and_fraction_match_numpy():
    """every=2, fraction=0.5: L + 2 beta KL on the subset's rows (their starts keyed by row)."""
    x, y, w, b = linear_data(16)
    settings = dict(p=math.inf, sigma=0.3, method="trades", steps=2, beta=1.5)
    regularizer = kgr.GradientRegularizer(every=2, fraction=0.5, **settings)
    model = compile_sgd(linear_model("functional", regularizer, w, b))
    seed = fix_start_seed(regularizer, TRADES_SEED)
    rows = ref.subset_rows(regularizer.subset_seed_generator().state.numpy(), 16, 0.5)
    fit_one_step(model, x, y)
    want_w, want_b, want_logs = mref.trades_step(
        *as64(x), y, *as64(w, b), beta=1.5, lr=0.1, scale=2, rows=rows, p=math.inf,
        sigma=0.3, steps=2, step_size=0.25, clip=None, seed=seed,
    )
    check_conditioning(want_logs)
    np.testing.assert_allclose(model.get_weights()[0], want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.get_weights()[1], want_b, rtol=1e-5, atol=1e-6)


def small_mlp(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((12,))
    hidden = keras.layers.Dense(16, activation="tanh")(inputs)
    return keras.Model(inputs, keras.layers.Dense(4)(hidden))


@pytest.mark.parametrize("p", [math.inf, 2.0, 1.0])
def test_ascent_equals_pgd_keeping_its_last_iterate(p):
    """The member's moved loss is the loss at `kgr.attacks.pgd(keep="last")`'s point, same seed."""
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(24, 12)).astype("float32")
    y = rng.integers(0, 4, 24)
    model = small_mlp()
    regularizer = kgr.GradientRegularizer(
        p=p, sigma=0.2, method="adversarial", steps=5, random_start=True, clip=(0.0, 1.0)
    )
    regularizer.build()
    seed = tf.constant(start_seed(regularizer), tf.int64)
    result = kgr.regularized_loss(model, x, y, LOSS, regularizer)
    x_adv = kgr.attacks.pgd(
        model, x, y, 0.2, p=p, steps=5, step_size=regularizer.step_size * 0.2,
        random_start=True, loss=LOSS, clip=(0.0, 1.0), seed=seed, keep="last",
    )
    want = float(LOSS(y, model(x_adv)))
    np.testing.assert_allclose(float(result.penalty), want, rtol=1e-6)
    assert float(tf.reduce_max(tf.abs(x_adv - x))) == pytest.approx(0.2, abs=1e-6) or p != math.inf


def test_hashed_starts_match_numpy_and_every_mode():
    """Uniforms and L-inf starts are bit-identical in every mode and to NumPy; the L2 start
    and the normals go through log, cos and pow, whose XLA kernels round differently (1 ulp)."""
    seed = tf.constant([123, 4], tf.int64)
    positions = tf.constant([0, 5, 9, 1000])
    want = mref.uniform([123, 4], [0, 5, 9, 1000], 7, stream=3)
    want_normal = mref.normal([123, 4], [0, 5, 9, 1000], 7)
    want_cube = 0.5 * (2.0 * mref.uniform([123, 4], [0, 5, 9, 1000], 7) - 1.0)
    draws = []
    for mode in ("eager", "graph", "xla"):

        def draw():
            return (
                hashing.uniform(seed, positions, 7, stream=3),
                random_in_ball([4, 7], math.inf, 0.5, seed, positions=positions),
                random_in_ball([4, 7], 2.0, 0.5, seed, positions=positions),
                hashing.normal(seed, positions, 7),
            )

        if mode != "eager":
            draw = tf.function(draw, jit_compile=mode == "xla")
        uniform, cube, ball, normal = (t.numpy() for t in draw())
        np.testing.assert_array_equal(uniform, want)  # Exactly: integer arithmetic.
        np.testing.assert_array_equal(cube, want_cube)
        np.testing.assert_allclose(normal, want_normal, rtol=1e-5, atol=1e-6)
        assert np.all(np.linalg.norm(ball, axis=1) <= 0.5 + 1e-6)
        draws.append(ball)
    for ball in draws[1:]:
        np.testing.assert_allclose(ball, draws[0], rtol=1e-6)


@pytest.mark.parametrize(
    "settings",
    [
        dict(method="adversarial", p="inf", steps=3, random_start=True, clip=(0.0, 1.0)),
        dict(method="trades", p="inf", steps=2),
        pytest.param(
            dict(method="trades", p=2, steps=2, every=2, fraction=0.5), marks=pytest.mark.slow
        ),
    ],
    ids=["pgd", "trades", "trades_every_fraction"],
)
def test_eager_graph_and_xla_agree(settings):
    rng = np.random.default_rng(2)
    x = rng.uniform(size=(16, 12)).astype("float32")
    y = rng.integers(0, 4, 16)
    model = small_mlp()
    regularizer = kgr.GradientRegularizer(sigma=0.2, **settings)
    regularizer.build()
    seeds = [regularizer.start_seed_generator().state.numpy()]
    if regularizer.fraction < 1:
        seeds.append(regularizer.subset_seed_generator().state.numpy())
    results = []
    for mode in ("eager", "graph", "xla"):
        regularizer.start_seed_generator().state.assign(seeds[0])
        if regularizer.fraction < 1:
            regularizer.subset_seed_generator().state.assign(seeds[1])

        def step():
            with tf.GradientTape() as tape:
                result = kgr.regularized_loss(model, x, y, LOSS, regularizer, step=0)
            return result.total, result.penalty, tape.gradient(result.total, model.weights)

        if mode != "eager":
            step = tf.function(step, jit_compile=mode == "xla")
        total, penalty, gradients = step()
        results.append([total.numpy(), penalty.numpy(), *(g.numpy() for g in gradients)])
    assert results[0][1] > 0
    # TRADES's KL is a difference of float32 logarithms, which XLA fuses differently.
    atol = 5e-6 if settings["method"] == "trades" else 1e-6
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)


def test_trades_needs_to_know_whether_outputs_are_logits():
    model = small_mlp()
    x = np.zeros((4, 12), "float32")
    y = np.zeros(4, "int64")
    regularizer = kgr.GradientRegularizer(method="trades")

    def no_setting(y_true, y_pred):
        return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)

    with pytest.raises(ValueError, match=r"logits or probabilities.*Received: loss_fn="):
        kgr.regularized_loss(model, x, y, no_setting, regularizer)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(method="trades", clean_weight=0.5), "`clean_weight` does not apply"),
        (dict(method="trades", fd_step=0.1), "`fd_step` does not apply"),
        (dict(method="trades", random_start=True), "`random_start` does not apply"),
        (dict(method="penalty", steps=2), "`steps` does not apply"),
        (dict(method="finite_difference", beta=1.0), "`beta` does not apply"),
        (dict(method="adversarial", beta=1.0), "`beta` does not apply"),
        (dict(method="adversarial", steps=2, p=3.0), r"p must be 1, 2 or inf.*Received: p=3.0"),
        (dict(method="trades", p=1.5), r"Received: p=1.5"),
        (dict(method="adversarial", steps=0), r"Received: steps=0"),
        (dict(method="adversarial", step_size=-1.0), r"Received: step_size=-1.0"),
        (dict(method="adversarial", random_start="yes"), r"Received: random_start='yes'"),
        (dict(method="trades", clip=(1.0, 0.0)), r"Received: clip=\(1.0, 0.0\)"),
        (dict(method="trades", beta=-1.0), r"Received: beta=-1.0"),
    ],
)
def test_bad_arguments_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        kgr.GradientRegularizer(**settings)


def test_config_round_trip_and_old_configs_still_load():
    pgd = kgr.GradientRegularizer(
        p="inf", sigma=0.3, method="adversarial", steps=10, random_start=True, clip=(0, 1)
    )
    trades = kgr.GradientRegularizer(p=2, sigma=0.5, method="trades", beta=1.0, clip=(0, 1))
    for regularizer in (pgd, trades):
        again = kgr.GradientRegularizer.from_config(regularizer.get_config())
        assert again == regularizer and hash(again) == hash(regularizer)
    assert "clean_weight" not in trades.get_config() and "steps" in trades.get_config()
    assert pgd != kgr.GradientRegularizer(p="inf", sigma=0.3, method="adversarial", steps=9)
    # A config saved before the new arguments existed.
    old = {"p": 2.0, "sigma": 0.1, "method": "adversarial", "clean_weight": 0.5,
           "fd_step": 0.01, "every": 1, "fraction": 1.0}
    loaded = kgr.GradientRegularizer.from_config(old)
    assert (loaded.steps, loaded.random_start, loaded.clip) == (1, False, None)
    assert loaded == kgr.GradientRegularizer(p=2, sigma=0.1, method="adversarial", clean_weight=0.5)
    assert kgr.GradientRegularizer.from_config(
        {**old, "method": "penalty"}
    ) == kgr.GradientRegularizer(p=2, sigma=0.1, clean_weight=0.5)


@pytest.mark.parametrize(
    "settings",
    [dict(method="adversarial", steps=2, random_start=True), dict(method="trades", steps=2)],
    ids=["pgd", "trades"],
)
def test_a_resumed_run_continues_identically(tmp_path, settings):
    """The start seed is saved with the model: 1 epoch + save/load + 1 epoch = 2 epochs."""
    x, y, w, b = linear_data(32)

    def new_model():
        regularizer = kgr.GradientRegularizer(p="inf", sigma=0.2, **settings)
        return compile_sgd(linear_model("functional", regularizer, w, b))

    keras.utils.set_random_seed(5)
    straight = new_model()
    straight.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    keras.utils.set_random_seed(5)
    first = new_model()
    first.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    first.save(tmp_path / "model.keras")
    keras.utils.set_random_seed(99)  # The loaded model must not depend on the global seed.
    resumed = keras.saving.load_model(tmp_path / "model.keras")
    assert resumed.regularizer == first.regularizer
    np.testing.assert_array_equal(start_seed(resumed.regularizer), start_seed(first.regularizer))
    resumed.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for got, want in zip(resumed.get_weights(), straight.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.fixture
def mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_the_ascent_is_loss_scaled_under_float16(mixed_float16):
    """Confident predictions: the float16 input gradient underflows unless loss-scaled.

    d loss / d x is about 1e-9 per entry, below float16's smallest subnormal;
    an unscaled ascent would not move (sign(0) = 0) and log the clean loss.
    """
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 6)).astype("float32")
    y = np.zeros(16, "int64")
    w = (rng.normal(size=(6, 3)) * 2e-4).astype("float32")
    b = np.array([9.0, 0.0, 0.0], "float32")
    regularizer = kgr.GradientRegularizer(p="inf", sigma=300.0, method="adversarial", steps=2)
    inputs = keras.Input((6,))
    model = kgr.RegularizedModel(inputs, keras.layers.Dense(3)(inputs), regularizer=regularizer)
    model.set_weights([w, b])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=LOSS)
    logs = fit_one_step(model, x, y)
    x_adv = mref.adversarial_point(
        *as64(x), y, *as64(w, b), p=math.inf, sigma=300.0, steps=2, step_size=1.25,
        random_start=False, clip=None, seed=None,
    )
    want = ref.mean(ref.per_example_loss(x_adv, y, *as64(w, b)))
    clean = ref.mean(ref.per_example_loss(*as64(x), y, *as64(w, b)))
    assert want > 1.5 * clean  # The ascent moves the loss far more than the tolerance.
    np.testing.assert_allclose(logs["penalty"], want, rtol=2e-2)


@pytest.mark.parametrize(
    "settings",
    [
        dict(method="adversarial", steps=3, random_start=True, clip=(-2.0, 2.0)),
        pytest.param(dict(method="trades", steps=2, beta=2.0), marks=pytest.mark.slow),
    ],
    ids=["pgd", "trades"],
)
def test_mixed_float16_update_matches_float32(mixed_float16, settings):
    """One step's weight update under mixed_float16 is float32's within half precision."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 6)).astype("float32")
    y = rng.integers(0, 3, size=32)

    def update():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((6,))
        hidden = keras.layers.Dense(16, activation="tanh")(inputs)
        regularizer = kgr.GradientRegularizer(p="inf", sigma=0.3, **settings)
        model = kgr.RegularizedModel(inputs, keras.layers.Dense(3)(hidden), regularizer=regularizer)
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss=LOSS)
        regularizer.start_seed_generator().state.assign(
            np.array([3, 0]).astype(regularizer.start_seed_generator().state.dtype)
        )
        before = [w.copy() for w in model.get_weights()]
        fit_one_step(model, x, y)
        return [after - w for after, w in zip(model.get_weights(), before)]

    mixed = update()
    keras.mixed_precision.set_global_policy("float32")
    full = update()
    # Sign steps amplify half precision where a gradient coordinate is near 0:
    # TRADES's ascent starts 0.001 from x, where the KL's gradient is tiny.
    tolerance = 5e-2 if settings["method"] == "trades" else 2e-2
    for a, b in zip(mixed, full):
        scale = np.abs(b).max()
        assert scale > 1e-3  # An update to compare.
        np.testing.assert_allclose(a, b, atol=tolerance * scale)


@pytest.mark.parametrize(
    "settings",
    [dict(method="adversarial", steps=3), dict(method="trades", steps=2, beta=2.0)],
    ids=["pgd", "trades"],
)
def test_every_pass_of_the_ascent_shares_the_steps_dropout_mask(settings):
    """Dropout on the input of a linear model: NumPy with the step's one mask m.

    logits = (x * m / (1 - rate)) W + b in every pass (clean, each ascent step,
    moved). Fresh masks in the ascent's passes would move x along other
    coordinates and give other weights.
    """
    x, y, w, b = linear_data(16)
    inputs = keras.Input((6,))
    dropout = keras.layers.Dropout(0.5, seed=3)
    regularizer = kgr.GradientRegularizer(p=math.inf, sigma=0.3, **settings)
    model = kgr.RegularizedModel(
        inputs, keras.layers.Dense(3)(dropout(inputs)), regularizer=regularizer
    )
    model.set_weights([w, b])
    compile_sgd(model)
    generators = kgr._randomness.seed_generators(model)
    before = [g.state.numpy() for g in generators]
    seed = start_seed(regularizer) if regularizer.draws_starts else None
    fit_one_step(model, x, y)
    after = [g.state.numpy() for g in generators]
    for generator, state in zip(generators, before):
        generator.state.assign(state)
    scale = dropout(np.ones_like(x), training=True).numpy().astype("float64")  # m / (1 - rate)
    for generator, state in zip(generators, after):
        generator.state.assign(state)
    assert 0 < (scale == 0).mean() < 1  # A real mask.
    # The masked model is linear in z = x * scale: run the reference there.
    # Its input gradient is scale * (softmax - onehot) W^T; per coordinate the
    # ascent moves z by scale * (step along the gradient in x).
    x64, w64, b64 = as64(x, w, b)
    if settings["method"] == "adversarial":
        x_adv, step = x64, 0.3 * regularizer.step_size
        for _ in range(3):
            g = scale * ref.input_gradients(scale * x_adv, y, w64, b64)
            x_adv = mref.ascent_step(x64, x_adv, g, math.inf, step, 0.3, None)
        gw, gb = ref.loss_gradients(scale * x_adv, y, w64, b64)
    else:
        clean = ref.softmax(scale * x64 @ w64 + b64)
        x_adv = x64 + 0.001 * mref.normal(seed, np.arange(16), 6)
        for _ in range(2):
            g = scale * ((ref.softmax(scale * x_adv @ w64 + b64) - clean) @ w64.T)
            x_adv = mref.ascent_step(x64, x_adv, g, math.inf, 0.3 * 0.25, 0.3, None)
        _, tw, tb = mref.trades_term(scale * x64, scale * x_adv, w64, b64, 2.0)
        lw, lb = ref.loss_gradients(scale * x64, y, w64, b64)
        gw, gb = lw + tw, lb + tb
    np.testing.assert_allclose(model.get_weights()[0], w64 - 0.1 * gw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.get_weights()[1], b64 - 0.1 * gb, rtol=1e-5, atol=1e-6)


def test_a_sigma_schedule_scales_the_ascent_without_retracing():
    """sigma assigned between steps (an epsilon ramp) sets the ball and the step length."""
    x, y, w, b = linear_data(16)
    settings = dict(p=math.inf, method="adversarial", steps=3, clip=(-1.0, 1.5))
    regularizer = kgr.GradientRegularizer(sigma=0.3, **settings)
    model = compile_sgd(linear_model("functional", regularizer, w, b), lr=0.0)
    first = fit_one_step(model, x, y)
    traced = model.train_function
    regularizer.sigma = 0.1
    second = fit_one_step(model, x, y)
    assert model.train_function is traced
    for sigma, logs in ((0.3, first), (0.1, second)):
        x_adv = mref.adversarial_point(
            *as64(x), y, *as64(w, b), p=math.inf, sigma=sigma, steps=3,
            step_size=regularizer.step_size, random_start=False, clip=(-1.0, 1.5), seed=None,
        )
        want = ref.mean(ref.per_example_loss(x_adv, y, *as64(w, b)))
        np.testing.assert_allclose(logs["penalty"], want, rtol=1e-5)
