"""keras_gradreg.robustness.flags on hand-made numbers: cases added to kill mutants.

Each check at its threshold (not flagged) and just above it (flagged, with
the numbers the explanation must carry, computed by hand); the order of the
accuracy points (norms by value, then epsilon) and the rows skipped
(docs/testing.md, "Mutation testing"). tests/test_robustness.py has the
checks on real reports.
"""

from __future__ import annotations

import pytest

from keras_gradreg.robustness import flags as flags_lib


def _evidence(**changes):
    values = dict(
        clean_accuracy=0.9, cascade=False, tolerance=0.01, zero_share=0.0, zero_threshold=0.05,
        from_logits=None, probability_share=0.0, outside_unit_share=0.0, masked={},
        masking_threshold=0.005, output_change=0.0, large_epsilon=None,
    )  # fmt: skip
    values.update(changes)
    return flags_lib.Evidence(**values)


def _row(attack, p, epsilon, accuracy):
    return {"attack": attack, "p": p, "epsilon": epsilon, "accuracy": accuracy}


def test_quiet_evidence_raises_nothing():
    assert flags_lib.sanity_flags([], _evidence()) == {}


@pytest.mark.parametrize(
    "changes, flagged, text",
    [
        (dict(output_change=1e-5), None, None),
        (dict(output_change=2e-5), "randomized_outputs", "difference 2e-05"),
        (dict(large_epsilon=(1.0, 0.0, 100)), None, None),
        (dict(large_epsilon=(1.0, 0.01, 100)), "large_epsilon_not_broken", "left 1.00% of 100"),
        (dict(zero_share=0.05), None, None),
        (dict(zero_share=0.06), "zero_gradients", "6.0% of examples"),
        (dict(zero_share=0.15, zero_threshold=0.1), "zero_gradients",
         "15.0% of examples have an exactly-zero input gradient (threshold 10.0%)"),
        (dict(zero_share=0.5, zero_threshold=0.6), None, None),
        (dict(from_logits=True, probability_share=0.99), None, None),
        (dict(from_logits=True, probability_share=0.995), "probabilities_with_logits_loss",
         "99.5%"),
        (dict(from_logits=None, probability_share=1.0), None, None),
        (dict(from_logits=False, probability_share=1.0), None, None),
        (dict(from_logits=False, outside_unit_share=0.01), None, None),
        (dict(from_logits=False, outside_unit_share=0.02), "logits_with_probability_loss", "2.0%"),
        (dict(from_logits=False, outside_unit_share=0.5), "logits_with_probability_loss",
         "50.0% of outputs lie outside [0, 1]"),
        (dict(from_logits=True, outside_unit_share=1.0), None, None),
        (dict(from_logits=None, outside_unit_share=1.0), None, None),
        (dict(masked={("inf", 0.1): 0.005}), None, None),
        (dict(masked={(2, 0.5): 0.006, ("inf", 0.1): 0.001}), "gradient_masking",
         "(p=2 epsilon=0.5: 0.60% of examples; threshold 0.50%)"),
    ],
)  # fmt: skip
def test_evidence_checks_at_and_above_their_thresholds(changes, flagged, text):
    flags = flags_lib.sanity_flags([], _evidence(**changes))
    if flagged is None:
        assert flags == {}
    else:
        assert set(flags) == {flagged}
        assert text in flags[flagged]


def test_accuracy_must_fall_with_epsilon_per_attack_and_norm():
    """Points in order of (p as a number, epsilon); the clean accuracy comes first."""
    rows = [
        _row("pgd", "inf", 0.3, 0.5),  # 0.5 > 0.2 + 0.01 at the previous epsilon, 0.2
        _row("pgd", "inf", 0.2, 0.2),
        _row("pgd", 2, 1.0, 0.91),  # 0.91 = clean 0.9 + tolerance: not flagged
        _row("pgd", 2, 2.0, 0.95),  # above 0.91 + 0.01
        _row("pgd", 1, 5.0, 0.92),  # above clean 0.9 + 0.01
        _row("noise", "inf", 0.3, 0.99),  # noise is not an attack
        _row("fgsm", "inf", 0.2, 0.3),  # fgsm has no row at 0.3 (skipped): no flag
    ]
    flags = flags_lib.sanity_flags(rows, _evidence(cascade=True))
    assert set(flags) == {"accuracy_not_decreasing"}
    assert flags["accuracy_not_decreasing"] == (
        "pgd p=1: 90.00% at epsilon=0 but 92.00% at epsilon=5; "
        "pgd p=2: 91.00% at epsilon=1 but 95.00% at epsilon=2; "
        "pgd p=inf: 20.00% at epsilon=0.2 but 50.00% at epsilon=0.3"
    )


def test_pgd_above_fgsm_beyond_the_tolerance():
    rows = [
        _row("fgsm", 2, 0.5, 0.5),
        _row("pgd", 2, 0.5, 0.51),  # at the tolerance
        _row("fgsm", "inf", 0.1, 0.6),
        _row("pgd", "inf", 0.1, 0.62),
    ]
    flags = flags_lib.sanity_flags(rows, _evidence(clean_accuracy=1.0))
    assert flags == {"pgd_weaker_than_fgsm": "p=inf epsilon=0.1: pgd 62.00% > fgsm 60.00%"}
    assert flags_lib.sanity_flags(rows[2:], _evidence(clean_accuracy=1.0, cascade=True)) == {}
    only_pgd = [r for r in rows if r["attack"] == "pgd"]
    assert flags_lib.sanity_flags(only_pgd, _evidence(clean_accuracy=1.0)) == {}


def test_noise_below_the_worst_case_beyond_the_tolerance():
    rows = [
        _row("worst_case", "inf", 0.1, 0.5),
        _row("noise", "inf", 0.1, 0.49),  # at the tolerance
        _row("worst_case", "inf", 0.2, 0.4),
        _row("noise", "inf", 0.2, 0.38),
        _row("noise", 2, 1.0, 0.0),  # no worst case there: skipped
        _row("worst_case", 1, 1.0, 0.3),  # no noise there: skipped
    ]
    flags = flags_lib.sanity_flags(rows, _evidence(clean_accuracy=1.0))
    assert flags == {
        "noise_stronger_than_attack": "p=inf epsilon=0.2: noise 38.00% < best attack 40.00%"
    }


def test_a_missing_point_is_skipped_not_the_end_of_the_curve():
    """pgd has no row at epsilon=0.1 (only the worst case has): its later points are still read."""
    rows = [
        _row("worst_case", "inf", 0.1, 0.1),
        _row("pgd", "inf", 0.2, 0.3),
        _row("pgd", "inf", 0.3, 0.5),
    ]
    flags = flags_lib.sanity_flags(rows, _evidence(cascade=True))
    assert flags == {
        "accuracy_not_decreasing": "pgd p=inf: 30.00% at epsilon=0.2 but 50.00% at epsilon=0.3"
    }
