"""Parts every training stage builds from the config: loop options, the margin header, the RFW evaluator for
best-epoch selection and the classification loss."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from config.config import Config
from eval.metrics.protocol import RFWEvaluator, backbone_embed_fn
from utils.train.monitor import summarize_verification
from utils.train.loop import Batch, TrainOptions
from utils.core.errors import InvalidInputError, MissingInputError
from utils.train.heads import build_head


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
    return build_head(cfg, num_classes, adaptor_stage=adaptor_stage)


def backbone_evaluator(cfg: Config, device: torch.device) -> Callable[[nn.Module], Mapping[str, float]] | None:
    """Per-epoch RFW verification of a backbone (flip TTA) summarised with the config's bootstrap settings, or
    None when no RFW root is configured."""
    if cfg.rfw_root is None:
        return None
    rfw_root = Path(cfg.rfw_root)
    if not rfw_root.is_dir():
        raise MissingInputError(f"rfw_root {rfw_root} is not a folder (expected <Ethnicity>_test.bin files or the "
                                "RFW archive)")
    evaluator = RFWEvaluator(rfw_root, cfg.input_size, batch_size=cfg.extract_batch_size,
                             allow_resize=cfg.allow_resize, val_root=cfg.val_root, val_targets=cfg.val_targets)
    return lambda model: summarize_verification(evaluator(backbone_embed_fn(model), device), cfg.bootstrap_resamples,
                                                cfg.bootstrap_seed, cfg.confidence)
