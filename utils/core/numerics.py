"""Non-finite numbers: found before they are written, reported with where they came from."""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch

from utils.core.errors import UserError


class NonFiniteError(UserError, RuntimeError):
    """Training or extraction produced NaN or infinite values; nothing of them was written."""


def nonfinite_entries(state: Mapping[str, torch.Tensor] | None) -> list[str]:
    """Names of the floating-point tensors of ``state`` (weights and buffers, e.g. BatchNorm running stats)
    holding a NaN or an infinity."""
    if not state:
        return []
    return [name for name, tensor in state.items()
            if torch.is_floating_point(tensor) and not bool(torch.isfinite(tensor).all())]


def first_nonfinite_row(rows: np.ndarray) -> int | None:
    """Index of the first row of a 2-D array with a NaN or an infinity, or None."""
    bad = ~np.isfinite(rows).all(axis=1)
    return int(np.argmax(bad)) if bad.any() else None


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced so that the JSON is standard (RFC 8259 has no NaN or
    Infinity): NaN becomes ``null``, infinities the strings ``"inf"`` / ``"-inf"``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value
