import math

import pytest

from eval.metrics.fairness import fairness_metrics


def test_hand_computed_avg_std_ser():
    out = fairness_metrics({"African": 90.0, "Asian": 95.0, "Caucasian": 98.0, "Indian": 97.0})
    assert out["avg"] == pytest.approx(95.0)
    # population std: sqrt(((-5)^2 + 0^2 + 3^2 + 2^2) / 4) = sqrt(9.5)
    assert out["std"] == pytest.approx(math.sqrt(9.5))
    # SER = worst error / best error = (100 - 90) / (100 - 98)
    assert out["ser"] == pytest.approx(5.0)


def test_equal_accuracies_are_perfectly_fair():
    out = fairness_metrics({"a": 93.5, "b": 93.5})
    assert out == {"avg": 93.5, "std": 0.0, "ser": pytest.approx(1.0)}


def test_zero_best_error_gives_inf_and_no_error_gives_nan():
    assert math.isinf(fairness_metrics({"a": 100.0, "b": 99.0})["ser"])
    assert math.isnan(fairness_metrics({"a": 100.0, "b": 100.0})["ser"])


def test_invalid_inputs():
    with pytest.raises(ValueError, match="at least one"):
        fairness_metrics({})
    with pytest.raises(ValueError, match="'b'.*percentage"):
        fairness_metrics({"a": 90.0, "b": 101.0})
