"""The shared argument checks: accepted values, canonical forms, messages."""

from __future__ import annotations

import math

import numpy as np
import pytest

from keras_gradreg import _checks


@pytest.mark.parametrize("value", [0, 1.5, np.int64(3), np.float32(0.25), -2.0])
def test_numbers(value):
    assert _checks.is_number(value)
    assert isinstance(_checks.check_number(value, "v"), float)


@pytest.mark.parametrize("value", [True, np.bool_(False), "1", None, [1.0], np.ones(2)])
def test_not_numbers(value):
    assert not _checks.is_number(value)
    with pytest.raises(ValueError, match=r"`v` must be a number\. Received: v="):
        _checks.check_number(value, "v")


@pytest.mark.parametrize(
    "check, good, bad, message",
    [
        (
            _checks.check_nonnegative,
            [0, 0.5, np.float64(2)],
            [-0.1, math.inf, math.nan, True],
            "must be a finite number >= 0",
        ),
        (
            _checks.check_positive,
            [1e-9, 3],
            [0, -1, math.inf, math.nan, False],
            "must be a finite number > 0",
        ),
        (_checks.check_unit_interval, [0, 0.5, 1], [-0.1, 1.5, math.nan, True], "in \\[0, 1\\]"),
        (_checks.check_count, [1, np.int32(7)], [0, -3, 2.0, True, "2"], "an integer >= 1"),
    ],
)
def test_ranges(check, good, bad, message):
    for value in good:
        assert check(value, "arg") == value
    for value in bad:
        with pytest.raises(ValueError, match=r"`arg` (must )?.*Received: arg="):
            check(value, "arg")
    with pytest.raises(ValueError, match=message):
        check(bad[0], "arg")


def test_count_returns_a_python_int():
    assert type(_checks.check_count(np.int64(4), "steps")) is int


def test_nan_message():
    with pytest.raises(ValueError, match=r"`sigma` must not be NaN\. Received: sigma=nan"):
        _checks.check_number(math.nan, "sigma")


def test_seed():
    assert _checks.check_seed(None) is None
    assert _checks.check_seed(np.int64(3)) == 3
    for bad in ("a", 1.5, True):
        with pytest.raises(ValueError, match=r"`seed` must be an integer or None\. Received: "):
            _checks.check_seed(bad)


def test_choice():
    assert _checks.check_choice("b", "mode", ("a", "b")) == "b"
    with pytest.raises(ValueError, match=r"must be one of \('a', 'b'\)\. Received: mode='c'"):
        _checks.check_choice("c", "mode", ("a", "b"))
    with pytest.raises(ValueError, match=r"Received: mode=array"):
        _checks.check_choice(np.array([1, 2]), "mode", ("a", "b"))


def test_clip():
    assert _checks.check_clip(None) is None
    assert _checks.check_clip([0, 1]) == (0, 1)
    low, high = np.zeros(3), np.ones(3)
    checked = _checks.check_clip([low, high])
    # The same bounds, as a tuple (arrays are not copied or converted).
    assert type(checked) is tuple and len(checked) == 2
    assert checked[0] is low and checked[1] is high
    # Ordered everywhere, against a scalar too.
    assert _checks.check_clip((np.zeros(3), 0.5))[1] == 0.5
    bad_pairs = ((1, 0), (0, 0), (0,), "01", (0, "a"), (np.zeros(2), np.array([1.0, 0.0])))
    for bad in bad_pairs:
        with pytest.raises(ValueError, match=r"`clip` must be .*Received: clip="):
            _checks.check_clip(bad)


def test_inf_as_text_writes_infinities_for_json_and_keeps_other_values():
    assert _checks.inf_as_text(math.inf) == "inf" and _checks.inf_as_text(-math.inf) == "-inf"
    assert _checks.inf_as_text(np.float32(np.inf)) == "inf"
    assert [_checks.inf_as_text(v) for v in (2.0, 0, "inf", None, True)] == [
        2.0,
        0,
        "inf",
        None,
        True,
    ]


def test_rate_count_minimum_and_the_one_wording():
    assert _checks.check_rate(0, "rate") == 0.0 and _checks.check_rate(0.5, "rate") == 0.5
    for bad in (1.0, -0.1, True, "0.5"):
        with pytest.raises(
            ValueError, match=rf"`rate` must be a number in \[0, 1\)\. Received: rate={bad!r}$"
        ):
            _checks.check_rate(bad, "rate")
    assert _checks.check_count(0, "epochs", minimum=0) == 0
    with pytest.raises(
        ValueError, match=r"`classes` must be an integer >= 2\. Received: classes=1$"
    ):
        _checks.check_count(1, "classes", minimum=2)
    with pytest.raises(ValueError, match=r"^`x` must be a path\. Received: x=3$"):
        _checks.fail("x", "a path", 3)
