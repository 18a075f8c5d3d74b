"""The one training loop of the project, shared by teachers, adaptors and students.

A stage describes *what* to train as a :class:`~utils.train.task.TrainingTask` (model, optional margin header,
data, loss, run folder, the record of what determines the run) and the loop's settings as ``TrainOptions``;
:func:`train` does the rest: DDP, SGD with the step schedule, clipping, mixed precision, seeding, logging,
verification, checkpoints (``utils.train.checkpoint``) and resume. The loop knows no config and no stage.
"""
from __future__ import annotations

import bisect
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from utils.core.distributed import (
    DistInfo, all_gather_object, all_reduce_sum, barrier, broadcast_buffers, broadcast_object
)
from utils.core.errors import InvalidInputError
from utils.core.locks import rank0_folder_lock
from utils.core.numerics import NonFiniteError, nonfinite_entries
from utils.core.precision import Precision, configure_cuda, fp16_divergence
from utils.core.signals import StopRequest, TrainingInterrupted, continue_hint, stop_on_signals
from utils.core.weights import load_weights
from utils.train.checkpoint import Progress, RunFiles, TrainingParts, claim_run_folder, rng_state, set_rng_state
from utils.train.feed import DeviceFeed
from utils.train.monitor import TrainingMonitor, VerificationCallback
from utils.train.optim import build_sgd, match_param_layout
from utils.train.sampling import SkippingSampler, check_full_batch, derive_seed, seed_everything, seed_worker
from utils.train.stopping import StopAgreement
from utils.train.task import Batch, TrainingResult, TrainingTask, TrainOptions


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


class _Trainer:
    def __init__(self, task: TrainingTask, options: TrainOptions, info: DistInfo, stop: StopRequest,
                 logger: logging.Logger | None) -> None:
        self.options, self.task, self.info = options, task, info
        self.stop = stop  # filled by train()'s signal handlers
        self.stopper = StopAgreement(stop, info.distributed, info.device)
        self.run_dir = Path(task.run_dir)
        self.files = RunFiles(self.run_dir, task.model_name, options.keep_epoch_weights)
        self.device = info.device
        self.precision = Precision(options.amp, self.device)
        self.channels_last = options.channels_last and self.device.type == "cuda"
        configure_cuda(self.device, options.cudnn_benchmark)
        _check_labels(task)
        check_full_batch(task.stage, len(task.dataset), task.batch_size, info.world_size)  # type: ignore[arg-type]
        self.model = task.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.header = task.header.to(self.device) if task.header is not None else None
        initialised = options.init_weights and not options.resume
        if initialised:
            load_weights(self.model, options.init_weights, what="init_weights")
        # Only a run that can start claims its folder: replace=True moves the old run aside last.
        if logger is None:
            logger = claim_run_folder(self.run_dir, task.provenance, replace=options.replace, is_main=info.is_main)
        self.logger = logger
        if initialised:
            self.logger.info(f"initialised {task.model_name} from {options.init_weights}")
        groups = [{"params": [p for p in self.model.parameters() if p.requires_grad]}]
        if self.header is not None:
            groups.append({"params": list(self.header.parameters())})
        self.optimizer = build_sgd(groups, lr=task.lr, momentum=options.momentum, weight_decay=options.weight_decay,
                                   device=self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, step_decay(task.milestones, options.lr_decay))
        self.scaler = self.precision.grad_scaler(options.amp_init_scale)
        self.epoch = 0
        self.global_step = 0
        self.skipped = torch.zeros((), device=self.device)
        self.skips_in_a_row = torch.zeros((), device=self.device)  # fp16 divergence: read at log steps only
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.mid_epoch: dict[str, Any] | None = None  # where a checkpoint saved on a stop signal left off
        self.trained_epoch: tuple[int, dict[str, torch.Tensor], torch.Generator] | None = None
        self._resume()
        match_param_layout(self.optimizer)

        self.sampler = SkippingSampler(task.dataset, num_replicas=info.world_size, rank=info.rank,
                                       shuffle=True, seed=options.seed)
        self.loader = DataLoader(task.dataset, batch_size=task.batch_size, sampler=self.sampler, drop_last=True,
                                 num_workers=task.num_workers, pin_memory=self.device.type == "cuda",
                                 persistent_workers=task.num_workers > 0, worker_init_fn=seed_worker,
                                 collate_fn=task.collate_fn)
        self.steps_per_epoch = len(self.loader)
        self.train_model, self.train_header = self._wrapped(options.compile)
        self.verify = VerificationCallback(task.evaluate, self.logger) if task.evaluate is not None else None

    def _wrapped(self, compile_model: bool) -> tuple[nn.Module, nn.Module | None]:
        """The model and header the steps run: DDP over several ranks, the model compiled on request. Weights and
        checkpoints are taken from the plain ``self.model`` and ``self.header``."""
        model, header = self.model, self.header
        if self.info.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
            header = DistributedDataParallel(header, device_ids=ids) if header is not None else None
        return (torch.compile(model) if compile_model else model), header

    # ---- persistence ----------------------------------------------------------------------------------------
    def _parts(self) -> TrainingParts:
        return TrainingParts(self.model, self.header, self.optimizer, self.scheduler, self.scaler)

    def _progress(self, mid_epoch: dict[str, Any] | None = None) -> Progress:
        return Progress(self.epoch, self.global_step, self.history, self.best, mid_epoch, self.info.world_size)

    def _resume(self) -> None:
        if not self.options.resume:
            return
        path = self.files.checkpoint
        loaded = self.files.load_state(self._parts(), self.device)
        if loaded is None:
            self.logger.info(f"resume=True: no {path} yet, starting from scratch")
            return
        progress, fresh_scale = loaded
        if progress.world_size != self.info.world_size:
            message = f"{path} was written with world size {progress.world_size}, this run has {self.info.world_size}"
            if self.options.resume_same_world_size:
                raise InvalidInputError(message + " (resume_same_world_size=True)")
            if progress.mid_epoch is not None:
                raise InvalidInputError(f"{path} was saved in the middle of an epoch by {progress.world_size} ranks; "
                                        f"resume it with the same world size (this run has {self.info.world_size})")
            self.logger.warning(message + ": continuing; the lr follows the new world size")
        if fresh_scale:
            self.logger.warning(f"{path} was written without fp16: the loss scale starts afresh")
        self.scheduler.base_lrs = [self.task.lr] * len(self.optimizer.param_groups)
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = lr * step_decay(self.task.milestones, self.options.lr_decay)(progress.epoch)
        self.epoch, self.global_step = progress.epoch, progress.global_step
        self.history, self.best, self.mid_epoch = progress.history or [], progress.best, progress.mid_epoch
        where = f", {self.mid_epoch['step']} steps into epoch {self.epoch + 1}" if self.mid_epoch else ""
        self.logger.info(f"resumed from {path} at epoch {self.epoch}, step {self.global_step}{where}")

    def _save_epoch(self, is_best: bool, complete: bool) -> None:
        previous = self.history[-2]["global_step"] if len(self.history) > 1 else None
        self.files.save_weights(self._parts(), self.global_step, previous, is_best)
        self.files.save_state(self._parts(), self._progress())
        # history.json is derived from the checkpoint: a kill between the two is repaired by the next resume.
        self._write_history(complete)

    def _write_history(self, complete: bool, stopped: str | None = None) -> None:
        self.files.write_history(self.history, self.best, complete, self.task.num_epochs, stopped)

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

    def _train_epoch(self, monitor: TrainingMonitor, lr: float) -> dict[str, float]:
        task, options = self.task, self.options
        seed = derive_seed(options.seed, self.epoch, self.info.rank)
        seed_everything(seed)
        flip_generator = torch.Generator().manual_seed(seed + 1)
        self.sampler.set_epoch(self.epoch)
        self.train_model.train()
        if self.train_header is not None:
            self.train_header.train()
        totals: dict[str, torch.Tensor] = {}
        steps = 0
        self.skipped = torch.zeros((), device=self.device)  # fp16 steps the scaler skipped; read once per epoch
        resumed, self.mid_epoch = self.mid_epoch, None
        self.sampler.skip = resumed["step"] * task.batch_size if resumed else 0
        batches = iter(self.loader)  # draws the loader's seed from the epoch's stream, as an uninterrupted run does
        if resumed:
            set_rng_state(resumed["rng"][self.info.rank], flip_generator, self.device)
            totals = {name: value.to(self.device) for name, value in resumed["totals"][self.info.rank].items()}
            self.skipped = resumed["skipped"][self.info.rank].to(self.device)
            steps = resumed["step"]
        feed = DeviceFeed(batches, self.device, flip_generator, flip=task.flip, channels_last=self.channels_last)
        monitor.start_epoch(self.epoch, task.num_epochs, self.steps_per_epoch)
        for batch in feed:
            losses = self._step(batch)
            self.global_step += 1
            steps += 1
            for name, value in losses.items():
                totals[name] = totals[name] + value.detach().float() if name in totals else value.detach().float()
            monitor.step(self.global_step, self.epoch, losses, lr)
            at_log_step = self.global_step % max(1, options.log_every) == 0 or steps == self.steps_per_epoch
            if at_log_step:
                self._check_numerics(totals["loss"])
            if self.stopper.after_step() and steps < self.steps_per_epoch:
                feed.rewind()
                self._save_mid_epoch(steps, totals, flip_generator)
        self.trained_epoch = (steps, totals, flip_generator)  # what a stop during the verification saves
        names = sorted(totals)
        summed = all_reduce_sum(torch.stack([totals[name] for name in names] + [torch.tensor(
            float(steps), device=self.device), self.skipped]))
        total_steps, total_skipped = float(summed[-2]), float(summed[-1])
        return ({name: float(value) for name, value in zip(names, summed[:-2])}
                | {"steps": total_steps, "skipped": total_skipped})

    def _next_epoch_lr(self) -> None:
        """Move the lr schedule to the next epoch. When the fp16 scaler skipped every optimizer step so far (an
        overflow at the first scale), torch warns that the schedule's first value is skipped; it is not (the lr is
        a function of the epoch count alone, see :func:`step_decay`), and the skip is deliberate: the warning is
        silenced for this call only."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before "
                                                      r"`optimizer\.step\(\)`")
            self.scheduler.step()

    def _step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One optimisation step, queued on the device: nothing here waits for it (no host read of a tensor)."""
        with self.precision.autocast():
            losses = self.task.loss_fn(self.train_model, self.train_header, batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses["loss"]).backward()
        self.scaler.unscale_(self.optimizer)
        model_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.options.grad_clip)  # the norm before
        if self.scaler.is_enabled():
            # The scaler skips the step exactly when a gradient is not finite, i.e. when a norm is not; the
            # header is not clipped, so only its norm is computed here.
            finite = torch.isfinite(model_norm)
            if self.header is not None:
                header_grads = [p.grad for p in self.header.parameters() if p.grad is not None]
                finite &= torch.isfinite(nn.utils.get_total_norm(header_grads))
            skipped = (~finite).float()
            self.skipped += skipped
            self.skips_in_a_row = (self.skips_in_a_row + skipped) * skipped
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return losses

    def _check_numerics(self, loss_sum: torch.Tensor) -> None:
        """At a logging step: fp16 divergence from the loss scale (the scaler skips non-finite steps), else a
        non-finite loss."""
        if not self.scaler.is_enabled():
            self._check_finite_loss(loss_sum)
            return
        # DDP averages the gradients before the scaler sees them, so every rank holds the same scale and count.
        problem = fp16_divergence(self.scaler.get_scale(), int(self.skips_in_a_row))
        if problem is not None:
            raise NonFiniteError(
                f"amp=fp16: {problem} by step {self.global_step} (epoch {self.epoch + 1}): the run diverged; last "
                f"good checkpoint: {self.files.last_good(self.epoch)}. Use amp=bf16 or amp=none, lower "
                f"amp_init_scale, or check the lr and the data")

    def _log_skipped(self, skipped: float, steps: float) -> int:
        """Per-rank count of the epoch's fp16 steps skipped for non-finite gradients, logged with the scale."""
        if not self.scaler.is_enabled():
            return 0
        # DDP averages the gradients before the check, so every rank skips the same steps.
        count, per_rank = round(skipped / self.info.world_size), round(steps / self.info.world_size)
        if self.info.is_main:
            self.logger.info(f"epoch {self.epoch + 1} fp16: skipped {count} of {per_rank} steps "
                             f"(non-finite gradients), loss scale now {self.scaler.get_scale():g}")
        return count

    def _save_mid_epoch(self, steps: int, totals: dict[str, torch.Tensor], flip_generator: torch.Generator,
                        where: str | None = None) -> None:
        """Save a checkpoint ``steps`` into the epoch with every rank's random streams, then end the run: resuming
        it gives the weights of an uninterrupted run (same world size). ``steps`` may be the whole epoch (a stop
        during its verification): the resumed run then trains no step of it and verifies it again."""
        self._check_finite_weights()
        # Every rank's own partial loss sums: the epoch's record adds them up over the ranks.
        partial = {name: value.cpu() for name, value in totals.items()}
        mid_epoch = {"step": steps, "totals": all_gather_object(partial),
                     "skipped": all_gather_object(self.skipped.cpu()),
                     "rng": all_gather_object(rng_state(flip_generator, self.device))}
        if self.info.is_main:
            self.files.save_state(self._parts(), self._progress(mid_epoch))
        barrier()
        self._interrupted(where or f"{steps} of {self.steps_per_epoch} in epoch {self.epoch + 1}")

    def _interrupted(self, where: str) -> None:
        """End the run after its checkpoint was saved; the log and history.json say so and how to continue (torchrun
        itself reports a failure, exit 1, when its workers exit 75)."""
        message = (f"{self.stop.name or 'a stop signal on another rank'}: {self.task.stage} stopped after step "
                   f"{self.global_step} ({where}) and saved {self.files.checkpoint}; {continue_hint()}")
        if self.info.is_main:
            self._write_history(complete=False, stopped=message)
        self.logger.warning(message)
        raise TrainingInterrupted(message)

    def _check_finite_loss(self, loss_sum: torch.Tensor) -> None:
        """Stop at the first logging interval whose summed loss is not finite (agreed by every rank)."""
        bad = all_reduce_sum(torch.tensor([0.0 if bool(torch.isfinite(loss_sum)) else 1.0], device=self.device))
        if float(bad[0]) > 0:
            raise NonFiniteError(
                f"{self.task.stage} in {self.run_dir}: the loss became non-finite in epoch {self.epoch + 1} by step "
                f"{self.global_step}; nothing of this epoch was saved; last good checkpoint: "
                f"{self.files.last_good(self.epoch)} (lower the lr or check the inputs, then rerun with resume=True)")

    def _check_finite_weights(self) -> None:
        """Refuse to save weights or buffers with NaN/inf (every rank holds the same ones after the epoch)."""
        bad = nonfinite_entries(self.model.state_dict())
        if self.header is not None:
            bad += [f"header.{name}" for name in nonfinite_entries(self.header.state_dict())]
        if bad:
            raise NonFiniteError(
                f"{self.task.stage} in {self.run_dir}: non-finite values in {', '.join(bad[:5])}"
                f"{' ...' if len(bad) > 5 else ''} after epoch {self.epoch + 1} (step {self.global_step}); not "
                f"saved; last good checkpoint: {self.files.last_good(self.epoch)}")

    def _epoch_record(self, monitor: TrainingMonitor) -> dict[str, Any]:
        """Train one epoch and return its history record (losses, timing, fp16 skips, RFW when due)."""
        start = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        sums = self._train_epoch(monitor, lr)
        steps = sums.pop("steps")
        skipped_steps = self._log_skipped(sums.pop("skipped"), steps)
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
        last_epoch = self.epoch + 1 == self.task.num_epochs
        if self.verify is not None and ((self.epoch + 1) % self.options.verify_every == 0 or last_epoch):
            # Rank 0 evaluates while the others wait in the broadcast, then all agree on the result.
            summary = broadcast_object(self.verify(self.model, self.epoch, self.stop) if self.info.is_main else None)
            if summary is None:  # a stop signal during the verification: the epoch is saved before its lr step
                self._save_mid_epoch(*self.trained_epoch,  # type: ignore[misc]
                                     where=f"during the RFW verification of epoch {self.epoch + 1}")
            record["rfw"] = summary
        return record

    def run(self) -> TrainingResult:
        task, options, info = self.task, self.options, self.info
        if info.is_main:
            self.files.save_config(task.config, stage=task.stage, model_name=task.model_name, lr=task.lr,
                                   num_epochs=task.num_epochs, milestones=list(task.milestones))
            self.logger.info(f"{task.stage} run in {self.run_dir}: {len(task.dataset)} samples, "  # type: ignore[arg-type]
                             f"{len(self.loader)} steps/epoch x {task.num_epochs} epochs, world size "
                             f"{info.world_size}, lr {task.lr:g}, milestones {list(task.milestones)}, "
                             f"precision {self.precision.describe(self.scaler)}")
            self.logger.info("config: " + json.dumps(task.config, sort_keys=True))
        monitor = TrainingMonitor(self.logger, self.files.tensorboard_dir, is_main=info.is_main, log_every=options.log_every,
                                  samples_per_step=task.batch_size * info.world_size,
                                  total_steps=len(self.loader) * task.num_epochs, start_step=self.global_step)
        resumed_complete = self.epoch == task.num_epochs
        try:
            while self.epoch < task.num_epochs:
                if options.stop_after_epoch is not None and self.epoch >= options.stop_after_epoch:
                    self.logger.info(f"stop_after_epoch={options.stop_after_epoch}: stopping; resume=True continues")
                    break
                record = self._epoch_record(monitor)
                self._next_epoch_lr()
                self.epoch += 1
                self.history.append(record)
                is_best = self._is_better(record)
                if is_best:
                    self.best = record
                if info.is_main:
                    monitor.end_epoch(self.epoch - 1, self.global_step, record["losses"], record["lr"],
                                      record.get("rfw"))
                    self._save_epoch(is_best, complete=self.epoch == task.num_epochs)
                barrier()
                if self.epoch < task.num_epochs and self.stopper.now():
                    self._interrupted(f"end of epoch {self.epoch}")
        finally:
            monitor.close()
        complete = self.epoch == task.num_epochs
        if resumed_complete and info.is_main:
            self._write_history(complete=True)
            self.logger.info(f"all {task.num_epochs} epochs were already done: {self.files.history} "
                             "rewritten from the checkpoint")
        best_epoch = self.best["epoch"] if self.best else 0
        if info.is_main and complete:
            self.logger.info(f"finished: best epoch {best_epoch} by {task.selection} -> "
                             f"{self.files.weights('best')}")
        return TrainingResult(self.run_dir, best_epoch, self.files.weights("best"),
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
