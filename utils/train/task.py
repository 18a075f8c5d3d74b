"""What a stage hands the training loop: the task (model, data, loss, run folder), the loop's options, and what
the loop gives back."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from utils.workdir.provenance import Record


@dataclass
class Batch:
    """One training batch on the device. ``flipped`` marks the samples the augmentation mirrored; ``extras`` are
    any further per-sample tensors the dataset yields after ``(inputs, label, row)`` (KD targets, for example)."""

    inputs: torch.Tensor
    labels: torch.Tensor
    rows: torch.Tensor
    flipped: torch.Tensor
    extras: tuple[torch.Tensor, ...] = ()


LossFn = Callable[[nn.Module, "nn.Module | None", Batch], dict[str, torch.Tensor]]
# The per-epoch verification of the model: accuracies and fairness summary, with the keys "avg", "std", "ser".
Evaluate = Callable[[nn.Module], Mapping[str, float]]


@dataclass(frozen=True)
class TrainOptions:
    """The loop's settings that are the same for every stage. Each field is the config key of the same name
    (``utils.stages.common.train_options`` copies them), so the defaults live in the config only."""

    seed: int
    momentum: float
    weight_decay: float
    lr_decay: float
    grad_clip: float
    amp: str  # none | bf16 | fp16
    amp_init_scale: float  # fp16 GradScaler's first loss scale
    log_every: int
    channels_last: bool  # CUDA only
    cudnn_benchmark: bool  # CUDA only
    compile: bool
    verify_every: int
    resume: bool
    resume_same_world_size: bool
    init_weights: str | None
    stop_after_epoch: int | None
    keep_epoch_weights: bool
    replace: bool  # move a run folder of another provenance aside instead of refusing


@dataclass
class TrainingTask:
    stage: str  # teacher | adaptor | student: recorded in config.json for the evaluation and the pipeline
    run_dir: Path
    config: Mapping[str, Any]  # the resolved config, saved as the run's config.json
    # What determines this run's outputs (a folder holding another run is refused), computed by rank 0 alone when
    # it claims the folder: a first run's data fingerprint reads every training image.
    provenance: Callable[[], Record]
    model: nn.Module  # the backbone or adaptor: clipped, and saved as `{step}{model_name}.pth`
    model_name: str  # "backbone" | "adaptor": the release's weights-file naming
    dataset: Dataset  # yields (inputs, label, row, *extras)
    loss_fn: LossFn  # returns named loss terms; "loss" is the one optimised
    lr: float  # already scaled by batch size and world size
    num_epochs: int
    milestones: Sequence[int]
    batch_size: int  # per rank
    header: nn.Module | None = None
    flip: bool = True  # random horizontal flip of whole image batches
    selection: str = "last"  # how `best` is chosen: "verification" (RFW Avg), "loss" (lowest epoch loss), "last"
    evaluate: Evaluate | None = None  # per-epoch RFW summary (eval.rfw.during_training)
    collate_fn: Callable | None = None
    num_workers: int = 0


@dataclass
class TrainingResult:
    run_dir: Path
    best_epoch: int
    best_weights: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    complete: bool = False
    model: nn.Module | None = None  # this rank's final model (unwrapped), for callers that go on using it
