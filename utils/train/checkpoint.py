"""Persistence of a training run: its folder claim, config, weights files, history, and the resumable state.

The weights files are plain state_dicts named as in the release (``{step}backbone.pth``, ``best...``); the
resumable state (``checkpoint_last.pt``) holds everything the loop needs to go on exactly where it stopped,
including every rank's random streams when it stopped in the middle of an epoch. Every file is written
atomically, and the loop stays free of file names.
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from utils.core.distributed import broadcast_object
from utils.core.errors import InvalidInputError, UserError
from utils.core.io import atomic_torch_save, atomic_write_json
from utils.core.logs import setup_logging
from utils.workdir import artifacts
from utils.workdir.provenance import Record, claim_run_dir


def claim_run_folder(run_dir: Path, record: Callable[[], Record], *, replace: bool,
                     is_main: bool) -> logging.Logger:
    """Make ``run_dir`` the folder of a run with ``record()`` and return the logger set up to its log.

    Rank 0 alone computes the record (a first run's data fingerprint reads every training image) and claims the
    folder (``provenance.claim_run_dir``); every rank learns the verdict, so all raise the same error and none
    waits for a rank that failed. A run moved aside with ``replace`` is reported in the new run's log.
    """
    verdict: tuple[Exception | None, str | None] = (None, None)
    failure: Exception | None = None
    if is_main:
        try:
            aside = claim_run_dir(run_dir, record(), replace=replace)
            verdict = (None, str(aside) if aside else None)
        except UserError as exc:
            verdict = (exc, None)
        except Exception as exc:  # rank 0 raises it with its traceback; the others must not wait for it
            failure = exc
            verdict = (RuntimeError(f"rank 0 failed to claim {run_dir}: {exc!r}"), None)
    error, aside = broadcast_object(verdict)  # type: ignore[misc]
    if failure is not None:
        raise failure
    if error is not None:
        raise error
    logger = setup_logging(artifacts.log_file(run_dir), is_main)
    if aside is not None:
        logger.warning(f"replace=True: the run made with other settings was moved to {aside}")
    return logger


def rng_state(flip_generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    """Every random stream of this rank in the middle of an epoch (plain types: checkpoints load weights_only)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(), "flip": flip_generator.get_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "python": [version, list(internal), gauss_next]}


def set_rng_state(state: dict[str, Any], flip_generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    flip_generator.set_state(state["flip"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


@dataclass
class TrainingParts:
    """The stateful objects a resumable checkpoint saves and restores."""

    model: nn.Module
    header: nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler


@dataclass
class Progress:
    """Where a run stands: completed epochs and steps, the per-epoch records and the best one so far."""

    epoch: int = 0
    global_step: int = 0
    history: list[dict[str, Any]] | None = None
    best: dict[str, Any] | None = None
    mid_epoch: dict[str, Any] | None = None  # where a checkpoint saved on a stop signal left off
    world_size: int = 1


class RunFiles:
    """The files of one training run, written atomically."""

    def __init__(self, run_dir: Path, model_name: str, keep_epoch_weights: bool) -> None:
        self.run_dir, self.model_name, self.keep_epoch_weights = run_dir, model_name, keep_epoch_weights
        self.checkpoint = artifacts.checkpoint_file(run_dir)
        self.history = artifacts.history_file(run_dir)
        self.tensorboard_dir = artifacts.tensorboard_dir(run_dir)

    def weights(self, prefix: str | int, name: str | None = None) -> Path:
        return artifacts.weights_file(self.run_dir, prefix, name or self.model_name)

    def save_config(self, config: Mapping[str, Any], **derived: Any) -> None:
        data = dict(config)
        data["derived"] = dict(data.get("derived", {}), **derived)
        atomic_write_json(artifacts.config_file(self.run_dir), data)

    def save_weights(self, parts: TrainingParts, step: int, previous_step: int | None, is_best: bool) -> None:
        """The epoch's weights (and ``best`` when it is), dropping the previous epoch's unless they are kept."""
        states = {self.model_name: parts.model.state_dict()}
        if parts.header is not None:
            states["header"] = parts.header.state_dict()
        for name, state in states.items():
            atomic_torch_save(state, self.weights(step, name))
            if is_best:
                atomic_torch_save(state, self.weights("best", name))
        if not self.keep_epoch_weights and previous_step is not None:
            for name in (self.model_name, "header"):
                self.weights(previous_step, name).unlink(missing_ok=True)

    def save_state(self, parts: TrainingParts, progress: Progress) -> None:
        atomic_torch_save({
            "model": parts.model.state_dict(),
            "header": parts.header.state_dict() if parts.header is not None else None,
            "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(),
            "scaler": parts.scaler.state_dict(),
            "epoch": progress.epoch,
            "global_step": progress.global_step,
            "world_size": progress.world_size,
            # Each epoch reseeds from (seed, epoch, rank); the states are kept for inspection and tools.
            "rng_torch": torch.get_rng_state(),
            "rng_numpy": json.dumps(np.random.get_state()[1].tolist()),
            "history": json.dumps(progress.history or []),
            "best": json.dumps(progress.best) if progress.best else "",
            "mid_epoch": progress.mid_epoch,  # None at the end of an epoch
        }, self.checkpoint)

    def load_state(self, parts: TrainingParts, device: torch.device) -> tuple[Progress, bool] | None:
        """Restore ``parts`` from the resumable state; None when there is none yet. Also returns whether the
        scaler started afresh (a checkpoint written without fp16)."""
        if not self.checkpoint.is_file():
            return None
        try:
            state = torch.load(self.checkpoint, map_location=device, weights_only=True)
        except Exception as exc:
            raise InvalidInputError(f"cannot read resume checkpoint {self.checkpoint}: {exc}") from exc
        parts.model.load_state_dict(state["model"])
        if parts.header is not None:
            parts.header.load_state_dict(state["header"])
        parts.optimizer.load_state_dict(state["optimizer"])
        parts.scheduler.load_state_dict(state["scheduler"])
        fresh_scale = parts.scaler.is_enabled() and not state["scaler"]
        if not fresh_scale:
            parts.scaler.load_state_dict(state["scaler"])
        progress = Progress(int(state["epoch"]), int(state["global_step"]), json.loads(state["history"]),
                            json.loads(state["best"]) if state["best"] else None, state.get("mid_epoch"),
                            int(state["world_size"]))
        return progress, fresh_scale

    def last_good(self, epoch: int) -> str:
        return f"{self.checkpoint} (end of epoch {epoch})" if epoch > 0 and self.checkpoint.is_file() else "none"

    def write_history(self, history: Sequence[dict[str, Any]], best: dict[str, Any] | None, complete: bool,
                      num_epochs: int, stopped: str | None = None) -> None:
        """``history.json``; ``stopped`` is the message of a stop signal that ended this process's part of the run."""
        record = {"epochs": list(history), "best": best, "complete": complete, "num_epochs": num_epochs}
        atomic_write_json(self.history, record | ({"stopped": stopped} if stopped else {}))
