"""The device feed: the loader's host batches as :class:`~utils.train.task.Batch` on the training device.

Images travel as uint8 (pinned by the loader on CUDA, copied non-blocking) and are flipped and normalised on the
device (``utils.data.image``), bit for bit what the CPU computes. The flip decisions are drawn on the CPU from the
epoch's seeded generator, one draw per batch in loader order, so a resumed run draws the same flips. On CUDA the
next batch is copied and prepared on a side stream while the current step runs.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import torch

from utils.data.image import draw_flips, flip_images, network_input
from utils.train.task import Batch


class DeviceFeed:
    """One epoch's batches on ``device``; ``flip`` draws the training flips from ``generator``."""

    def __init__(self, batches: Iterable[Any], device: torch.device, generator: torch.Generator, *, flip: bool,
                 channels_last: bool) -> None:
        self.batches, self.device, self.generator = batches, device, generator
        self.flip, self.channels_last = flip, channels_last
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # The generator's state after the last batch handed out: a prefetched batch has drawn its flips already,
        # and a checkpoint taken now must not count them.
        self.handed_state = generator.get_state()

    def _host_flags(self, count: int) -> torch.Tensor:
        flags = draw_flips(count, self.generator) if self.flip else torch.zeros(count, dtype=torch.bool)
        return flags.pin_memory() if self.stream is not None else flags

    def _prepare(self, host: Any) -> tuple[Batch, torch.Tensor]:
        inputs, labels, rows, *extras = host
        flags = self._host_flags(len(inputs))
        state = self.generator.get_state()
        moved = [t.to(self.device, non_blocking=True) for t in (inputs, labels, rows, flags, *extras)]
        inputs, labels, rows, flags, *extras = moved
        if self.flip:
            inputs = flip_images(inputs, flags)
        batch = Batch(network_input(inputs, self.channels_last), labels, rows, flags, tuple(extras))
        return batch, state

    def __iter__(self) -> Iterator[Batch]:
        """Batch k+1 is taken from the loader, and its flips drawn, before batch k is handed out: on CUDA its copy
        and preparation overlap step k. The CPU runs the same order (without streams), so the tests exercise what
        the GPU path does with the flip generator."""
        host_batches = iter(self.batches)
        pending = self._prepare_ahead(next(host_batches, None))
        while pending is not None:
            batch, state = pending
            if self.stream is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_stream(self.stream)
                for tensor in [batch.inputs, batch.labels, batch.rows, batch.flipped, *batch.extras]:
                    # The caching allocator must not hand this memory back to the side stream while a step uses it.
                    tensor.record_stream(current)
            pending = self._prepare_ahead(next(host_batches, None))
            self.handed_state = state
            yield batch

    def _prepare_ahead(self, host: Any) -> tuple[Batch, torch.Tensor] | None:
        if host is None:
            return None
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            return self._prepare(host)

    def rewind(self) -> None:
        """Put the generator back to just after the last batch handed out (before a mid-epoch checkpoint)."""
        self.generator.set_state(self.handed_state)
