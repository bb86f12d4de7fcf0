"""`kgr.regularized_loss(fixed_settings=...)`: sigma and clean_weight read when traced.

True: their values when traced; False: read at every step; None (the default
for a `GradientRegularizer`): read at every step, with their zeros choosing
the traced step's form.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import fast_slice

import keras_gradreg as kgr

SETTINGS = [
    dict(method="penalty"),
    dict(method="adversarial"),
    dict(method="adversarial", clean_weight=0.5),
    dict(method="finite_difference"),
    dict(method="adversarial", steps=3, random_start=True),
    dict(method="trades", steps=2),
    dict(method="penalty", sigma=0.0),
    dict(method="adversarial", sigma=0.0),
    dict(method="adversarial", every=2),
    dict(method="penalty", fraction=0.5),
]


def _setup():
    keras.utils.set_random_seed(0)
    net = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)]
    )
    x = tf.constant(np.random.default_rng(0).random((5, 6), np.float32))
    y = tf.constant([0, 1, 2, 1, 0])
    return net, x, y, keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _values(net, x, y, loss_fn, regularizer, fixed, mode):
    def run():
        with tf.GradientTape() as tape:
            result = kgr.regularized_loss(
                net, x, y, loss_fn, regularizer, step=tf.constant(0, tf.int64), fixed_settings=fixed
            )
        gradients = tape.gradient(result.total, net.trainable_variables)
        return [result.total, result.data_loss, result.penalty, *gradients]

    if mode != "eager":
        run = tf.function(run, jit_compile=mode == "xla")
    return [np.asarray(t) for t in run()]


@pytest.mark.parametrize(
    "mode, settings",
    # Fast: every setting eagerly and in a graph; under XLA the plain penalty and the
    # finite difference (the others under XLA in CI's slow set).
    fast_slice(
        [(mode, settings) for mode in ("eager", "graph", "xla") for settings in SETTINGS],
        lambda mode, settings: mode != "xla" or settings in SETTINGS[0:4:3],
        ids=lambda mode, settings: f"{mode}-{' '.join(map(str, settings.values()))}",
    ),
)
def test_fixed_settings_give_the_variable_settings_results(mode, settings):
    net, x, y, loss_fn = _setup()
    regularizer = kgr.GradientRegularizer(p="inf", **{"sigma": 0.1, **settings})
    regularizer.build()
    generators = [
        g
        for g in (regularizer.start_seed_generator(), regularizer.subset_seed_generator())
        if g is not None
    ]
    seeds = [g.state.numpy() for g in generators]
    results = []
    for fixed in (False, True, None):
        for generator, state in zip(generators, seeds):  # The same starts and subsets.
            generator.state.assign(state)
        results.append(_values(net, x, y, loss_fn, regularizer, fixed, mode))
    for variable, fixed, zeros_fixed in zip(*results):
        np.testing.assert_allclose(fixed, variable, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(zeros_fixed, variable, rtol=1e-5, atol=1e-6)
    if settings.get("sigma") == 0.0:
        for result in results[1:]:
            total, data_loss, penalty = result[:3]
            assert total == data_loss and penalty == 0.0


def test_fixed_settings_are_read_when_traced():
    net, x, y, loss_fn = _setup()
    steps = {}
    for fixed in (False, True):
        regularizer = kgr.GradientRegularizer(p=2, sigma=0.0, method="penalty")
        regularizer.build()

        @tf.function
        def total(regularizer=regularizer, fixed=fixed):
            return kgr.regularized_loss(net, x, y, loss_fn, regularizer, fixed_settings=fixed).total

        before = float(total())
        regularizer.sigma = 0.5
        steps[fixed] = (before, float(total()))
    plain = float(loss_fn(y, net(x, training=True)))
    np.testing.assert_allclose(steps[True], [plain, plain], rtol=1e-6)  # traced at sigma = 0
    assert steps[False][0] == pytest.approx(plain, rel=1e-6)
    assert steps[False][1] > plain + 1e-3  # the variable reaches the traced step


def _traced_total(net, x, y, loss_fn, regularizer, **kwargs):
    @tf.function
    def total():
        return kgr.regularized_loss(net, x, y, loss_fn, regularizer, **kwargs).total

    return total


def _op_types(function):
    return [op.type for op in function.get_concrete_function().graph.get_operations()]


def _outputs(net, x, y, loss_fn, regularizer, jit=False, **kwargs):
    @tf.function(jit_compile=jit)
    def outputs():
        with tf.GradientTape() as tape:
            result = kgr.regularized_loss(net, x, y, loss_fn, regularizer, **kwargs)
        gradients = tape.gradient(result.total, net.trainable_variables)
        return [result.total, result.data_loss, result.penalty, *gradients]

    return outputs


RAMPS = [
    dict(p=2, method="penalty"),
    dict(p="inf", method="adversarial", clean_weight=0.5),
    dict(p="inf", method="adversarial", steps=2, random_start=True, clip=(0.0, 1.0)),
    dict(p="inf", method="finite_difference"),
    dict(p="inf", method="trades", steps=2),
    dict(p=2, method="penalty", every=2),
]


@pytest.mark.parametrize("settings", RAMPS, ids=lambda s: " ".join(map(str, s.values())))
def test_default_follows_a_schedule_through_zero_like_run_time_settings(settings):
    """Traced at sigma > 0 (the plain objective's values selected at 0): every output
    equals `fixed_settings=False`'s at every value, with one trace."""
    first = 0.1
    net, x, y, loss_fn = _setup()
    regularizer = kgr.GradientRegularizer(sigma=first, **settings)
    reference = kgr.GradientRegularizer(sigma=first, **settings)
    regularizer.build(), reference.build()
    kwargs = dict(step=tf.constant(0, tf.int64))
    default = _outputs(net, x, y, loss_fn, regularizer, **kwargs)
    variable = _outputs(net, x, y, loss_fn, reference, fixed_settings=False, **kwargs)
    generators = [
        (g, h)
        for g, h in zip(
            (regularizer.start_seed_generator(), regularizer.subset_seed_generator()),
            (reference.start_seed_generator(), reference.subset_seed_generator()),
        )
        if g is not None
    ]
    plain = float(loss_fn(y, net(x, training=True)))
    for sigma in (first, 0.3, 0.0, 0.2):
        regularizer.sigma = reference.sigma = sigma
        for g, h in generators:  # The same starts for both.
            h.state.assign(g.state)
        for got, want in zip(default(), variable()):
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
        total, penalty = float(default()[0]), float(default()[2])
        if sigma == 0.0:
            assert total == pytest.approx(plain, rel=1e-6) and penalty == 0.0
        else:
            assert penalty > 0.0
    assert default.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("settings", RAMPS[:2], ids=["penalty", "adversarial"])
def test_default_traced_at_zero_sigma_is_the_plain_objective_while_it_exists(settings):
    net, x, y, loss_fn = _setup()
    regularizer = kgr.GradientRegularizer(sigma=0.0, **settings)
    regularizer.build()
    default = _traced_total(net, x, y, loss_fn, regularizer)
    dict_total = _traced_total(net, x, y, loss_fn, {**settings, "sigma": 0.0})
    plain = float(loss_fn(y, net(x, training=True)))
    assert float(default()) == pytest.approx(plain, rel=1e-6)
    float(dict_total())
    # sigma = 0 traces the plain objective alone, for an object as for a dict
    # (whose graph also holds its settings as two unused constants).
    without_constants = lambda f: sorted(t for t in _op_types(f) if t != "Const")  # noqa: E731
    assert without_constants(default) == without_constants(dict_total)
    with pytest.raises(ValueError, match=r"Trace a new step.*Received: sigma=0\.3"):
        regularizer.sigma = 0.3
    assert regularizer.sigma == 0.0
    regularizer.sigma = 0.0  # The traced zero again is fine.
    del default
    regularizer.sigma = 0.3  # No step that left the term out is left.
    retraced = _traced_total(net, x, y, loss_fn, regularizer)
    variable = _traced_total(net, x, y, loss_fn, regularizer, fixed_settings=False)
    assert float(retraced()) == pytest.approx(float(variable()), rel=1e-6)
    assert float(retraced()) > plain + 1e-3


@pytest.mark.parametrize("jit", [False, True])
def test_default_fixes_a_zero_clean_weight_while_its_step_exists(jit):
    net, x, y, loss_fn = _setup()
    settings = dict(p="inf", sigma=0.1, method="adversarial", clean_weight=0.0)
    regularizer = kgr.GradientRegularizer(**settings)
    regularizer.build()
    default = _outputs(net, x, y, loss_fn, regularizer, jit=jit)
    variable = _outputs(net, x, y, loss_fn, regularizer, jit=jit, fixed_settings=False)
    fixed = _outputs(net, x, y, loss_fn, {**settings, "p": float("inf")}, jit=jit)
    for got, want in zip(default(), variable()):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
    fixed()
    # The clean loss is left out of the differentiated total, as with fixed
    # settings: fewer operations than reading clean_weight at run time.
    assert len(_op_types(default)) < len(_op_types(variable))
    with pytest.raises(ValueError, match=r"fixed_settings=False.*Received: clean_weight=0\.5"):
        regularizer.clean_weight = 0.5
    assert regularizer.clean_weight == 0.0
    regularizer.clean_weight = 0.0  # The traced zero again is fine.
    del default
    regularizer.clean_weight = 0.5  # No step that left the clean loss out is left.
    assert regularizer.clean_weight == 0.5


def test_a_scheduler_assigning_a_left_out_clean_weight_names_the_way_out():
    net, x, y, loss_fn = _setup()
    regularizer = kgr.GradientRegularizer(p="inf", sigma=0.1, method="adversarial", clean_weight=0)
    regularizer.build()
    step = _traced_total(net, x, y, loss_fn, regularizer)
    float(step())
    holder = keras.Model(net.inputs, net.outputs)
    holder.regularizer = regularizer
    scheduler = kgr.callbacks.RegularizerScheduler(lambda epoch: {"clean_weight": 0.5})
    scheduler.set_model(holder)
    with pytest.raises(ValueError, match="Received: clean_weight=0.5"):
        scheduler.on_epoch_begin(0)


def test_eager_calls_read_every_setting_at_every_step():
    net, x, y, loss_fn = _setup()
    regularizer = kgr.GradientRegularizer(p=2, sigma=0.0, method="penalty")
    plain = float(kgr.regularized_loss(net, x, y, loss_fn, regularizer).total)
    regularizer.sigma = 0.5  # No step was traced: nothing is fixed.
    assert float(kgr.regularized_loss(net, x, y, loss_fn, regularizer).total) > plain + 1e-3


def test_bad_fixed_settings_names_the_value():
    net, x, y, loss_fn = _setup()
    with pytest.raises(ValueError, match="Received: fixed_settings=1"):
        kgr.regularized_loss(net, x, y, loss_fn, None, fixed_settings=1)
