import math

import numpy as np
import pytest

from eval.metrics.bootstrap import (
    Bootstrap, bootstrap_accuracies, bootstrap_fairness, draw_resamples, fairness_arrays, paired_comparison
)
from eval.metrics.fairness import fairness_metrics
from eval.metrics.protocol import kfold_accuracy

# True error rates of a simulated model (see _simulated_pairs): accuracy 95, 90, 85, 92 %.
TRUE_ERRORS = {"African": 0.05, "Asian": 0.10, "Caucasian": 0.15, "Indian": 0.08}


def _labels(n: int) -> np.ndarray:
    """RFW layout: each fold holds half genuine, half impostor pairs."""
    return np.tile(np.r_[np.ones(n // 20, bool), np.zeros(n // 20, bool)], 10)


def _simulated_pairs(rng: np.random.Generator, error: float, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """A model whose protocol accuracy is exactly 1 - error in expectation: matched-looking distances lie in
    [0.2, 0.5), the others in [2, 3), and each pair lands on the wrong side with probability ``error``. Every
    threshold between the clusters is as good, the protocol picks one in (0.5, 0.51] (the first best on the
    grid), so the held-out accuracy is the share of pairs on their right side."""
    issame = _labels(n)
    wrong = rng.random(n) < error
    distances = np.where(issame != wrong, rng.uniform(0.2, 0.5, n), rng.uniform(2.0, 3.0, n))
    return distances, issame


def _model_pairs(rng: np.random.Generator, n: int = 600, spread: float = 0.4) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    issame = _labels(n)
    return {g: (np.where(issame, rng.normal(1.0, spread, n), rng.normal(1.9, spread, n)).clip(0, 4), issame)
            for g in TRUE_ERRORS}


def test_identity_resample_reproduces_the_protocol_exactly():
    rng = np.random.default_rng(3)
    distances, issame = _model_pairs(rng)["Asian"]
    distances[:50] = np.round(distances[:50], 2)  # values on the threshold grid: the tie rule matters
    identity = np.arange(distances.size)[None, :]
    expected = kfold_accuracy(distances, issame)[0].mean()
    assert bootstrap_accuracies(distances, issame, identity)[0] == expected


def test_resamples_keep_each_pair_in_its_fold_and_label_cell():
    issame = _labels(200)
    indices = draw_resamples(issame, 50, np.random.default_rng(0))
    fold = np.repeat(np.arange(10), 20)
    assert (fold[indices] == fold[None, :]).all()
    assert (issame[indices] == issame[None, :]).all()
    assert len(np.unique(indices[:, 0])) > 1  # really resampled


def test_interval_coverage_is_about_nominal_on_a_model_with_known_accuracies():
    group_hits, avg_hits = [], []
    true_avg = 100 * (1 - np.mean(list(TRUE_ERRORS.values())))
    for rep in range(50):
        rng = np.random.default_rng(rep)
        pairs = {g: _simulated_pairs(rng, error) for g, error in TRUE_ERRORS.items()}
        estimates = bootstrap_fairness(pairs, n_resamples=200, seed=rep)
        group_hits += [estimates[g].low <= 100 * (1 - e) <= estimates[g].high for g, e in TRUE_ERRORS.items()]
        avg_hits.append(estimates["avg"].low <= true_avg <= estimates["avg"].high)
    # 95 % intervals; 200 group intervals give a binomial standard error of 1.5 points.
    assert 0.89 <= np.mean(group_hits) <= 0.99
    assert np.mean(avg_hits) >= 0.82  # 50 intervals only: a loose check that Avg is not far off


def test_seeded_and_reproducible():
    pairs = _model_pairs(np.random.default_rng(1))
    first = bootstrap_fairness(pairs, n_resamples=100, seed=7)
    assert first == bootstrap_fairness(pairs, n_resamples=100, seed=7)
    assert first != bootstrap_fairness(pairs, n_resamples=100, seed=8)
    # point estimates are the protocol's numbers, whatever the seed
    for group, (d, s) in pairs.items():
        assert first[group].value == 100 * kfold_accuracy(d, s)[0].mean()
    assert first["ser"].value == pytest.approx(fairness_metrics({g: first[g].value for g in pairs})["ser"])
    for estimate in first.values():
        assert estimate.low <= estimate.value <= estimate.high


def test_comparing_a_model_with_itself_gives_zero_and_p_one():
    pairs = _model_pairs(np.random.default_rng(2))
    result = paired_comparison(pairs, pairs, n_resamples=200, seed=0)
    assert set(result) == {*TRUE_ERRORS, "avg", "std", "ser"}
    for estimate in result.values():
        assert (estimate.value, estimate.low, estimate.high, estimate.p_value) == (0.0, 0.0, 0.0, 1.0)
        assert estimate.covers_zero()


def test_paired_comparison_finds_a_real_difference():
    rng = np.random.default_rng(4)
    better = _model_pairs(rng, spread=0.3)
    worse = {g: (d + rng.normal(0, 0.3, d.size), s) for g, (d, s) in better.items()}
    result = paired_comparison(better, worse, n_resamples=300, seed=0)
    assert result["avg"].low > 0 and result["avg"].p_value < 0.01
    assert not result["avg"].covers_zero()


def test_paired_comparison_needs_the_same_pairs():
    pairs = _model_pairs(np.random.default_rng(5))
    other = {g: (d, ~s) for g, (d, s) in pairs.items()}
    with pytest.raises(ValueError, match="same pairs"):
        paired_comparison(pairs, other, n_resamples=10)


def test_pooled_comparison_averages_the_paired_differences():
    rng = np.random.default_rng(6)
    a1, a2 = _model_pairs(rng), _model_pairs(rng)
    plan = Bootstrap({g: s for g, (_, s) in a1.items()}, n_resamples=100, seed=0)
    m1, m2 = (plan.model({g: d for g, (d, _) in p.items()}) for p in (a1, a2))
    pooled = plan.compare([(m1, m2), (m2, m2)])
    single = plan.compare([(m1, m2)])
    assert pooled["avg"].value == pytest.approx(single["avg"].value / 2)
    assert pooled["avg"].high == pytest.approx(single["avg"].high / 2)


def test_identical_scores_for_every_pair_give_a_clear_result():
    issame = _labels(200)
    pairs = {g: (np.full(200, 1.0), issame) for g in TRUE_ERRORS}
    result = bootstrap_fairness(pairs, n_resamples=50, seed=0)
    for group in TRUE_ERRORS:  # no threshold separates anything: half the pairs are right
        assert (result[group].value, result[group].low, result[group].high) == (50.0, 50.0, 50.0)
    assert result["std"].value == 0.0 and result["ser"].value == 1.0
    compared = paired_comparison(pairs, pairs, n_resamples=50)
    assert compared["avg"].p_value == 1.0


def test_fairness_arrays_match_fairness_metrics_including_edge_cases():
    rows = np.array([[90.0, 95.0, 98.0, 97.0], [100.0, 99.0, 98.0, 97.0], [100.0] * 4])
    arrays = fairness_arrays(rows)
    for i, row in enumerate(rows):
        expected = fairness_metrics(dict(zip("abcd", row)))
        for key in ("avg", "std", "ser"):
            value = arrays[key][i]
            assert (math.isnan(value) and math.isnan(expected[key])) or value == pytest.approx(expected[key])


def test_too_few_pairs_per_fold_give_no_intervals_rather_than_falsely_narrow_ones():
    """One genuine and one impostor pair per fold: every resample equals the data, so an interval would be a
    point and any difference "significant". The report gives no interval and no verdict instead."""
    from eval.report.stats import StatsSettings, annotate
    from eval.report.tables import ResultRow, summary_line

    rng = np.random.default_rng(0)

    def student(teacher_set, n):
        pairs = {group: _simulated_pairs(rng, error, n) for group, error in TRUE_ERRORS.items()}
        return ResultRow(teacher_set, {g: 90.0 for g in pairs},
                         {"stage": "student", "teacher_set": teacher_set, "adaptor": "SL", "kd": "aKD"}, pairs=pairs)

    settings = StatsSettings(n_resamples=50, seed=0)
    small = [student("specialized", 20), student("baseline", 20)]
    assert annotate(small, settings) is None and all(not row.intervals for row in small)
    assert "at least 5 genuine and 5 impostor pairs in every fold" in summary_line(small, settings)
    enough = [student("specialized", 100), student("baseline", 100)]
    assert annotate(enough, settings) is not None and all(row.intervals for row in enough)
    assert "pooled" not in summary_line(enough, settings) and "SL a-KD: Avg" in summary_line(enough, settings)
