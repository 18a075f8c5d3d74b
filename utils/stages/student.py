"""Everything the two student stages share: KD targets per image, the a-KD / EAF-KD losses, the task.

A student learns from scratch on every training image. Its normalised embedding is pulled towards the
image's KD target (the adaptor's projection of the four teachers, written by ``fc_EArc.py`` or
``dual_layer_EAF-Fusion.py``): ``loss_lambda * MSE(target, normalize(student(x)))``. a-KD uses that term alone
and never reads an identity label; EAF-KD adds ElasticArcFace cross-entropy over all identities.

Flip consistency: the engine mirrors random images of each batch, but the released targets were computed on
unmirrored images, so a mirrored image is pulled towards the embedding of its unmirrored self (the default,
as released). With ``kd_flip_consistent=True`` a mirrored image is paired with the target of the mirrored
image instead, which needs a target store written with ``extract_flipped=True``.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from backbones import build_backbone
from config.config import ADAPTOR_SCRIPTS, KD_SCRIPTS, Config
from utils.core.distributed import DistInfo
from utils.core.errors import InvalidInputError, MissingInputError, ProvenanceError
from utils.data.datasets import FaceDataset
from utils.stages.common import make_header, stage_task, train_options
from utils.train.loop import train
from utils.train.task import Batch, Evaluate, LossFn, TrainingResult, TrainingTask
from utils.workdir import artifacts
from utils.workdir.inputs import build_training_dataset
from utils.workdir.provenance import data_fingerprint, record_digest, student_record
from utils.workdir.store import open_targets, read_manifest


class KDTargetDataset(Dataset):
    """Wraps a :class:`FaceDataset`: items ``(image, label, row, target[, target_flip])``.

    Targets are read by the image's index row in the data-loader workers, so the training step never waits
    for them. The stores are opened (and validated) here; worker processes reopen the memory maps instead of
    receiving a pickled copy of a multi-gigabyte array.
    """

    def __init__(self, base: FaceDataset, adaptor_dir: str | Path, index_hash: str, *,
                 flip_consistent: bool) -> None:
        self.base = base
        self.labels = base.labels  # the engine checks labels against the header before training
        self.adaptor_dir = Path(adaptor_dir)
        self.index_hash = index_hash
        self.flip_consistent = flip_consistent
        self._targets: tuple[np.ndarray, ...] | None = self._open()

    @property
    def target_dim(self) -> int:
        return int(self._stores()[0].shape[1])

    def _open(self) -> tuple[np.ndarray, ...]:
        targets = open_targets(self.adaptor_dir, self.index_hash)
        if not self.flip_consistent:
            return (targets,)
        try:
            flipped = open_targets(self.adaptor_dir, self.index_hash, flipped=True)
        except (FileNotFoundError, ProvenanceError) as exc:
            raise ProvenanceError(
                f"kd_flip_consistent=True needs the targets of flipped images in {self.adaptor_dir}: {exc}. "
                "Run extract_all.py with extract_flipped=True for the four teachers, then retrain the adaptor "
                f"so it writes {artifacts.target_files(self.adaptor_dir).flipped.name} (or set "
                "kd_flip_consistent=False, as released)") from exc
        return targets, flipped

    def _stores(self) -> tuple[np.ndarray, ...]:
        if self._targets is None:
            self._targets = self._open()
        return self._targets

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_targets"] = None
        return state

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        image, label, row = self.base[i]
        # np.array copies the row out of the read-only memory map.
        targets = tuple(torch.from_numpy(np.array(store[row], dtype=np.float32)) for store in self._stores())
        return (image, label, row, *targets)


def kd_term(embeddings: torch.Tensor, batch: Batch, loss_lambda: float, flip_consistent: bool) -> torch.Tensor:
    """``loss_lambda * MSE(target, normalize(embeddings))``, mean over batch x embedding, in fp32.

    ``batch.extras`` holds ``(target, target_flip)`` or ``(target,)``; with ``flip_consistent`` the samples the
    engine flipped take ``target_flip``.
    """
    target = batch.extras[0]
    if flip_consistent:
        if len(batch.extras) < 2:
            raise ValueError("flip-consistent KD needs (target, target_flip) in the batch; the dataset yields "
                             "only target (build it with flip_consistent=True)")
        target = torch.where(batch.flipped[:, None], batch.extras[1], target)
    if embeddings.shape != target.shape:
        raise ValueError(f"student embeddings {list(embeddings.shape)} do not match KD targets {list(target.shape)}")
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        return loss_lambda * F.mse_loss(F.normalize(embeddings.float(), dim=1), target.float())


def akd_loss(model: nn.Module, header: nn.Module | None, batch: Batch, *, loss_lambda: float,
             flip_consistent: bool = False) -> dict[str, torch.Tensor]:
    """a-KD: the KD term alone. Identity labels are never read."""
    if header is not None:
        raise ValueError("a-KD trains no margin header; use EAF-KD (KD_CEL.py) for KD plus ElasticArcFace")
    kd = kd_term(model(batch.inputs), batch, loss_lambda, flip_consistent)
    return {"loss": kd, "kd": kd}


def eafkd_loss(model: nn.Module, header: nn.Module | None, batch: Batch, *, loss_lambda: float,
               flip_consistent: bool = False) -> dict[str, torch.Tensor]:
    """EAF-KD: margin cross-entropy plus the KD term, from one forward pass."""
    if header is None:
        raise ValueError("EAF-KD needs a margin header over all identities")
    embeddings = model(batch.inputs)
    ce = F.cross_entropy(header(embeddings, batch.labels).float(), batch.labels)
    kd = kd_term(embeddings, batch, loss_lambda, flip_consistent)
    return {"loss": ce + kd, "ce": ce, "kd": kd}


def kd_loss_fn(cfg: Config) -> LossFn:
    """The loss of ``cfg.kd`` with the configured lambda and flip handling."""
    loss = {"aKD": akd_loss, "EAFKD": eafkd_loss}[cfg.kd]
    return functools.partial(loss, loss_lambda=cfg.loss_lambda, flip_consistent=cfg.kd_flip_consistent)


def build_kd_dataset(cfg: Config) -> tuple[KDTargetDataset, int]:
    """Every training image with its KD target(s), and the number of identities of the index."""
    base, num_classes = build_training_dataset(cfg, "all")
    try:
        dataset = KDTargetDataset(base, artifacts.adaptor_dir(cfg), base.index.digest(),
                                  flip_consistent=cfg.kd_flip_consistent)
    except FileNotFoundError as exc:
        script, flags = ADAPTOR_SCRIPTS[cfg.adaptor]
        raise MissingInputError(
            f"{exc}. These targets (adaptor={cfg.adaptor} over the {cfg.teacher_set} {cfg.network} teachers) "
            f"come from: python {' '.join((script, *flags))} teacher_set={cfg.teacher_set} "
            f"network={cfg.network}") from exc
    if dataset.target_dim != cfg.embedding_size:
        raise InvalidInputError(
            f"KD targets in {artifacts.adaptor_dir(cfg)} are {dataset.target_dim}-D but the student {cfg.student_network} "
            f"embeds to embedding_size={cfg.embedding_size}: set embedding_size={dataset.target_dim}")
    return dataset, num_classes


def build_student_task(cfg: Config, evaluate: Evaluate | None) -> TrainingTask:
    """The student run of ``cfg``: a-KD or EAF-KD (``cfg.kd``) from ``cfg.adaptor``'s targets."""
    dataset, num_classes = build_kd_dataset(cfg)
    targets = read_manifest(artifacts.target_files(artifacts.adaptor_dir(cfg)).manifest) or {}
    targets_digest = record_digest(targets.get("provenance") or {})
    model = build_backbone(cfg, student=True)  # before the header: their order decides both initialisations
    header = make_header(cfg, num_classes) if cfg.kd == "EAFKD" else None
    return stage_task(cfg, stage="student", run_dir=artifacts.student_dir(cfg), model=model,
                      provenance=lambda: student_record(cfg, data_fingerprint(dataset.base.index, dataset.base.rows),
                                                        targets_digest),
                      dataset=dataset, loss_fn=kd_loss_fn(cfg), header=header, evaluate=evaluate)


def run_student(cfg: Config, info: DistInfo, kd: str, evaluate: Evaluate | None) -> TrainingResult:
    """Train the student of a stage script that trains ``kd`` students (it refuses the other kind)."""
    if cfg.kd != kd:
        raise InvalidInputError(f"{KD_SCRIPTS[kd]} trains kd={kd} students but the config says kd={cfg.kd}; "
                         f"use {KD_SCRIPTS[cfg.kd]} for kd={cfg.kd}")
    return train(build_student_task(cfg, evaluate), train_options(cfg), info)
