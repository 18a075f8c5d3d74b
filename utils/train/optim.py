"""The SGD of every stage, built so that a step never waits for the device.

On CUDA the optimizer is fused: GradScaler then hands it the overflow flag on the device and the fused kernel
skips the update there, where an unfused SGD makes the scaler read the flag on the host (``.item()``) every step.
Elsewhere it is the foreach implementation.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch


def build_sgd(groups: Sequence[dict[str, Any]], *, lr: float, momentum: float, weight_decay: float,
              device: torch.device) -> torch.optim.SGD:
    fused = fused_on(device)
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused,
                                foreach=None if fused else True)
    zero_momentum(optimizer)
    return optimizer


def fused_on(device: torch.device) -> bool:
    """Whether the SGD on ``device`` is the fused one (CUDA)."""
    return device.type == "cuda"


def zero_momentum(optimizer: torch.optim.SGD) -> None:
    """Start every momentum buffer at zero. The fused kernel creates missing buffers *uninitialised* on its first
    step and fills them only if that step is not skipped; an fp16 run whose first step overflows would then carry
    garbage momentum into its first real update. From zero, the first update is exactly SGD's (0 * m + g = g)."""
    for group in optimizer.param_groups:
        if group["momentum"] == 0:
            continue
        for param in group["params"]:
            optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def match_param_layout(optimizer: torch.optim.SGD) -> None:
    """Give loaded momentum buffers their parameter's memory layout (a checkpoint of a contiguous model resumed with
    channels_last): the multi-tensor kernels pair elements by position in memory."""
    for state_param, state in optimizer.state.items():
        buffer = state.get("momentum_buffer")
        if buffer is not None and buffer.stride() != state_param.stride():
            state["momentum_buffer"] = torch.empty_like(state_param).copy_(buffer)
