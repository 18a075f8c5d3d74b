"""Networks applied to image batches outside training (extraction, RFW evaluation): the training feed's path.

uint8 images go to the device and are normalised there (``utils.data.image.network_input``), the forward runs
under autocast in the run's precision, NHWC on CUDA when ``channels_last``; outputs come back to the host while
the next batch computes.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Iterable, Iterator, TypeVar

import torch
from torch import nn

from utils.core.precision import Precision
from utils.data.image import network_input

K = TypeVar("K")


@dataclass(frozen=True)
class Inference:
    """How a run's networks embed images: ``amp`` (none | bf16 | fp16) autocast and, on CUDA, ``channels_last``."""

    amp: str = "none"
    channels_last: bool = False

    def nhwc(self, device: torch.device) -> bool:
        return self.channels_last and torch.device(device).type == "cuda"

    def prepare(self, model: nn.Module, device: torch.device) -> nn.Module:
        """``model`` on ``device`` in eval mode, NHWC when that is the path."""
        model = model.to(device).eval()
        return model.to(memory_format=torch.channels_last) if self.nhwc(device) else model

    def inputs(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A host batch (uint8 images, or float ones already normalised) as the network's input on ``device``."""
        return network_input(images.to(device, non_blocking=True), self.nhwc(device))

    def autocast(self, device: torch.device) -> AbstractContextManager:
        return Precision(self.amp, torch.device(device)).autocast()


def overlapped(outputs: Iterable[tuple[K, torch.Tensor]]) -> Iterator[tuple[K, torch.Tensor]]:
    """``(key, float32 host tensor)`` for each ``(key, device output)``, one batch behind: on CUDA the copy of a
    batch's output is queued behind its forward and read once the next batch is queued, so the device never
    waits for the host between batches."""
    previous: tuple[K, torch.Tensor, torch.cuda.Event | None] | None = None
    for key, output in outputs:
        output = output.float()
        event = None
        if output.is_cuda:
            output = output.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        if previous is not None:
            yield _ready(previous)
        previous = (key, output, event)
    if previous is not None:
        yield _ready(previous)


def _ready(item: tuple[K, torch.Tensor, torch.cuda.Event | None]) -> tuple[K, torch.Tensor]:
    key, output, event = item
    if event is not None:
        event.synchronize()
    return key, output
