"""`kgr.regularized_loss(fixed_settings=...)`: sigma and clean_weight read when traced.

True: their values when traced; False: read at every step; None (the default
for a `GradientRegularizer`): read at every step, with the settings that are 0
fixed when traced.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

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


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: " ".join(map(str, s.values())))
@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
def test_fixed_settings_give_the_variable_settings_results(settings, mode):
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


def test_default_fixes_a_zero_sigma_when_traced_and_refuses_to_raise_it():
    net, x, y, loss_fn = _setup()
    regularizer = kgr.GradientRegularizer(p=2, sigma=0.0, method="penalty")
    regularizer.build()
    object_total = _traced_total(net, x, y, loss_fn, regularizer)
    dict_total = _traced_total(net, x, y, loss_fn, {"p": 2, "sigma": 0.0})
    plain = float(loss_fn(y, net(x, training=True)))
    assert float(object_total()) == pytest.approx(plain, rel=1e-6)
    assert float(dict_total()) == pytest.approx(plain, rel=1e-6)
    # sigma = 0 traces the plain objective alone, for an object as for a dict
    # (whose graph also holds its settings as two unused constants).
    without_constants = lambda f: sorted(t for t in _op_types(f) if t != "Const")  # noqa: E731
    assert without_constants(object_total) == without_constants(dict_total)
    with pytest.raises(ValueError, match=r"fixed_settings=False.*Received: sigma=0\.5"):
        regularizer.sigma = 0.5
    assert regularizer.sigma == 0.0
    regularizer.sigma = 0.0  # Assigning the traced zero again is fine.


def test_default_reads_a_scheduled_sigma_at_run_time():
    net, x, y, loss_fn = _setup()
    regularizer = kgr.GradientRegularizer(p=2, sigma=0.1, method="penalty")
    reference = kgr.GradientRegularizer(p=2, sigma=0.1, method="penalty")
    regularizer.build(), reference.build()
    total = _traced_total(net, x, y, loss_fn, regularizer)
    variable = _traced_total(net, x, y, loss_fn, reference, fixed_settings=False)
    values = []
    for sigma in (0.1, 0.5, 0.0, 0.3):  # A ramp, and through 0 (the term then computes 0).
        regularizer.sigma = reference.sigma = sigma
        values.append((float(total()), float(variable())))
    np.testing.assert_allclose(*zip(*values), rtol=1e-6)
    assert values[1][0] > values[0][0] > values[2][0]
    assert total.experimental_get_tracing_count() == 1
    assert "ReadVariableOp" in _op_types(total)


def test_default_fixes_a_zero_clean_weight_when_traced():
    net, x, y, loss_fn = _setup()
    settings = dict(p="inf", sigma=0.1, method="adversarial", clean_weight=0.0)
    regularizer = kgr.GradientRegularizer(**settings)
    regularizer.build()
    default = _traced_total(net, x, y, loss_fn, regularizer)
    fixed = _traced_total(net, x, y, loss_fn, {**settings, "p": float("inf")})
    variable = _traced_total(net, x, y, loss_fn, regularizer, fixed_settings=False)
    np.testing.assert_allclose(float(default()), float(variable()), rtol=1e-6)
    float(fixed())
    # The clean loss is left out of the differentiated total, as with fixed
    # settings: fewer operations than reading clean_weight at run time.
    assert len(_op_types(default)) < len(_op_types(variable))
    with pytest.raises(ValueError, match=r"Received: clean_weight=0\.5"):
        regularizer.clean_weight = 0.5


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
