"""The effect the paper relies on, reproduced on synthetic data: a teacher trained on one ethnicity verifies that
ethnicity better than the others."""
from __future__ import annotations

import pytest

from helpers import tiny_overrides
from utils.cli import run_stage
from utils.synthetic import generate_synthetic

import train


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("specialisation")
    generate_synthetic(out, ids_per_ethnicity=30, images_per_id=8, pairs_per_ethnicity=150, image_size=32, seed=3)
    return out


@pytest.mark.parametrize("ethnicity", ["Asian", "Indian"])
def test_specialized_teacher_is_best_on_its_own_ethnicity(synthetic, tmp_path, ethnicity):
    result = run_stage(train.main, tiny_overrides(
        synthetic, tmp_path, ethnicity=ethnicity, width=16, embedding_size=128, batch_size=32, lr=1.6, num_epoch=8,
        milestones=[7], rfw_root=str(synthetic / "rfw"), verify_every=8))
    accuracy = result.history[-1]["rfw"]
    others = [accuracy[eth] for eth in ("African", "Asian", "Caucasian", "Indian") if eth != ethnicity]
    assert accuracy[ethnicity] > sum(others) / 3 + 5.0, accuracy
