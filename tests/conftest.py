"""Shared fixtures: a small classification problem, tiny model builders, test isolation."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import keras_gradreg as kgr  # noqa: E402

NUM_FEATURES = 6
NUM_CLASSES = 3
# Every test starts from this global seed (see `isolated_global_state`).
TEST_SEED = 1234


def fast_slice(cases, fast, ids=None):
    """`cases` for `pytest.mark.parametrize`, those `fast(*case)` rejects marked slow.

    A large parametrisation keeps a representative slice in the default
    (fast) set and CI runs every case (docs/testing.md). A case is a tuple
    of the parameters' values (or one value for one parameter); `ids(*case)`
    names it.
    """
    params = []
    for case in cases:
        values = case if isinstance(case, tuple) else (case,)
        marks = () if fast(*values) else (pytest.mark.slow,)
        params.append(pytest.param(*values, marks=marks, id=ids(*values) if ids else None))
    return params


@pytest.fixture(autouse=True)
def isolated_global_state():
    """Each test starts from the same global random state and the float32 policy.

    `keras.utils.set_random_seed` seeds Python's `random`, NumPy's global
    generator, TensorFlow's global seed (which also restarts its op-seed
    counter) and Keras' global SeedGenerator. Without this, a test that sets
    a seed (or draws from an unseeded generator) changes what every later
    test in the same process draws, so results would depend on the order and
    on how pytest-xdist spreads the tests over its workers. A mixed precision
    policy left behind by a failed test is reset too.
    """
    keras.utils.set_random_seed(TEST_SEED)
    yield
    keras.mixed_precision.set_global_policy("float32")


def linear_data(n: int = 16, seed: int = 0):
    """n examples (x, y) and weights (w, b) of a linear softmax model, from `seed`."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, NUM_FEATURES)).astype("float32")
    y = rng.integers(0, NUM_CLASSES, size=n)
    w = rng.normal(scale=0.5, size=(NUM_FEATURES, NUM_CLASSES)).astype("float32")
    b = rng.normal(scale=0.1, size=(NUM_CLASSES,)).astype("float32")
    return x, y, w, b


@pytest.fixture
def linear_problem():
    """Data and weights of a linear softmax model with no ties in |g|."""
    return linear_data(16)


@keras.saving.register_keras_serializable(package="keras_gradreg_tests")
class LinearNet(kgr.RegularizedModel):
    """Subclassed linear softmax model."""

    def __init__(self, units: int = NUM_CLASSES, activation=None, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.activation = activation
        self.dense = keras.layers.Dense(units, activation=activation)

    def call(self, x):
        return self.dense(x)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "activation": self.activation}


def linear_model(kind: str, regularizer, w=None, b=None, activation=None):
    """A linear model (logits = x W + b) built as `kind`."""
    if kind == "sequential":
        plain = keras.Sequential(
            [keras.Input((NUM_FEATURES,)), keras.layers.Dense(NUM_CLASSES, activation=activation)]
        )
        model = kgr.regularize(plain, regularizer)
    elif kind == "functional":
        inputs = keras.Input((NUM_FEATURES,))
        outputs = keras.layers.Dense(NUM_CLASSES, activation=activation)(inputs)
        model = kgr.RegularizedModel(inputs, outputs, regularizer=regularizer)
    elif kind == "subclassed":
        model = LinearNet(activation=activation, regularizer=regularizer)
        model(np.zeros((1, NUM_FEATURES), "float32"))
    else:
        raise ValueError(kind)
    if w is not None:
        model.set_weights([w, b])
    return model


def plain_linear_model(w, b) -> keras.Model:
    """The unregularized linear model (logits = x w + b), as a Sequential."""
    model = keras.Sequential([keras.Input((NUM_FEATURES,)), keras.layers.Dense(NUM_CLASSES)])
    model.set_weights([w, b])
    return model


def compile_sgd(model, lr=0.1, probabilities=False, **kwargs):
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=not probabilities)
    model.compile(optimizer=keras.optimizers.SGD(lr), loss=loss, **kwargs)
    return model


def dropout_twins(seed: int = 0):
    """A tanh net with and without a Dropout layer (shared weights), x and its labels.

    Dropout is the identity at inference: an attack that calls the model in
    inference mode finds the same points on both. The weights are drawn
    with NumPy, so the nets are the same under every Keras release.
    """
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(24, 36)).astype("float32")
    hidden = keras.layers.Dense(16, "tanh")
    head = keras.layers.Dense(10)
    inputs = keras.Input((36,))
    plain = keras.Model(inputs, head(hidden(inputs)))
    with_dropout = keras.Model(inputs, head(keras.layers.Dropout(0.5)(hidden(inputs))))
    for layer, fan_in, units in ((hidden, 36, 16), (head, 16, 10)):
        kernel = rng.normal(scale=fan_in**-0.5, size=(fan_in, units))
        layer.set_weights([kernel.astype("float32"), np.zeros(units, "float32")])
    return x, np.argmax(plain(x).numpy(), axis=1), plain, with_dropout
