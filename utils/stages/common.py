"""Parts every training stage builds from the config: loop options, the margin header, the classification loss,
and the one construction of a stage's :class:`TrainingTask`."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from config.config import Config
from utils.core.errors import InvalidInputError
from utils.train.heads import build_head
from utils.train.task import Batch, Evaluate, LossFn, TrainingTask, TrainOptions
from utils.workdir.provenance import Record


def train_options(cfg: Config) -> TrainOptions:
    """The loop's settings, read once from the config keys of the same names."""
    return TrainOptions(**{option.name: getattr(cfg, option.name) for option in dataclasses.fields(TrainOptions)})


def classification_loss(model: nn.Module, header: nn.Module | None, batch: Batch) -> dict[str, torch.Tensor]:
    """Margin-softmax cross-entropy: the loss of teachers and adaptors."""
    if header is None:
        raise ValueError("classification_loss needs a margin header")
    logits = header(model(batch.inputs), batch.labels)
    return {"loss": nn.functional.cross_entropy(logits.float(), batch.labels)}


def make_header(cfg: Config, num_classes: int, adaptor_stage: bool = False) -> nn.Module:
    """The configured margin head over ``num_classes`` identities found in the data."""
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise InvalidInputError(f"config key num_classes={cfg.num_classes} but the training data has "
                                f"{num_classes} identities")
    if num_classes < 2:
        # A softmax over one class has no gradient: the run would "finish" with loss 0 and random weights.
        raise InvalidInputError(f"the training data of this stage (data_root={cfg.data_root}) holds {num_classes} "
                                "identity; a margin-softmax stage needs at least 2")
    return build_head(cfg, num_classes, adaptor_stage=adaptor_stage)


def stage_task(cfg: Config, *, stage: str, run_dir: Path, provenance: Callable[[], Record], model: nn.Module,
               dataset: Dataset, loss_fn: LossFn, header: nn.Module | None, evaluate: Evaluate | None = None,
               **loop_settings: Any) -> TrainingTask:
    """The training task of ``stage`` with the config's schedule: the adaptor stage's ``*_fc`` keys, the
    teachers' and students' plain ones. The best epoch is the lowest-loss one for adaptors (the release's rule),
    else the best RFW Avg when an evaluator is given, else the last."""
    adaptor = stage == "adaptor"
    selection = "loss" if adaptor else "verification" if evaluate is not None else "last"
    loop_settings.setdefault("num_workers", cfg.num_workers)
    return TrainingTask(
        stage=stage, run_dir=run_dir, config=cfg.to_dict(), provenance=provenance, model=model,
        model_name="adaptor" if adaptor else "backbone", dataset=dataset, loss_fn=loss_fn,
        lr=cfg.scaled_lr_fc if adaptor else cfg.scaled_lr,
        num_epochs=cfg.num_epoch_fc if adaptor else cfg.num_epoch,
        milestones=cfg.milestones_fc if adaptor else cfg.milestones,
        batch_size=cfg.batch_size_fc if adaptor else cfg.batch_size,
        header=header, selection=selection, evaluate=evaluate, **loop_settings)
