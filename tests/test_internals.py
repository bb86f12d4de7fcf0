"""Every Keras/TensorFlow internal the library uses still works as relied on.

Each test calls one function of `keras_gradreg._internals` and checks the
behaviour the library depends on. A release that moves an internal fails
here with `InternalsChangedError`, whose message names the installed
TensorFlow and Keras versions and the public API that is missing.
"""

from __future__ import annotations

import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_gradreg import _internals


def small_model(dropout_seed=1):
    inputs = keras.Input((4,))
    hidden = keras.layers.Dropout(0.5, seed=dropout_seed)(keras.layers.Dense(3)(inputs))
    return keras.Model(inputs, keras.layers.Dense(2)(hidden))


def test_functional_class_is_what_keras_model_builds():
    model = small_model()
    assert isinstance(model, _internals.functional_class())
    assert issubclass(_internals.functional_class(), keras.Model)


def test_functional_call_is_recognised():
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(2)(inputs)
    assert _internals.is_functional_call((inputs, outputs), {})
    assert _internals.is_functional_call((), {"inputs": inputs, "outputs": outputs})
    assert not _internals.is_functional_call((), {"name": "net"})


def test_trainer_class_is_a_base_of_keras_model():
    assert issubclass(keras.Model, _internals.trainer_class())
    assert hasattr(_internals.trainer_class(), "fit")


def test_registered_name_is_used_when_saving():
    class Variant(keras.layers.Layer):
        pass

    _internals.set_registered_name(Variant, "keras_gradreg_tests>SavedAs")
    assert keras.saving.get_registered_name(Variant) == "keras_gradreg_tests>SavedAs"


def test_training_argument_detection():
    class WithTraining(keras.layers.Layer):
        def call(self, x, training=False):
            return x * (2.0 if training else 1.0)

    class WithoutTraining(keras.layers.Layer):
        def call(self, x):
            return x

    x = np.ones((1, 2), "float32")
    assert _internals.call_has_training_arg(WithTraining())
    assert not _internals.call_has_training_arg(WithoutTraining())
    np.testing.assert_array_equal(_internals.call_model(WithTraining(), x, training=True), 2 * x)
    np.testing.assert_array_equal(_internals.call_model(WithoutTraining(), x, training=True), x)


def test_compute_loss_adds_model_losses_and_compiled_loss_is_reachable():
    model = keras.Sequential(
        [keras.Input((2,)), keras.layers.Dense(1, kernel_regularizer=keras.regularizers.L2(1.0))]
    )
    assert _internals.compiled_loss(model) is None
    model.compile(loss="mse")
    model.set_weights([np.ones((2, 1), "float32"), np.zeros(1, "float32")])
    x, y = np.ones((3, 2), "float32"), np.zeros((3, 1), "float32")
    y_pred = model(x)
    loss = _internals.compute_loss(model, x, y, y_pred, None, training=True)
    np.testing.assert_allclose(float(loss), 4.0 + 2.0, rtol=1e-6)  # mse 2^2 + L2 (1 + 1).
    assert _internals.compiled_loss(model) is not None
    assert isinstance(_internals.compiled_loss_variables(model), list)


def test_loss_tracker_is_fits_loss_log():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    model.fit(np.ones((4, 2)), np.zeros((4, 1)), verbose=0)
    tracker = _internals.loss_tracker(model)
    assert isinstance(tracker, keras.metrics.Mean) and tracker.name == "loss"


def test_default_strategy_is_recognised():
    assert _internals.is_default_strategy(tf.distribute.get_strategy())
    assert not _internals.is_default_strategy(tf.distribute.OneDeviceStrategy("/cpu:0"))


def test_optional_element_spec_can_be_set():
    empty = tf.experimental.Optional.empty(None)
    spec = tf.TensorSpec([], tf.float32)
    _internals.set_element_spec(empty, spec)
    assert empty.element_spec == spec


def test_layers_and_seed_generators_are_found():
    model = small_model()
    layers = _internals.all_layers(model)
    assert layers[0] is model and len(layers) == 5  # Model, Input, Dense, Dropout, Dense.
    dropout = next(layer for layer in layers if isinstance(layer, keras.layers.Dropout))
    generators = _internals.layer_seed_generators(dropout)
    assert len(generators) == 1 and isinstance(generators[0], keras.random.SeedGenerator)


def test_global_seed_generator_is_the_one_unseeded_ops_draw_from():
    keras.random.uniform((1,))  # seed=None: creates and advances the global generator.
    generator = _internals.global_seed_generator()
    assert isinstance(generator, keras.random.SeedGenerator)
    before = generator.state.numpy().copy()
    keras.random.uniform((1,))
    assert not np.array_equal(generator.state.numpy(), before)


def test_xla_context_is_detected():
    seen = []

    def probe(x):
        seen.append(_internals.in_xla_context())
        return x

    assert not _internals.in_xla_context()
    tf.function(probe)(tf.constant(1.0))
    tf.function(probe, jit_compile=True)(tf.constant(1.0))
    assert seen == [False, True]


def test_overridden_hooks_still_exist():
    _internals.check_overridden_hooks()


def test_a_moved_internal_names_the_versions(monkeypatch):
    """What a user sees when a release moves an internal."""
    model = small_model()
    monkeypatch.delattr(keras.layers.Layer, "_flatten_layers")
    with pytest.raises(_internals.InternalsChangedError) as error:
        _internals.all_layers(model)
    message = str(error.value)
    assert f"TensorFlow {tf.__version__}, Keras {keras.__version__}" in message
    assert "Layer._flatten_layers" in message and "no public recursive walk" in message


def test_a_renamed_hook_is_reported_with_a_warning_naming_the_versions(monkeypatch):
    assert _internals.check_overridden_hooks() == []  # The installed Keras has them all.
    monkeypatch.setitem(_internals.OVERRIDDEN_HOOKS, "_no_such_hook", ("iterator",))
    monkeypatch.setitem(_internals.OVERRIDDEN_HOOKS, "fit", ("no_such_parameter",))
    versions = rf"TensorFlow {re.escape(tf.__version__)}, Keras {re.escape(keras.__version__)}"
    with pytest.warns(RuntimeWarning) as caught:
        messages = _internals.check_overridden_hooks()
    assert [str(w.message) for w in caught] == messages and len(messages) == 2
    assert re.search(rf"keras\.Model\._no_such_hook .*{versions}", messages[0])
    assert re.search(rf"keras\.Model\.fit\('no_such_parameter',\).*{versions}", messages[1])


@pytest.mark.slow
def test_importing_keras_gradreg_warns_for_a_missing_hook():
    """check_overridden_hooks runs at import, beside check_versions: a warning, not an error."""
    code = (
        "import warnings, keras\n"
        "keras.Model._maybe_symbolic_build = lambda self: None\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import keras_gradreg\n"
        "print([str(w.message) for w in caught if w.category is RuntimeWarning])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "keras.Model._maybe_symbolic_build('iterator', 'data_batch')" in out
    assert f"Keras {keras.__version__}" in out


def test_versions_below_the_supported_range_are_refused(monkeypatch):
    _internals.check_versions()  # The installed pair is supported.
    monkeypatch.setattr(keras, "__version__", "3.9.2")
    with pytest.raises(ImportError, match=r"needs keras >= 3\.10\.0\. Received: keras==3\.9\.2"):
        _internals.check_versions()
    monkeypatch.setattr(keras, "__version__", "3.16.0rc1")
    monkeypatch.setattr(tf, "__version__", "2.15.1")
    with pytest.raises(ImportError, match=r"needs tensorflow >= 2\.16\.2"):
        _internals.check_versions()
