"""Tests for kgr.attacks.apgd: the published schedule, a NumPy reference, golden linear cases."""

import math

import attack_reference as ref
import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import fast_slice

from keras_gradreg import attacks
from keras_gradreg.attacks import auto_pgd
from keras_gradreg.attacks.common import compiled_kernel

# ---------------------------------------------------------------------- #
# The schedule.
# ---------------------------------------------------------------------- #


def test_checkpoints_follow_the_published_recurrence():
    # By hand for 100 steps: p = .22, .41, .57, .70, .80, .87, .93, .99.
    assert auto_pgd.checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    # 10 steps: ceil(2.2), ceil(4.1), ceil(5.7), 7, 8, ceil(8.7), ceil(9.3); 9.9 repeats 10.
    assert auto_pgd.checkpoints(10) == [3, 5, 6, 7, 8, 9, 10]
    for steps in (1, 7, 33, 100, 250, 1000):
        assert auto_pgd.checkpoints(steps) == ref.checkpoints(steps)


def _kernel(model, p, steps, loss="ce", targeted=False, random_start=False):
    return compiled_kernel(
        model,
        None,
        auto_pgd._apgd_fn,
        resolve=False,
        from_logits=True,
        p=p,
        steps=steps,
        objective_name=loss,
        targeted=targeted,
        rho=0.75,
        random_start=random_start,
    )


def test_step_halves_at_every_checkpoint_when_the_loss_never_rises():
    """A model whose output ignores x: no step raises the loss (condition 1)."""
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Lambda(lambda x: 0.0 * x[:, :3] + [2.0, 0.0, 1.0])]
    )
    x = tf.constant(np.random.default_rng(0).uniform(size=(4, 5)), tf.float32)
    label = tf.zeros([4], tf.int32)
    for steps in (10, 100):
        result = _kernel(model, math.inf, steps)(x, label, label, 0.1, 0.0, 1.0, [0, 0])
        halvings = len(auto_pgd.checkpoints(steps))
        np.testing.assert_allclose(result.step_size, 0.2 * 0.5**halvings, rtol=1e-6)


@pytest.mark.parametrize("p", [math.inf, 2.0])
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_equals_a_numpy_reference_step_for_step(p, loss):
    """A tanh network in float64, APGD from x without a box: the best point, its
    loss and the final step size equal a per-example NumPy implementation. (L2
    runs 15 steps: later, the loss changes by 1e-12 per step on the sphere and
    rounding decides whether it rose; at 20 steps one example of 9 halved once
    more on TensorFlow 2.16 than in NumPy.)"""
    net = ref.TanhNet(inputs=6, hidden=8, classes=4, seed=1)
    model = net.keras_model()
    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 6))
    label = np.argmax(net.logits(x), axis=1).astype("int32")  # all correct
    epsilon, steps = (0.05, 60) if math.isinf(p) else (0.2, 15)
    kernel = _kernel(model, p, steps, loss)
    got = kernel(tf.constant(x), label, label, tf.constant(epsilon, tf.float64), None, None, [0, 0])
    loss_fn = ref.cross_entropy if loss == "ce" else ref.dlr
    for i in range(len(x)):

        def loss_and_gradient(point, i=i):
            value, logit_gradient = loss_fn(net.logits(point), label[i])
            return value, net.input_gradient(point, logit_gradient)

        best_x, best_loss, step = ref.apgd(loss_and_gradient, x[i], x[i], epsilon, p, steps)
        if not got.correct[i]:
            continue  # Broken: the kernel may stop before the reference does.
        # Rounding differs (float64, 60 steps); any difference in logic is far larger.
        np.testing.assert_allclose(got.best_loss[i], best_loss, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(got.x_adv[i], best_x, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(got.step_size[i], step, rtol=1e-12)
    assert np.sum(got.correct) >= 6  # most examples were compared
    assert np.min(got.step_size) < 2 * epsilon  # and steps were halved


# ---------------------------------------------------------------------- #
# Golden linear models: the minimal adversarial distance is known.
# ---------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "kwargs, p",
    # Fast: each loss at one norm, both norms; CI runs the other three.
    fast_slice(
        [
            (kwargs, p)
            for kwargs in (dict(loss="ce"), dict(loss="dlr"), dict(loss="dlr", targeted=True))
            for p in (math.inf, 2.0)
        ],
        lambda kwargs, p: (p == 2.0) == (kwargs == dict(loss="dlr")),
        ids=lambda kwargs, p: f"{'-'.join(map(str, kwargs.values()))}-{p}",
    ),
)
def test_apgd_fools_exactly_the_examples_closer_than_epsilon(kwargs, p):
    model, x, y, weights, bias = ref.two_live_classes()
    dist = ref.distances(x, y, weights, bias, p)
    epsilon = float(np.median(dist[dist > 0]))
    x_adv, correct = attacks.apgd(
        model, x, y, epsilon, p, clip=None, seed=0, **kwargs, return_correct=True
    )
    keep = np.abs(dist - epsilon) > 0.01 * epsilon
    fooled = ~correct.numpy()
    np.testing.assert_array_equal(fooled[keep], dist[keep] < epsilon)
    assert 20 < np.sum(keep & (dist < epsilon)) and 20 < np.sum(keep & (dist > epsilon))
    # The correctness returned is that of the returned points, which lie in the ball.
    predicted = np.argmax(model.predict(x_adv, verbose=0), axis=1)
    np.testing.assert_array_equal(predicted != y, fooled)
    norms = np.linalg.norm((x_adv.numpy() - x).reshape(len(x), -1), ord=p, axis=1)
    assert np.all(norms <= epsilon * (1 + 1e-5))


# ---------------------------------------------------------------------- #
# Constraints, seeds, monotonicity.
# ---------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def image_net():
    model, x, y = ref.small_conv_classifier((6, 6, 1))
    y[:3] = (y[:3] + 1) % 10  # three misclassified at x
    return model, x, y


@pytest.mark.parametrize("p, epsilon", [(math.inf, 0.05), (2.0, 0.3)])
@pytest.mark.parametrize("kwargs", [dict(), dict(loss="dlr", targeted=True, target_classes=3)])
def test_apgd_stays_in_ball_and_box_and_reproduces(image_net, p, epsilon, kwargs):
    model, x, y = image_net
    args = dict(p=p, steps=20, seed=3, **kwargs)
    a, correct = attacks.apgd(model, x, y, epsilon, **args, return_correct=True)
    b = attacks.apgd(model, x, y, epsilon, **args)
    c = attacks.apgd(model, x, y, epsilon, **{**args, "seed": 4})
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    a = a.numpy()
    norms = np.linalg.norm((a - x).reshape(len(x), -1), ord=p, axis=1)
    assert np.all(norms <= epsilon * (1 + 1e-5))
    assert a.min() >= 0.0 and a.max() <= 1.0
    # Examples misclassified at x are returned unchanged and counted as broken.
    np.testing.assert_array_equal(a[:3], x[:3])
    assert not np.any(correct.numpy()[:3])
    np.testing.assert_array_equal(
        np.argmax(model.predict(a, verbose=0), axis=1) == y, correct.numpy()
    )


def test_more_restarts_and_more_targets_never_raise_correctness(image_net):
    """Per example: runs are nested (restart r of target t draws from the same seed
    whatever the totals), so a larger budget can only break more examples."""
    model, x, y = image_net
    epsilon = 0.03  # with one step per run, where more runs break more
    one = attacks.apgd(model, x, y, epsilon, steps=1, seed=0, return_correct=True)[1].numpy()
    more = attacks.apgd(model, x, y, epsilon, steps=1, restarts=4, seed=0, return_correct=True)[1]
    assert np.all(more.numpy() <= one)
    assert np.sum(more.numpy()) < np.sum(one)  # the restarts did something
    targeted = dict(loss="dlr", targeted=True, steps=1, seed=0)
    few = attacks.apgd(model, x, y, epsilon, target_classes=1, **targeted, return_correct=True)[1]
    many = attacks.apgd(model, x, y, epsilon, target_classes=9, **targeted, return_correct=True)[1]
    assert np.all(many.numpy() <= few.numpy())
    assert np.sum(many.numpy()) < np.sum(few.numpy())


def test_probability_outputs_give_the_logits_result_for_dlr():
    """DLR is invariant to a per-example shift of the scores, and log-probabilities
    are the logits shifted: a softmax model is attacked exactly like its logits
    (float64, so rounding does not decide near-ties differently)."""
    net = ref.TanhNet(inputs=6, hidden=8, classes=5, seed=3)
    model = net.keras_model()
    inputs = keras.Input((6,), dtype="float64")
    softmax = keras.Model(inputs, keras.layers.Softmax(dtype="float64")(model(inputs)))
    x = np.random.default_rng(5).normal(size=(30, 6))
    y = np.argmax(net.logits(x), axis=1)
    for p, epsilon in ((math.inf, 0.1), (2.0, 0.3)):
        args = dict(p=p, loss="dlr", steps=15, seed=1, clip=None)
        logits, logits_correct = attacks.apgd(model, x, y, epsilon, **args, return_correct=True)
        probs, probs_correct = attacks.apgd(
            softmax, x, y, epsilon, from_logits=False, **args, return_correct=True
        )
        np.testing.assert_array_equal(logits_correct, probs_correct)
        np.testing.assert_allclose(logits, probs, atol=1e-9)
        assert 0 < np.sum(logits_correct) < len(x)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(epsilon=-1.0), r"Received: epsilon=-1\.0"),
        (dict(p=1), r"Received: p=1\.0"),
        (dict(loss="cw"), r"Received: loss='cw'"),
        (dict(targeted="yes"), r"Received: targeted='yes'"),
        (dict(target_classes=0), r"Received: target_classes=0"),
        (dict(steps=0), r"Received: steps=0"),
        (dict(restarts=2, random_start=False), r"Received: restarts=2"),
        (dict(rho=0.0), r"Received: rho=0\.0"),
        (dict(clip=(1, 0)), r"Received: clip=\(1, 0\)"),
        (dict(seed=1.5), r"Received: seed=1\.5"),
        (dict(y=None), r"Received: y=None"),
        (dict(return_correct="yes"), r"`return_correct` .*Received: return_correct='yes'"),
    ],
)
def test_apgd_rejects_bad_arguments(image_net, kwargs, match):
    model, x, y = image_net
    args = dict(model=model, x=x, y=y, epsilon=0.1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        attacks.apgd(**args)


def test_dlr_needs_enough_classes():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    x = np.zeros((2, 4), "float32")
    targeted = r"^The targeted DLR loss needs at least 4 classes; the model has 3"
    with pytest.raises(ValueError, match=targeted):
        attacks.apgd(model, x, [0, 1], 0.1, loss="dlr", targeted=True)
    binary = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    untargeted = r"^The DLR loss needs at least 3 classes; the model has 2"
    with pytest.raises(ValueError, match=untargeted):
        attacks.apgd(binary, x, [0, 1], 0.1, loss="dlr")
