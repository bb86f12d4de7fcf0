"""`kgr.regularized_loss(fixed_settings=...)`: sigma and clean_weight read when traced."""

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
    for fixed in (False, True):
        for generator, state in zip(generators, seeds):  # The same starts and subsets.
            generator.state.assign(state)
        results.append(_values(net, x, y, loss_fn, regularizer, fixed, mode))
    for variable, fixed in zip(*results):
        np.testing.assert_allclose(fixed, variable, rtol=1e-5, atol=1e-6)
    if settings.get("sigma") == 0.0:
        total, data_loss, penalty = results[1][:3]
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


def test_fixed_settings_default_follows_the_regularizer_argument():
    net, x, y, loss_fn = _setup()
    regularizer = kgr.GradientRegularizer(p=2, sigma=0.0, method="penalty")
    regularizer.build()

    @tf.function
    def object_total():
        return kgr.regularized_loss(net, x, y, loss_fn, regularizer).total

    @tf.function
    def dict_total():
        return kgr.regularized_loss(net, x, y, loss_fn, {"p": 2, "sigma": 0.0}).total

    object_total(), dict_total()
    object_graph = object_total.get_concrete_function().graph
    dict_graph = dict_total.get_concrete_function().graph
    ops = lambda graph: {op.type for op in graph.get_operations()}  # noqa: E731
    assert "ReadVariableOp" in ops(object_graph)  # sigma read at run time
    # A dict's sigma = 0 traces the plain objective: no input gradient, no sigma read.
    assert len(dict_graph.get_operations()) < len(object_graph.get_operations())
    assert not any("gradient" in op.name.lower() for op in dict_graph.get_operations())


def test_bad_fixed_settings_names_the_value():
    net, x, y, loss_fn = _setup()
    with pytest.raises(ValueError, match="Received: fixed_settings=1"):
        kgr.regularized_loss(net, x, y, loss_fn, None, fixed_settings=1)
