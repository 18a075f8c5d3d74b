"""How the numbers of a run are computed on its device: autocast dtype, the fp16 loss scaler and its divergence
rule, and the CUDA settings that only change speed (cuDNN autotuning).

The same autocast + GradScaler path runs on GPU and CPU, so the CPU tests exercise what clusters run. The
training loop, extraction and evaluation all take their precision from here.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# A healthy fp16 run skips a few steps while the scaler finds its level; this many skipped in a row means every
# step overflows whatever the scale (the scale alone would need ~100 halvings from a huge amp_init_scale).
MAX_CONSECUTIVE_SKIPS = 64


@dataclass(frozen=True)
class Precision:
    """``amp`` (none | bf16 | fp16) on ``device``."""

    amp: str
    device: torch.device

    @property
    def dtype(self) -> torch.dtype | None:
        return AUTOCAST_DTYPES.get(self.amp)

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def grad_scaler(self, init_scale: float) -> torch.amp.GradScaler:
        """The loss scaler, enabled for fp16 only (bf16 has fp32's range)."""
        return torch.amp.GradScaler(self.device.type, init_scale=init_scale, enabled=self.amp == "fp16")

    def describe(self, scaler: torch.amp.GradScaler | None = None) -> str:
        if self.dtype is None:
            return f"fp32 on {self.device.type}"
        scale = f", GradScaler from scale {scaler.get_scale():g}" if scaler is not None and scaler.is_enabled() else ""
        return f"{self.amp} autocast on {self.device.type}{scale}"


def fp16_divergence(scale: float, consecutive_skips: int) -> str | None:
    """Why an fp16 run has diverged, judged from the loss scale itself: below 1 (the gradients overflow even
    unscaled) or :data:`MAX_CONSECUTIVE_SKIPS` skipped steps in a row; None while it is healthy. A short epoch whose
    few steps were all skipped at the first scale is not divergence: the scale is still finding its level."""
    if scale < 1.0:
        return f"the loss scale fell to {scale:g} (below 1: the gradients overflow even unscaled)"
    if consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
        return f"{consecutive_skips} steps in a row were skipped (loss scale {scale:g})"
    return None


def configure_cuda(device: torch.device, cudnn_benchmark: bool) -> None:
    """cuDNN autotuning for the run's fixed input size (CUDA only; it changes speed, not results' meaning)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cudnn_benchmark
