"""The suite's APGD-CE and Square against the Adversarial Robustness Toolbox (ART).

An independent implementation of the same published attacks: on a small MLP
trained for a few seconds on MNIST, robust accuracy on 500 test images must
agree within 2 points. ART is a test-only dependency (the `test` extra).

Known differences of ART 1.20's SquareAttack from the paper (and from the
suite, which follows the authors' code): it keeps the vertical-stripe start
only where it lowered the margin, draws one window position and one sign per
channel for the whole batch at each iteration, and never places a window on
the last row or column. They make it slightly weaker: measured here 0.5 to
1.3 points at L-inf 0.03 over seeds (1000 queries), 2 points at 0.05.
"""

from __future__ import annotations

import math
import os
import warnings

import keras
import numpy as np
import pytest

from keras_gradreg import attacks

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "PyTorch not found": ART's optional parts.
    art = pytest.importorskip("art")
    from art.attacks.evasion import AutoProjectedGradientDescent, SquareAttack
    from art.estimators.classification import TensorFlowV2Classifier

MNIST = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist.npz")
IMAGES = 500
EPSILON = 0.03  # L-inf; robust accuracy about 75% here, far from 0 and 100%
SQUARE_QUERIES = 1000

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(MNIST), reason="no MNIST file at ../shared/data"),
]


@pytest.fixture(scope="module")
def trained():
    """A 784-100-10 ReLU MLP, 2 epochs of Adam on 10k MNIST images (about 3 s)."""
    with np.load(MNIST) as data:
        x_train = data["x_train"][:10000, :, :, None].astype("float32") / 255.0
        y_train = data["y_train"][:10000]
        x_test = data["x_test"][:IMAGES, :, :, None].astype("float32") / 255.0
        y_test = data["y_test"][:IMAGES].astype("int64")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(100, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
    model.fit(x_train, y_train, batch_size=100, epochs=2, verbose=0)
    classifier = TensorFlowV2Classifier(
        model, nb_classes=10, input_shape=(28, 28, 1), loss_object=loss, clip_values=(0.0, 1.0)
    )
    clean = np.argmax(model.predict(x_test, verbose=0), axis=1) == y_test
    assert clean.mean() > 0.85
    return model, classifier, x_test, y_test, clean


def _robust(model, x_adv, y, clean):
    """Correct at x and at x_adv (checked here, not taken from either toolkit)."""
    return clean & (np.argmax(model.predict(x_adv, verbose=0), axis=1) == y)


def _check_ball(x_adv, x):
    assert np.max(np.abs(x_adv - x)) <= EPSILON * (1 + 1e-5)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


def test_apgd_ce_agrees_with_art(trained):
    model, classifier, x, y, clean = trained
    ours, _ = attacks.apgd(model, x, y, EPSILON, math.inf, loss="ce", seed=0, return_correct=True)
    np.random.seed(0)  # ART's random start
    theirs = AutoProjectedGradientDescent(
        classifier,
        norm=np.inf,
        eps=EPSILON,
        eps_step=2 * EPSILON,
        max_iter=100,
        nb_random_init=1,
        batch_size=IMAGES,
        loss_type="cross_entropy",
        verbose=False,
    ).generate(x, y)
    for x_adv in (ours.numpy(), theirs):
        _check_ball(x_adv, x)
    ours_acc = _robust(model, ours.numpy(), y, clean).mean()
    theirs_acc = _robust(model, theirs, y, clean).mean()
    print(f"APGD-CE robust accuracy: suite {ours_acc:.3f}, ART {theirs_acc:.3f}")
    assert 0.2 < ours_acc < clean.mean() - 0.1  # the attack does something, not everything
    assert abs(ours_acc - theirs_acc) <= 0.02


def test_square_agrees_with_art(trained):
    model, classifier, x, y, clean = trained
    ours, _ = attacks.square(
        model, x, y, EPSILON, queries=SQUARE_QUERIES, seed=0, return_correct=True
    )
    np.random.seed(0)
    theirs = SquareAttack(
        classifier,
        norm=np.inf,
        eps=EPSILON,
        max_iter=SQUARE_QUERIES,
        p_init=0.8,
        nb_restarts=1,
        batch_size=IMAGES,
        verbose=False,
    ).generate(x, y)
    for x_adv in (ours.numpy(), theirs):
        _check_ball(x_adv, x)
    ours_acc = _robust(model, ours.numpy(), y, clean).mean()
    theirs_acc = _robust(model, theirs, y, clean).mean()
    print(f"Square robust accuracy: suite {ours_acc:.3f}, ART {theirs_acc:.3f}")
    assert 0.2 < ours_acc < clean.mean() - 0.1
    assert abs(ours_acc - theirs_acc) <= 0.02
