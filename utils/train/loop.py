"""The one training loop of the project, shared by teachers, adaptors and students.

A stage describes *what* to train as a :class:`TrainingTask` (model, optional margin header, data, loss, run
folder, the record of what determines the run) and the loop's settings as :class:`TrainOptions`;
:func:`train` does the rest: DDP, SGD with the step schedule, clipping, mixed precision, seeding, logging,
verification, checkpoints and resume. The loop knows no config and no stage.
"""
from __future__ import annotations

import bisect
import itertools
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from backbones import load_weights
from utils.workdir import artifacts
from utils.train.monitor import TrainingMonitor, VerificationCallback
from utils.core.distributed import (
    DistInfo,
    all_gather_object,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    broadcast_object,
)
from utils.core.errors import InvalidInputError, ProvenanceError
from utils.data.image import random_horizontal_flip
from utils.core.io import atomic_torch_save, atomic_write_json
from utils.core.locks import rank0_folder_lock
from utils.core.logs import setup_logging
from utils.core.numerics import NonFiniteError, nonfinite_entries
from utils.workdir.provenance import Record, claim_run_dir
from utils.core.signals import StopRequest, TrainingInterrupted, stop_on_signals


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


@dataclass(frozen=True)
class TrainOptions:
    """The loop's settings that are the same for every stage. Each field is the config key of the same name
    (``utils.stage_parts.train_options`` copies them), so the defaults live in the config only."""

    seed: int
    momentum: float
    weight_decay: float
    lr_decay: float
    grad_clip: float
    amp: str  # none | bf16 | fp16
    amp_init_scale: float  # fp16 GradScaler's first loss scale
    log_every: int
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
    provenance: Record  # what determines this run's outputs; a folder holding another run is refused
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
    evaluate: Callable[[nn.Module], Mapping[str, float]] | None = None  # callbacks.summarize_verification of the model
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


def derive_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of one rank's epoch: every epoch restarts its random streams, so a resumed run is exact."""
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101) % (2**31 - 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _rng_state(flip_generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    """Every random stream of this rank in the middle of an epoch (plain types: checkpoints load weights_only)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(), "flip": flip_generator.get_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "python": [version, list(internal), gauss_next]}


def _set_rng_state(state: dict[str, Any], flip_generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    flip_generator.set_state(state["flip"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


class _SkippingSampler(DistributedSampler):
    """DistributedSampler that can leave out the first ``skip`` indices of an epoch (a run resumed mid-epoch
    goes on with exactly the batches it had not trained on yet)."""

    skip = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return super().__len__() - self.skip


def _seed_worker(worker_id: int) -> None:
    worker_seed = torch.initial_seed() % (2**32)
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def step_decay(milestones: Sequence[int], decay: float) -> Callable[[int], float]:
    """lr factor of the 0-based ``epoch``: ``decay`` to the number of milestones ``m`` with ``m - 1 <= epoch``.

    A milestone ``m`` counts epochs from 1, so the lr is multiplied by ``decay`` from the m-th epoch on; this is
    the release's ``lr_func`` (``[16, 28, 40, 50]`` over 52 epochs gives 15 / 12 / 12 / 10 / 3 epochs per level).
    """
    ordered = sorted(milestones)
    return lambda epoch: decay ** bisect.bisect_right(ordered, epoch + 1)


def _check_labels(task: TrainingTask) -> None:
    if task.header is None:
        return
    labels = getattr(task.dataset, "labels", None)
    num_classes = int(task.header.kernel.shape[1])
    if labels is None or len(labels) == 0:
        return
    low, high = int(np.min(labels)), int(np.max(labels))
    if low < 0 or high >= num_classes:
        raise InvalidInputError(f"{task.stage} data has labels in [{low}, {high}] but the header has {num_classes} "
                         f"classes (expected labels in [0, {num_classes}))")


def claim_run_folder(run_dir: Path, record: Record, *, replace: bool, is_main: bool) -> logging.Logger:
    """Make ``run_dir`` the folder of a run with ``record`` and return the logger set up to its log.

    Rank 0 claims the folder (``provenance.claim_run_dir``) and every rank learns the verdict, so all raise the
    same ProvenanceError; a run moved aside with ``replace`` is reported in the new run's log.
    """
    verdict: tuple[str | None, str | None] = (None, None)
    if is_main:
        try:
            aside = claim_run_dir(run_dir, record, replace=replace)
            verdict = (None, str(aside) if aside else None)
        except ProvenanceError as exc:
            verdict = (str(exc), None)
    error, aside = broadcast_object(verdict)  # type: ignore[misc]
    if error:
        raise ProvenanceError(error)
    logger = setup_logging(artifacts.log_file(run_dir), is_main)
    if aside is not None:
        logger.warning(f"replace=True: the run made with other settings was moved to {aside}")
    return logger


class _Trainer:
    def __init__(self, task: TrainingTask, options: TrainOptions, info: DistInfo, stop: StopRequest,
                 logger: logging.Logger | None) -> None:
        self.options, self.task, self.info = options, task, info
        self.stop = stop  # filled by train()'s signal handlers
        self.run_dir = Path(task.run_dir)
        self.device = info.device
        # The same autocast + GradScaler path runs on GPU and CPU, so CI exercises what clusters run.
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(options.amp)
        _check_labels(task)
        if logger is None:
            logger = claim_run_folder(self.run_dir, task.provenance, replace=options.replace, is_main=info.is_main)
        self.logger = logger

        self.model = task.model.to(self.device)
        self.header = task.header.to(self.device) if task.header is not None else None
        if options.init_weights and not options.resume:
            load_weights(self.model, options.init_weights, what="init_weights")
            self.logger.info(f"initialised {task.model_name} from {options.init_weights}")
        groups = [{"params": [p for p in self.model.parameters() if p.requires_grad]}]
        if self.header is not None:
            groups.append({"params": list(self.header.parameters())})
        self.optimizer = torch.optim.SGD(groups, lr=task.lr, momentum=options.momentum, weight_decay=options.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, step_decay(task.milestones, options.lr_decay))
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=options.amp_init_scale,
                                           enabled=options.amp == "fp16")
        self.epoch = 0
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.mid_epoch: dict[str, Any] | None = None  # where a checkpoint saved on a stop signal left off
        self._resume()

        self.sampler = _SkippingSampler(task.dataset, num_replicas=info.world_size, rank=info.rank,
                                        shuffle=True, seed=options.seed)
        self.loader = DataLoader(task.dataset, batch_size=task.batch_size, sampler=self.sampler, drop_last=True,
                                 num_workers=task.num_workers, pin_memory=self.device.type == "cuda",
                                 persistent_workers=task.num_workers > 0, worker_init_fn=_seed_worker,
                                 collate_fn=task.collate_fn)
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise InvalidInputError(f"{task.stage}: {len(task.dataset)} samples give no full batch of "  # type: ignore[arg-type]
                                    f"{task.batch_size} per rank x {info.world_size} ranks; lower the batch size")
        self.train_model: nn.Module = self.model
        self.train_header = self.header
        if info.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=ids)
            if self.header is not None:
                self.train_header = DistributedDataParallel(self.header, device_ids=ids)
        self.verify = VerificationCallback(task.evaluate, self.logger) if task.evaluate is not None else None

    # ---- persistence ----------------------------------------------------------------------------------------
    def _resume(self) -> None:
        path = artifacts.checkpoint_file(self.run_dir)
        if not self.options.resume:
            return
        if not path.is_file():
            self.logger.info(f"resume=True: no {path} yet, starting from scratch")
            return
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as exc:
            raise InvalidInputError(f"cannot read resume checkpoint {path}: {exc}") from exc
        saved_world = int(state["world_size"])
        if saved_world != self.info.world_size:
            message = f"{path} was written with world size {saved_world}, this run has {self.info.world_size}"
            if self.options.resume_same_world_size:
                raise InvalidInputError(message + " (resume_same_world_size=True)")
            self.logger.warning(message + ": continuing; the lr follows the new world size")
        self.model.load_state_dict(state["model"])
        if self.header is not None:
            self.header.load_state_dict(state["header"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and not state["scaler"]:
            self.logger.warning(f"{path} was written without fp16: the loss scale starts afresh")
        else:
            self.scaler.load_state_dict(state["scaler"])
        self.scheduler.base_lrs = [self.task.lr] * len(self.optimizer.param_groups)
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = lr * step_decay(self.task.milestones, self.options.lr_decay)(int(state["epoch"]))
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        self.history = json.loads(state["history"])
        self.best = json.loads(state["best"]) if state["best"] else None
        self.mid_epoch = state.get("mid_epoch")
        if self.mid_epoch is not None and saved_world != self.info.world_size:
            raise InvalidInputError(f"{path} was saved in the middle of an epoch by {saved_world} ranks; resume it "
                                    f"with the same world size (this run has {self.info.world_size})")
        where = f", {self.mid_epoch['step']} steps into epoch {self.epoch + 1}" if self.mid_epoch else ""
        self.logger.info(f"resumed from {path} at epoch {self.epoch}, step {self.global_step}{where}")

    def _save_config(self) -> None:
        data = dict(self.task.config)
        data["derived"] = dict(data.get("derived", {}), stage=self.task.stage, model_name=self.task.model_name,
                               lr=self.task.lr, num_epochs=self.task.num_epochs, milestones=list(self.task.milestones))
        atomic_write_json(artifacts.config_file(self.run_dir), data)

    def _weights_path(self, prefix: str | int, name: str) -> Path:
        return artifacts.weights_file(self.run_dir, prefix, name)

    def _save_epoch(self, is_best: bool, complete: bool) -> None:
        model_state = self.model.state_dict()
        header_state = self.header.state_dict() if self.header is not None else None
        previous = self.history[-2]["global_step"] if len(self.history) > 1 else None
        atomic_torch_save(model_state, self._weights_path(self.global_step, self.task.model_name))
        if header_state is not None:
            atomic_torch_save(header_state, self._weights_path(self.global_step, "header"))
        if is_best:
            atomic_torch_save(model_state, self._weights_path("best", self.task.model_name))
            if header_state is not None:
                atomic_torch_save(header_state, self._weights_path("best", "header"))
        if not self.options.keep_epoch_weights and previous is not None:
            for name in (self.task.model_name, "header"):
                self._weights_path(previous, name).unlink(missing_ok=True)
        self._save_checkpoint(None)
        # history.json is derived from the checkpoint: a kill between the two is repaired by the next resume.
        self._write_history(complete)

    def _save_checkpoint(self, mid_epoch: dict[str, Any] | None) -> None:
        checkpoint = {
            "model": self.model.state_dict(),
            "header": self.header.state_dict() if self.header is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "world_size": self.info.world_size,
            # Each epoch reseeds from (seed, epoch, rank); the states are kept for inspection and tools.
            "rng_torch": torch.get_rng_state(),
            "rng_numpy": json.dumps(np.random.get_state()[1].tolist()),
            "history": json.dumps(self.history),
            "best": json.dumps(self.best) if self.best else "",
            "mid_epoch": mid_epoch,  # None at the end of an epoch; see _save_mid_epoch
        }
        atomic_torch_save(checkpoint, artifacts.checkpoint_file(self.run_dir))

    # ---- training -------------------------------------------------------------------------------------------
    def _is_better(self, record: dict[str, Any]) -> bool:
        selection = self.task.selection
        if self.best is None or selection == "last":
            return True
        if selection == "loss":
            return record["loss_sum"] < self.best["loss_sum"]
        if selection == "verification":
            # Only verified epochs compete; the first verified one replaces unverified bests.
            if "rfw" not in record:
                return False
            return "rfw" not in self.best or record["rfw"]["avg"] > self.best["rfw"]["avg"]
        raise ValueError(f"unknown selection rule {selection!r}")

    def _train_epoch(self, monitor: TrainingMonitor) -> dict[str, float]:
        task, options = self.task, self.options
        seed = derive_seed(options.seed, self.epoch, self.info.rank)
        seed_everything(seed)
        flip_generator = torch.Generator().manual_seed(seed + 1)
        self.sampler.set_epoch(self.epoch)
        self.train_model.train()
        if self.train_header is not None:
            self.train_header.train()
        lr = self.optimizer.param_groups[0]["lr"]
        totals: dict[str, torch.Tensor] = {}
        steps = 0
        skipped = torch.zeros((), device=self.device)  # fp16 steps the scaler skipped; read once per epoch
        resumed, self.mid_epoch = self.mid_epoch, None
        self.sampler.skip = resumed["step"] * task.batch_size if resumed else 0
        batches = iter(self.loader)  # draws the loader's seed from the epoch's stream, as an uninterrupted run does
        if resumed:
            _set_rng_state(resumed["rng"][self.info.rank], flip_generator, self.device)
            totals = {name: value.to(self.device) for name, value in resumed["totals"].items()}
            steps = resumed["step"]
        monitor.start_epoch(self.epoch, task.num_epochs, self.steps_per_epoch)
        for inputs, labels, rows, *extras in batches:
            if task.flip:
                inputs, flipped = random_horizontal_flip(inputs, flip_generator)
            else:
                flipped = torch.zeros(len(inputs), dtype=torch.bool)
            inputs, labels, rows, flipped = (t.to(self.device, non_blocking=True)
                                             for t in (inputs, labels, rows, flipped))
            batch = Batch(inputs, labels, rows, flipped, tuple(t.to(self.device, non_blocking=True) for t in extras))
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                losses = task.loss_fn(self.train_model, self.train_header, batch)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(losses["loss"]).backward()
            self.scaler.unscale_(self.optimizer)
            model_norm = nn.utils.clip_grad_norm_(self.model.parameters(), options.grad_clip)  # the norm before
            if self.scaler.is_enabled():
                # The scaler skips the step exactly when a gradient is not finite, i.e. when a norm is not; the
                # header is not clipped, so only its norm is computed here.
                finite = torch.isfinite(model_norm)
                if self.header is not None:
                    header_grads = [p.grad for p in self.header.parameters() if p.grad is not None]
                    finite &= torch.isfinite(nn.utils.get_total_norm(header_grads))
                skipped += ~finite
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.global_step += 1
            steps += 1
            for name, value in losses.items():
                totals[name] = totals[name] + value.detach().float() if name in totals else value.detach().float()
            monitor.step(self.global_step, self.epoch, losses, lr)
            at_log_step = self.global_step % max(1, options.log_every) == 0 or steps == self.steps_per_epoch
            if at_log_step and self.options.amp != "fp16":  # fp16: the scaler skips such steps (_check_skipped)
                self._check_finite_loss(totals["loss"])
            if steps < self.steps_per_epoch and self._stop_requested(agree=at_log_step):
                self._save_mid_epoch(steps, totals, flip_generator)
        self.scheduler.step()
        names = sorted(totals)
        summed = all_reduce_sum(torch.stack([totals[name] for name in names] + [torch.tensor(
            float(steps), device=self.device), skipped]))
        total_steps, total_skipped = float(summed[-2]), float(summed[-1])
        return ({name: float(value) for name, value in zip(names, summed[:-2])}
                | {"steps": total_steps, "skipped": total_skipped})

    def _check_skipped(self, skipped: float, steps: float) -> int:
        """Per-rank count of the epoch's fp16 steps skipped for non-finite gradients; stops when all were."""
        if not self.scaler.is_enabled():
            return 0
        # DDP averages the gradients before the check, so every rank skips the same steps.
        count, per_rank = round(skipped / self.info.world_size), round(steps / self.info.world_size)
        scale = self.scaler.get_scale()
        if self.info.is_main:
            self.logger.info(f"epoch {self.epoch + 1} fp16: skipped {count} of {per_rank} steps "
                             f"(non-finite gradients), loss scale now {scale:g}")
        if count == per_rank:
            raise RuntimeError(
                f"amp=fp16: every one of the {per_rank} steps of epoch {self.epoch + 1} was skipped because the "
                f"gradients were not finite (loss scale fell to {scale:g}); the weights did not change. "
                f"Use amp=bf16 or amp=none, lower amp_init_scale, or check the lr and the data")
        return count

    def _precision(self) -> str:
        if self.amp_dtype is None:
            return f"fp32 on {self.device.type}"
        scaler = f", GradScaler from scale {self.scaler.get_scale():g}" if self.scaler.is_enabled() else ""
        return f"{self.options.amp} autocast on {self.device.type}{scaler}"

    def _stop_requested(self, agree: bool) -> bool:
        """After a step: whether a stop signal arrived. Ranks agree only at logging steps (``agree``), so the loop
        never waits on the GPU for it."""
        requested = float(self.stop.signal is not None)
        if self.info.distributed:
            if not agree:
                return False
            requested = float(all_reduce_sum(torch.tensor([requested], device=self.device))[0])
        return requested > 0

    def _save_mid_epoch(self, steps: int, totals: dict[str, torch.Tensor], flip_generator: torch.Generator) -> None:
        """Save a checkpoint ``steps`` into the epoch with every rank's random streams, then end the run: resuming
        it gives the weights of an uninterrupted run (same world size)."""
        self._check_finite_weights()
        mid_epoch = {"step": steps, "totals": {name: value.cpu() for name, value in totals.items()},
                     "rng": all_gather_object(_rng_state(flip_generator, self.device))}
        if self.info.is_main:
            self._save_checkpoint(mid_epoch)
        barrier()
        self._interrupted(f"{steps} of {self.steps_per_epoch} in epoch {self.epoch + 1}")

    def _interrupted(self, where: str) -> None:
        message = (f"{self.stop.name or 'a stop signal on another rank'}: {self.task.stage} stopped after step "
                   f"{self.global_step} ({where}) and saved {artifacts.checkpoint_file(self.run_dir)}; run the same command "
                   "with resume=True to continue")
        self.logger.warning(message)
        raise TrainingInterrupted(message)

    def _last_good_checkpoint(self) -> str:
        path = artifacts.checkpoint_file(self.run_dir)
        return f"{path} (end of epoch {self.epoch})" if self.epoch > 0 and path.is_file() else "none"

    def _check_finite_loss(self, loss_sum: torch.Tensor) -> None:
        """Stop at the first logging interval whose summed loss is not finite (agreed by every rank)."""
        bad = all_reduce_sum(torch.tensor([0.0 if bool(torch.isfinite(loss_sum)) else 1.0], device=self.device))
        if float(bad[0]) > 0:
            raise NonFiniteError(
                f"{self.task.stage} in {self.run_dir}: the loss became non-finite in epoch {self.epoch + 1} by step "
                f"{self.global_step}; nothing of this epoch was saved; last good checkpoint: "
                f"{self._last_good_checkpoint()} (lower the lr or check the inputs, then rerun with resume=True)")

    def _check_finite_weights(self) -> None:
        """Refuse to save weights or buffers with NaN/inf (every rank holds the same ones after the epoch)."""
        bad = nonfinite_entries(self.model.state_dict())
        if self.header is not None:
            bad += [f"header.{name}" for name in nonfinite_entries(self.header.state_dict())]
        if bad:
            raise NonFiniteError(
                f"{self.task.stage} in {self.run_dir}: non-finite values in {', '.join(bad[:5])}"
                f"{' ...' if len(bad) > 5 else ''} after epoch {self.epoch + 1} (step {self.global_step}); not "
                f"saved; last good checkpoint: {self._last_good_checkpoint()}")

    def _write_history(self, complete: bool) -> None:
        atomic_write_json(artifacts.history_file(self.run_dir),
                          {"epochs": self.history, "best": self.best, "complete": complete,
                           "num_epochs": self.task.num_epochs})

    def run(self) -> TrainingResult:
        task, options, info = self.task, self.options, self.info
        if info.is_main:
            self._save_config()
            self.logger.info(f"{task.stage} run in {self.run_dir}: {len(task.dataset)} samples, "  # type: ignore[arg-type]
                             f"{len(self.loader)} steps/epoch x {task.num_epochs} epochs, world size "
                             f"{info.world_size}, lr {task.lr:g}, milestones {list(task.milestones)}, "
                             f"precision {self._precision()}")
            self.logger.info("config: " + json.dumps(task.config, sort_keys=True))
        monitor = TrainingMonitor(self.logger, artifacts.tensorboard_dir(self.run_dir), is_main=info.is_main, log_every=options.log_every,
                                  samples_per_step=task.batch_size * info.world_size,
                                  total_steps=len(self.loader) * task.num_epochs, start_step=self.global_step)
        resumed_complete = self.epoch == task.num_epochs
        try:
            while self.epoch < task.num_epochs:
                if options.stop_after_epoch is not None and self.epoch >= options.stop_after_epoch:
                    self.logger.info(f"stop_after_epoch={options.stop_after_epoch}: stopping; resume=True continues")
                    break
                start = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]
                sums = self._train_epoch(monitor)
                steps = sums.pop("steps")
                skipped_steps = self._check_skipped(sums.pop("skipped"), steps)
                broadcast_buffers(self.model)
                if self.header is not None:
                    broadcast_buffers(self.header)
                self._check_finite_weights()
                record: dict[str, Any] = {
                    "epoch": self.epoch + 1, "global_step": self.global_step, "lr": lr,
                    "loss_sum": sums["loss"], "losses": {k: v / steps for k, v in sums.items()},
                    "seconds": time.perf_counter() - start,
                }
                if self.scaler.is_enabled():
                    record["skipped_steps"] = skipped_steps
                last_epoch = self.epoch + 1 == task.num_epochs
                if self.verify is not None and ((self.epoch + 1) % options.verify_every == 0 or last_epoch):
                    # Rank 0 evaluates while the others wait in the broadcast, then all agree on the result.
                    summary = self.verify(self.model, self.epoch) if info.is_main else None
                    record["rfw"] = broadcast_object(summary)
                self.epoch += 1
                self.history.append(record)
                is_best = self._is_better(record)
                if is_best:
                    self.best = record
                if info.is_main:
                    monitor.end_epoch(self.epoch - 1, self.global_step, record["losses"], lr, record.get("rfw"))
                    self._save_epoch(is_best, complete=self.epoch == task.num_epochs)
                barrier()
                if self.epoch < task.num_epochs and self._stop_requested(agree=True):
                    self._interrupted(f"end of epoch {self.epoch}")
        finally:
            monitor.close()
        complete = self.epoch == task.num_epochs
        if resumed_complete and info.is_main:
            self._write_history(complete=True)
            self.logger.info(f"all {task.num_epochs} epochs were already done: {artifacts.history_file(self.run_dir)} "
                             "rewritten from the checkpoint")
        best_epoch = self.best["epoch"] if self.best else 0
        if info.is_main and complete:
            self.logger.info(f"finished: best epoch {best_epoch} by {task.selection} -> "
                             f"{self._weights_path('best', task.model_name)}")
        return TrainingResult(self.run_dir, best_epoch, self._weights_path("best", task.model_name),
                              self.history, complete, self.model)


def train(task: TrainingTask, options: TrainOptions, info: DistInfo, *,
          logger: logging.Logger | None = None) -> TrainingResult:
    """Train ``task`` with ``options`` on this rank; returns where the best weights are.

    A stage that claimed ``task.run_dir`` itself with :func:`claim_run_folder` passes the ``logger`` it got, so the
    folder is not claimed twice; by default the run claims it here.
    """
    with rank0_folder_lock(task.run_dir, info.is_main, what=f"{task.stage} run folder"), \
            stop_on_signals() as stop:
        return _Trainer(task, options, info, stop, logger).run()
