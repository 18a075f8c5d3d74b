"""Backbones and adaptors by name, and strict weight loading.

``get_backbone`` / ``get_adaptor`` build by name; ``build_backbone`` / ``build_adaptor`` read a
:class:`config.config.Config`; ``load_weights`` loads a plain state_dict strictly (never falls back to
random weights).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from backbones.adaptors import DualLayerAdaptor, SLAdaptor
from backbones.iresnet import IResNet, iresnet18, iresnet34, iresnet50, iresnet100
from backbones.mobilefacenet import MobileFaceNet, mbf, mobilefacenet
from utils.core.errors import IncompatibleInputError
from utils.core.io import load_state_dict_file

_BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "iresnet18": iresnet18,
    "iresnet34": iresnet34,
    "iresnet50": iresnet50,
    "iresnet100": iresnet100,
    "mobilefacenet": mobilefacenet,
    "mbf": mbf,
}
# The paper's iResNet-50 uses dropout 0.4 before the FC; every other network defaults to none.
_DEFAULT_DROPOUT = {"iresnet50": 0.4}
BACKBONES = tuple(_BACKBONES)
ADAPTORS = ("SL", "DuL", "DLDPO")
# The adaptor input is the concatenation of this many teacher embeddings (see config.CONCAT_ORDER).
NUM_TEACHERS = 4
# Loading one architecture's weights into another can mismatch hundreds of keys; list a readable number.
_MAX_LISTED = 20

__all__ = [
    "ADAPTORS",
    "BACKBONES",
    "DualLayerAdaptor",
    "IResNet",
    "MobileFaceNet",
    "SLAdaptor",
    "build_adaptor",
    "build_backbone",
    "get_adaptor",
    "get_backbone",
    "load_weights",
]


def get_backbone(
    name: str,
    *,
    input_size: int = 112,
    embedding_size: int = 512,
    dropout: float | None = None,
    use_se: bool = False,
    width: int = 64,
) -> nn.Module:
    """Build a backbone by name; ``dropout=None`` means the network's default."""
    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(BACKBONES)}")
    kwargs: dict[str, Any] = {
        "input_size": input_size,
        "embedding_size": embedding_size,
        "dropout": _DEFAULT_DROPOUT.get(name, 0.0) if dropout is None else float(dropout),
        "width": width,
    }
    if name.startswith("iresnet"):
        kwargs["use_se"] = use_se
    elif use_se:
        raise ValueError(f"use_se=True is only available for the iresnets, not {name!r}")
    return _BACKBONES[name](**kwargs)


def get_adaptor(
    name: str,
    *,
    in_features: int = 2048,
    embedding_size: int = 512,
    middle_layer_size: int = 512,
    dropout: float = 0.2,
    negative_slope: float = 0.01,
) -> nn.Module:
    """Build SL, DuL or DLDPO; ``dropout`` only applies to DLDPO."""
    if name == "SL":
        return SLAdaptor(in_features, embedding_size)
    if name in ("DuL", "DLDPO"):
        return DualLayerAdaptor(
            in_features,
            embedding_size,
            middle_layer_size,
            dropout=dropout if name == "DLDPO" else 0.0,
            negative_slope=negative_slope,
        )
    raise ValueError(f"unknown adaptor {name!r}; known adaptors: {', '.join(ADAPTORS)}")


def build_backbone(cfg: Any, student: bool = False) -> nn.Module:
    """The teacher (``cfg.network``) or student (``cfg.student_network``) backbone of a config."""
    return get_backbone(
        cfg.student_network if student else cfg.network,
        input_size=cfg.input_size,
        embedding_size=cfg.embedding_size,
        dropout=cfg.dropout,
        use_se=cfg.use_se,
        width=cfg.width,
    )


def build_adaptor(cfg: Any, name: str | None = None) -> nn.Module:
    """The adaptor ``name`` (default ``cfg.adaptor``) over the four teachers' concatenated embeddings."""
    return get_adaptor(
        name or cfg.adaptor,
        in_features=NUM_TEACHERS * cfg.embedding_size,
        embedding_size=cfg.embedding_size,
        middle_layer_size=cfg.middle_layer_size,
        dropout=cfg.adaptor_dropout,
        negative_slope=cfg.adaptor_negative_slope,
    )


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
