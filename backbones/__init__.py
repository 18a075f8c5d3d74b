"""Backbones and adaptors by name.

``get_backbone`` / ``get_adaptor`` build by name; ``build_backbone`` / ``build_adaptor`` read any object with
the config's attributes. The models import nothing of the project: weights are loaded by
``utils.core.weights.load_weights``, and the adaptor names are ``config.config.ADAPTORS``.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from backbones.adaptors import DualLayerAdaptor, SLAdaptor
from backbones.iresnet import IResNet, iresnet18, iresnet34, iresnet50, iresnet100
from backbones.mobilefacenet import MobileFaceNet, mbf, mobilefacenet

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
# The adaptor input is the concatenation of this many teacher embeddings (see config.CONCAT_ORDER).
NUM_TEACHERS = 4

__all__ = [
    "BACKBONES",
    "DualLayerAdaptor",
    "IResNet",
    "MobileFaceNet",
    "SLAdaptor",
    "build_adaptor",
    "build_backbone",
    "get_adaptor",
    "get_backbone",
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
    raise ValueError(f"unknown adaptor {name!r}; known adaptors: SL, DuL, DLDPO")


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
