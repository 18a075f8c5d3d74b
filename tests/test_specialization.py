"""The effect the paper relies on, reproduced on synthetic data: a teacher trained on one ethnicity verifies that
ethnicity better than the others; and the calibration of the default world: other ethnicities stay well above
chance, as single-group models on real faces do.

Which of two tiny trained networks scores higher on a few hundred pairs depends on the CPU's floating-point
paths (thread count, instruction set), which change the training trajectory as a new seed does. So the tests
assert averages over teachers and seeds, with margins several times the spread measured across seeds, one and
two threads and an older instruction set (``make test-float-paths``); each docstring gives its figures."""
from __future__ import annotations

from typing import Callable

import numpy as np
import pytest

import train
from config.config import ETHNICITIES
from eval.metrics.protocol import VerificationResult
from eval.rfw.embedding import RFWEvaluator, backbone_embed_fn
from helpers import tiny_overrides
from utils.data.synthetic import SHARED_FRACTION, generate_synthetic
from utils.stages.cli import run_stage

SIZES = dict(ids_per_ethnicity=30, images_per_id=8, image_size=32, seed=3)
TEACHER = dict(width=16, embedding_size=128, batch_size=32, lr=1.6, num_epoch=8, milestones=[7])
SEEDS = (0, 1, 2)
Teachers = Callable[[str, int], dict[str, VerificationResult]]

pytestmark = pytest.mark.float_sensitive


def teacher_trainer(data, tmp_path_factory) -> Teachers:
    """RFW results of the teacher specialized on an ethnicity, per (ethnicity, seed), trained once per module.
    Verified once, after the last epoch (no per-epoch verification: the last epoch's weights are the best)."""
    evaluator = RFWEvaluator(data / "rfw", SIZES["image_size"])
    cache: dict[tuple[str, int], dict[str, VerificationResult]] = {}

    def results(ethnicity: str, seed: int = 0) -> dict[str, VerificationResult]:
        if (ethnicity, seed) not in cache:
            run = run_stage(train.main, tiny_overrides(data, tmp_path_factory.mktemp(f"{ethnicity}{seed}"),
                                                       ethnicity=ethnicity, seed=seed, **TEACHER))
            assert run.best_epoch == TEACHER["num_epoch"]  # the final model (run.model) is the best one
            cache[ethnicity, seed] = evaluator(backbone_embed_fn(run.model))
        return cache[ethnicity, seed]

    return results


@pytest.fixture(scope="module")
def group_specific_teacher(tmp_path_factory) -> Teachers:
    """Teachers of the group-specific-only world (shared_fraction=0, generator v1), where specialization is
    strongest."""
    data = tmp_path_factory.mktemp("group_specific")
    generate_synthetic(data, **SIZES, pairs_per_ethnicity=150, shared_fraction=0.0)
    return teacher_trainer(data, tmp_path_factory)


@pytest.fixture(scope="module")
def default_world_teacher(tmp_path_factory) -> Teachers:
    data = tmp_path_factory.mktemp("default_world")
    generate_synthetic(data, **SIZES, pairs_per_ethnicity=300)
    return teacher_trainer(data, tmp_path_factory)


@pytest.mark.parametrize("ethnicity", ["Asian", "Indian"])
def test_specialized_teacher_is_best_on_its_own_ethnicity(group_specific_teacher, ethnicity):
    """Own-ethnicity accuracy minus the mean over the other three: 13.1 to 23.8 points measured (mean 16.1, sd
    2.5; seeds 0-2, Asian and Indian teachers, each under 1 and 2 threads and the old instruction set), asserted
    above 5 (over 4 sd below the mean)."""
    accuracy = {eth: 100 * r.accuracy for eth, r in group_specific_teacher(ethnicity).items()}
    others = [accuracy[eth] for eth in ETHNICITIES if eth != ethnicity]
    assert accuracy[ethnicity] > sum(others) / 3 + 5.0, accuracy


def own_group_advantage(teachers: Teachers, seed: int) -> list[float]:
    """AUC on an ethnicity of its own teacher minus that of the other ethnicity's teacher (same pairs, same
    seed), for Asian and Indian."""
    asian, indian = teachers("Asian", seed), teachers("Indian", seed)
    return [asian["Asian"].auc - indian["Asian"].auc, indian["Indian"].auc - asian["Indian"].auc]


def test_default_world_transfers_across_groups_and_keeps_specialization(default_world_teacher):
    """Calibration of the default shared_fraction: a specialized teacher verifies every other ethnicity well
    above chance (50%), and on average over seeds and the two groups the teacher of an ethnicity verifies it
    better (AUC) than the other ethnicity's teacher does.

    Measured (300 pairs per ethnicity; seeds 0-2, each under 1 thread, 2 threads and the old instruction set of
    ``make test-float-paths``): single advantages from -0.009 to +0.056 (one pair alone can reverse, as on the
    machine of issue 22), the asserted mean over seeds and groups 0.026, 0.029 and 0.017 (mean 0.024, sd 0.006),
    asserted above 0.005 (3 sd below the mean). Lowest other-ethnicity accuracy per seed 74.7-81.3% (mean 78.9,
    sd 2.3), asserted above 70%."""
    assert 0 < SHARED_FRACTION < 1
    for seed in SEEDS:
        for own in ("Asian", "Indian"):
            accuracy = {eth: 100 * r.accuracy for eth, r in default_world_teacher(own, seed).items()}
            assert min(accuracy[eth] for eth in ETHNICITIES if eth != own) > 70.0, (own, seed, accuracy)
    advantages = [a for seed in SEEDS for a in own_group_advantage(default_world_teacher, seed)]
    assert np.mean(advantages) > 0.005, advantages
