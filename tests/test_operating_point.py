import math

import numpy as np
import pytest

from eval.metrics.operating_point import fairness_discrepancy_rate, global_threshold, operating_point, operating_points

# Two groups, 5 impostor and 3 genuine squared distances each (a match is distance < threshold).
HAND = {
    "A": (np.array([0.5, 1.2, 1.5, 1.8, 2.0, 0.2, 0.9, 1.3]), np.array([0, 0, 0, 0, 0, 1, 1, 1], bool)),
    "B": (np.array([0.8, 1.0, 1.6, 1.9, 2.2, 0.4, 1.25, 1.7]), np.array([0, 0, 0, 0, 0, 1, 1, 1], bool)),
}


def test_rates_at_the_global_threshold_match_a_direct_count():
    # Pooled impostors sorted: 0.5 0.8 1.0 1.2 1.5 1.6 1.8 1.9 2.0 2.2; FMR 0.3 of 10 allows 3 false matches,
    # so the threshold is the 4th smallest, 1.2: false matches 0.5 | 0.8, 1.0 (1.2 itself is not < 1.2).
    point = operating_point(HAND, 0.3)
    assert point.threshold == 1.2
    assert point.pooled_fmr == pytest.approx(0.3)
    assert point.fmr == pytest.approx({"A": 1 / 5, "B": 2 / 5})
    # false non-matches (genuine distance >= 1.2): A: 1.3 | B: 1.25, 1.7
    assert point.fnmr == pytest.approx({"A": 1 / 3, "B": 2 / 3})
    assert point.fmr_ratio == pytest.approx(2.0) and point.fnmr_ratio == pytest.approx(2.0)
    # FDR(alpha=0.5) = 1 - (0.5 * (0.4 - 0.2) + 0.5 * (2/3 - 1/3)) = 1 - 0.1 - 1/6
    assert point.fdr == pytest.approx(1 - 0.1 - 1 / 6)
    for group, (d, s) in HAND.items():  # the same numbers from a plain loop
        assert point.fmr[group] == sum(x < point.threshold for x in d[~s]) / 5
        assert point.fnmr[group] == sum(x >= point.threshold for x in d[s]) / 3


def test_fdr_worked_example_from_the_definition():
    # de Freitas Pereira & Marcel (T-BIOM 2022) give FDR only as a definition and plots, no table of numbers;
    # this example is worked by hand from FDR = 1 - (alpha * A + (1 - alpha) * B):
    # FMR   0.001 0.002 0.0005 0.004 -> A = 0.004 - 0.0005 = 0.0035
    # FNMR  0.05  0.03  0.08   0.02  -> B = 0.08 - 0.02   = 0.06
    # alpha 0.5:  1 - (0.00175 + 0.03)  = 0.96825
    # alpha 0.25: 1 - (0.000875 + 0.045) = 0.954125
    fmr, fnmr = [0.001, 0.002, 0.0005, 0.004], [0.05, 0.03, 0.08, 0.02]
    assert fairness_discrepancy_rate(fmr, fnmr) == pytest.approx(0.96825)
    assert fairness_discrepancy_rate(fmr, fnmr, alpha=0.25) == pytest.approx(0.954125)
    assert fairness_discrepancy_rate([0.1] * 4, [0.2] * 4) == 1.0  # equal rates: perfectly fair
    assert fairness_discrepancy_rate([0.0, 1.0], [0.0, 1.0]) == 0.0  # the least fair case
    with pytest.raises(ValueError, match="fractions"):
        fairness_discrepancy_rate([1.5], [0.1])


def test_unmeasurable_targets_are_left_out():
    assert operating_point(HAND, 0.05) is None  # 10 impostors cannot measure FMR 0.05
    assert [p.target_fmr for p in operating_points(HAND, targets=(0.05, 0.1, 0.3))] == [0.1, 0.3]


def test_identical_scores_for_every_pair_give_a_clear_result():
    issame = np.array([0, 1] * 100, bool)
    pairs = {g: (np.full(200, 1.0), issame) for g in ("A", "B")}
    point = operating_point(pairs, 0.01)
    # every impostor ties at the threshold, so none is a false match and every genuine pair is rejected
    assert point.fmr == {"A": 0.0, "B": 0.0} and point.fnmr == {"A": 1.0, "B": 1.0}
    assert math.isnan(point.fmr_ratio) and point.fnmr_ratio == 1.0 and point.fdr == 1.0


def test_global_threshold_never_exceeds_the_target():
    rng = np.random.default_rng(0)
    imp = rng.normal(2.0, 0.3, 1000)
    for target in (1e-3, 1e-2, 0.29):
        threshold = global_threshold(imp, target)
        assert np.mean(imp < threshold) == pytest.approx(target)
    with pytest.raises(ValueError, match="impostor"):
        operating_point({"A": (np.ones(3), np.ones(3, bool))}, 0.1)
