"""What the training loop tells people: progress, the loss log line, TensorBoard, the per-epoch verification line
(rank 0 does the talking)."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Callable, Mapping

import torch
from tqdm import tqdm

from utils.core.logs import format_duration
from utils.core.progress import is_terminal
from utils.core.signals import StopRequest, TrainingInterrupted


class TrainingMonitor:
    """Per-step bookkeeping: tqdm bar (in a terminal), periodic log line (samples/s, losses, lr, ETA), TensorBoard scalars.

    Losses are accumulated as device tensors and read back only every ``log_every`` steps, so the training
    step never waits for the device.
    """

    def __init__(self, logger: logging.Logger, tensorboard_dir: Path, *, is_main: bool, log_every: int,
                 samples_per_step: int, total_steps: int, start_step: int) -> None:
        self.logger = logger
        self.is_main = is_main
        self.log_every = max(1, log_every)
        self.samples_per_step = samples_per_step
        self.total_steps = total_steps
        self.start_step = start_step
        self.writer = None
        if is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(tensorboard_dir), purge_step=start_step)
        self.bar: tqdm | None = None
        self._window: dict[str, torch.Tensor] = {}
        self._window_steps = 0
        self._window_start = time.perf_counter()
        self._run_start = time.perf_counter()

    def start_epoch(self, epoch: int, num_epochs: int, steps: int) -> None:
        # In a file (a cluster job's stdout) the periodic log lines are the progress; a bar only in a terminal.
        if self.is_main and is_terminal(sys.stdout):
            self.bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{num_epochs}", leave=False, dynamic_ncols=True,
                            file=sys.stdout)
        self._window = {}
        self._window_steps = 0
        self._window_start = time.perf_counter()

    def step(self, global_step: int, epoch: int, losses: Mapping[str, torch.Tensor], lr: float) -> None:
        for name, value in losses.items():
            detached = value.detach()
            self._window[name] = self._window[name] + detached if name in self._window else detached.clone()
        self._window_steps += 1
        if self.bar is not None:
            self.bar.update(1)
        if global_step % self.log_every == 0:
            self._flush(global_step, epoch, lr)

    def _flush(self, global_step: int, epoch: int, lr: float) -> None:
        if not self.is_main or self._window_steps == 0:
            return
        now = time.perf_counter()
        means = {name: float(total) / self._window_steps for name, total in self._window.items()}
        speed = self._window_steps * self.samples_per_step / max(now - self._window_start, 1e-9)
        done = global_step - self.start_step
        eta = (now - self._run_start) / max(done, 1) * (self.total_steps - global_step)
        loss_text = " ".join(f"{name} {value:.4f}" for name, value in means.items())
        self.logger.info(f"epoch {epoch + 1} step {global_step}/{self.total_steps} {loss_text} lr {lr:.6f} "
                         f"{speed:.1f} samples/s eta {format_duration(eta)}")
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{means.get('loss', 0.0):.3f}", sps=f"{speed:.0f}")
        if self.writer is not None:
            for name, value in means.items():
                self.writer.add_scalar(f"train/{name}", value, global_step)
            self.writer.add_scalar("train/lr", lr, global_step)
            self.writer.add_scalar("train/samples_per_second", speed, global_step)
        self._window = {}
        self._window_steps = 0
        self._window_start = now

    def end_epoch(self, epoch: int, global_step: int, epoch_losses: Mapping[str, float], lr: float,
                  verification: Mapping[str, float] | None) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if not self.is_main:
            return
        loss_text = " ".join(f"{name} {value:.4f}" for name, value in epoch_losses.items())
        self.logger.info(f"epoch {epoch + 1} done: mean {loss_text} lr {lr:.6f}")
        if self.writer is not None:
            for name, value in epoch_losses.items():
                self.writer.add_scalar(f"epoch/{name}", value, epoch + 1)
            self.writer.add_scalar("epoch/lr", lr, epoch + 1)
            for name, value in (verification or {}).items():
                self.writer.add_scalar(f"rfw/{name}", value, epoch + 1)
            self.writer.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def format_verification(summary: Mapping[str, float]) -> str:
    """``African 97.33 [96.10, 98.40] ... ser 1.420 [1.100, 1.900]`` from ``eval.rfw.during_training.summarize_verification``."""
    parts = []
    for key, value in summary.items():
        if key.endswith(("_low", "_high")):
            continue
        digits = 3 if key == "ser" else 2
        text = f"{key} {value:.{digits}f}"
        if f"{key}_low" in summary:
            text += f" [{summary[f'{key}_low']:.{digits}f}, {summary[f'{key}_high']:.{digits}f}]"
        parts.append(text)
    return " ".join(parts)


class VerificationCallback:
    """Runs the RFW evaluation on rank 0 at the end of each epoch and logs accuracy, Avg, STD and SER.

    ``evaluate`` returns the ``eval.rfw.during_training.summarize_verification`` of the model (the stage picks its bootstrap settings).
    """

    def __init__(self, evaluate: Callable[[torch.nn.Module], Mapping[str, float]], logger: logging.Logger) -> None:
        self.evaluate = evaluate
        self.logger = logger

    def __call__(self, model: torch.nn.Module, epoch: int, stop: StopRequest) -> dict[str, float] | None:
        """The summary of the model's verification after ``epoch``; None when a stop signal arrived during it
        (checked before each batch's forward, so the verification ends within a batch)."""
        def stop_before_forward(module: torch.nn.Module, inputs: object) -> None:
            stop.raise_if_set("the RFW verification")

        was_training = model.training
        model.eval()
        hook = model.register_forward_pre_hook(stop_before_forward)
        try:
            summary = dict(self.evaluate(model))
        except TrainingInterrupted:
            return None
        finally:
            hook.remove()
            model.train(was_training)
        self.logger.info(f"epoch {epoch + 1} RFW (95% bootstrap intervals): {format_verification(summary)}")
        return summary
