"""When the ranks of a run stop together after a stop signal, without a host sync per step.

A scheduler's SIGTERM may reach one rank, or all ranks at different steps, and every rank must stop after the same
step to save one consistent checkpoint. Each step starts an asynchronous all-reduce (MAX) of this rank's flag and
reads the one started :data:`LAG_STEPS` steps earlier, long finished by then, so the step never waits on the
device or the network; the ranks agree to stop at most ``LAG_STEPS + 1`` steps after the signal (a few seconds at
the slowest steps; torchrun kills its workers 30 s after it got SIGTERM), whatever ``log_every`` is.
"""
from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist

from utils.core.signals import StopRequest

LAG_STEPS = 4


class _Flag:
    """One step's all-reduce of the local stop flag, and how to read its result without stalling the device."""

    def __init__(self, requested: bool, device: torch.device) -> None:
        self.value = torch.full((1,), float(requested), device=device)
        self.work = dist.all_reduce(self.value, op=dist.ReduceOp.MAX, async_op=True)
        self.host = self.value
        self.done: torch.cuda.Event | None = None
        if device.type == "cuda":
            self.work.wait()  # orders the copy after the collective on the device; the host goes on
            self.host = torch.empty(1, pin_memory=True)
            self.host.copy_(self.value, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()

    def read(self) -> bool:
        if self.done is None:
            self.work.wait()
        else:
            self.done.synchronize()
        return bool(self.host[0] > 0)


class StopAgreement:
    """Whether every rank stops now: :meth:`after_step` after each step (lagged), :meth:`now` at an epoch's end.

    One process reads its own request directly.
    """

    def __init__(self, stop: StopRequest, distributed: bool, device: torch.device) -> None:
        self.stop, self.distributed, self.device = stop, distributed, device
        self.pending: deque[_Flag] = deque()

    def after_step(self) -> bool:
        """True when the ranks agree to stop after this step (every rank gets the same answer at the same step)."""
        requested = self.stop.signal is not None
        if not self.distributed:
            return requested
        self.pending.append(_Flag(requested, self.device))
        return len(self.pending) > LAG_STEPS and self.pending.popleft().read()

    def now(self) -> bool:
        """A synchronous agreement (end of an epoch): True when a signal reached any rank."""
        requested = self.stop.signal is not None
        if not self.distributed:
            return requested
        while self.pending:  # the flags still in flight belong to steps before this agreement
            requested |= self.pending.popleft().read()
        return _Flag(requested, self.device).read()
