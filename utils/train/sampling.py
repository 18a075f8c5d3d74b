"""The random side of an epoch: per-(epoch, rank) seeds, the worker seeds, and a sampler that can resume in the
middle of an epoch. Every epoch restarts its streams from its seed, so a resumed run sees the same batches."""
from __future__ import annotations

import itertools
import math
import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from utils.core.errors import InvalidInputError


def derive_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of one rank's epoch: every epoch restarts its random streams, so a resumed run is exact."""
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101) % (2**31 - 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def check_full_batch(stage: str, samples: int, batch_size: int, world_size: int) -> None:
    """Refuse data that gives no full batch per rank (batches are dropped when incomplete, so such a run would
    train nothing), before anything is written: each rank samples ceil(samples / world_size) indices."""
    if math.ceil(samples / world_size) < batch_size:
        raise InvalidInputError(f"{stage}: {samples} samples give no full batch of {batch_size} per rank x "
                                f"{world_size} ranks; lower the batch size")


class SkippingSampler(DistributedSampler):
    """DistributedSampler that can leave out the first ``skip`` indices of an epoch (a run resumed mid-epoch
    goes on with exactly the batches it had not trained on yet)."""

    skip = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return super().__len__() - self.skip


def seed_worker(worker_id: int) -> None:
    worker_seed = torch.initial_seed() % (2**32)
    np.random.seed(worker_seed)
    random.seed(worker_seed)
