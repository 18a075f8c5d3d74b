"""Strict loading of plain state_dicts into any model: never a silent fall-back to random weights."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from utils.core.errors import IncompatibleInputError
from utils.core.io import load_state_dict_file

# Loading one architecture's weights into another can mismatch hundreds of keys; list a readable number.
_MAX_LISTED = 20


def load_weights(
    model: nn.Module, source: str | Path | Mapping[str, torch.Tensor], what: str = "weights"
) -> nn.Module:
    """Load a plain state_dict (file or mapping) into ``model`` strictly and return the model.

    Keys under the model's ``ignored_release_prefixes`` are dropped first. BatchNorm
    ``num_batches_tracked`` counters may be absent (older checkpoints); they do not affect the outputs.
    Any other missing, unexpected or mis-shaped entry raises a ``RuntimeError`` naming the source.
    """
    if isinstance(source, (str, Path)):
        label = str(source)
        state = dict(load_state_dict_file(source, what=what))
    else:
        label = "<in-memory state_dict>"
        state = dict(source)
    ignored = tuple(getattr(model, "ignored_release_prefixes", ()))
    if ignored:
        state = {k: v for k, v in state.items() if not k.startswith(ignored)}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"{what} {label} do not match {type(model).__name__}:"]
        groups = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
        for title, keys in groups:
            if keys:
                more = f", ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
                lines.append(f"  {title} ({len(keys)}): {', '.join(keys[:_MAX_LISTED])}{more}")
        raise IncompatibleInputError("\n".join(lines))
    for key, value in expected.items():
        if key not in state:
            state[key] = value
    model.load_state_dict(state, strict=True)
    return model
