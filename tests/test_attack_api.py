"""The attacks' one call shape: `return_correct=True` gives an `AttackResult`; twins warn."""

import math
import warnings

import keras
import numpy as np
import pytest
from attack_reference import distances, two_live_classes

from keras_gradreg import attacks
from keras_gradreg.attacks import auto_pgd, common

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

# Each attack with cheap settings, seeded, without the box (the linear model's inputs are normal).
CASES = {
    "fgsm": dict(loss=LOSS, clip=None),
    "pgd": dict(loss=LOSS, steps=5, clip=None, seed=1),
    "apgd": dict(steps=5, clip=None, seed=1),
    "fab": dict(targets=1, steps=5, clip=None, seed=1),
    "square": dict(queries=20, clip=None, seed=1),
}


@pytest.fixture(scope="module")
def linear():
    model, x, y, weights, bias = two_live_classes(n=40)
    dist = distances(x, y, weights, bias, math.inf)
    epsilon = float(np.median(dist[dist > 0]))
    return model, x, y, weights, bias, epsilon


def _correct_by_numpy(x_adv, y, weights, bias):
    logits = np.asarray(x_adv, np.float64).reshape(len(y), -1) @ weights + bias
    return np.argmax(logits, axis=1) == y


@pytest.mark.parametrize("name", sorted(CASES))
def test_return_correct_gives_the_points_and_their_correctness(linear, name):
    model, x, y, weights, bias, epsilon = linear
    attack = getattr(attacks, name)
    result = attack(model, x, y, epsilon, return_correct=True, **CASES[name])
    assert isinstance(result, attacks.AttackResult)
    x_adv, correct = result
    np.testing.assert_array_equal(x_adv, attack(model, x, y, epsilon, **CASES[name]))
    np.testing.assert_array_equal(correct, _correct_by_numpy(x_adv, y, weights, bias))
    # The attack did something: some examples closer than epsilon were broken.
    assert 0 < np.sum(~correct.numpy()) < len(y)


@pytest.mark.parametrize("name", sorted(CASES))
def test_deprecated_twins_warn_and_return_the_same_values(linear, name):
    model, x, y, _, _, epsilon = linear
    new = getattr(attacks, name)(model, x, y, epsilon, return_correct=True, **CASES[name])
    twin = getattr(attacks, f"{name}_with_correct")
    with pytest.warns(
        DeprecationWarning, match=rf"use `kgr\.attacks\.{name}\(\.\.\., return_correct=True\)`"
    ):
        old = twin(model, x, y, epsilon, **CASES[name])
    assert isinstance(old, attacks.AttackResult)
    np.testing.assert_array_equal(old.x_adv, new.x_adv)
    np.testing.assert_array_equal(old.correct, new.correct)
    assert f"{name}_with_correct" not in attacks.__all__


def test_return_correct_must_be_a_bool(linear):
    model, x, y, _, _, epsilon = linear
    for name in sorted(CASES):
        with pytest.raises(ValueError, match=r"Received: return_correct='yes'"):
            getattr(attacks, name)(model, x, y, epsilon, return_correct="yes", **CASES[name])


def test_internal_names_left_the_attacks_namespace_with_a_warning():
    for name, module in (("checkpoints", auto_pgd), ("compiled_kernel", common)):
        assert name not in attacks.__all__
        with pytest.warns(DeprecationWarning, match=rf"`kgr\.attacks\.{name}` is internal"):
            found = getattr(attacks, name)
        assert found is getattr(module, name)
    with pytest.raises(AttributeError):
        attacks.no_such_attack  # noqa: B018
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert attacks.apgd is auto_pgd.apgd  # public names do not warn


def test_one_restarts_check_for_every_attack(linear):
    model, x, y, _, _, epsilon = linear
    match = r"Restarts without a random start repeat the same attack.*restarts=3"
    with pytest.raises(ValueError, match=match):
        common.check_restarts(3, False)
    assert common.check_restarts(3, True) == 3 and common.check_restarts(1, False) == 1
    for attack, args in ((attacks.pgd, dict(loss=LOSS)), (attacks.apgd, {})):
        with pytest.raises(ValueError, match=match):
            attack(model, x, y, epsilon, restarts=3, random_start=False, clip=None, **args)
