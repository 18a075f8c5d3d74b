"""Margin-based classification heads (ElasticFace family, ArcFace, CosFace, CurricularFace).

Every head owns ``kernel`` ``[embedding_size, num_classes]`` (class centres, initialised Normal(0, 0.01)) and
maps ``(embeddings, labels)`` to scaled logits ``[B, C]`` for a cross-entropy loss. The maths always runs in
fp32, also under autocast, because margins on cosines near +-1 are lost in half precision.
"""
from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# acos has an infinite derivative at +-1; keeping its argument this far inside keeps gradients finite
# while moving the logit by less than fp32 resolution matters for training.
ACOS_EPS = 1e-7


def cos_plus_margin(cos: torch.Tensor, margin: torch.Tensor | float) -> torch.Tensor:
    """cos(theta + margin) with theta = acos(cos), differentiable everywhere in [-1, 1]."""
    return torch.cos(torch.acos(cos.clamp(-1.0 + ACOS_EPS, 1.0 - ACOS_EPS)) + margin)


class MarginHead(nn.Module):
    """Shared part: label checks, fp32 normalised cosines; subclasses turn cosines into logits."""

    def __init__(self, embedding_size: int, num_classes: int, s: float) -> None:
        super().__init__()
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.s = float(s)
        self.kernel = nn.Parameter(torch.empty(embedding_size, num_classes))
        nn.init.normal_(self.kernel, mean=0.0, std=0.01)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self._check(embeddings, labels)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            cos = F.normalize(embeddings.float(), dim=1) @ F.normalize(self.kernel.float(), dim=0)
            cos = cos.clamp(-1.0, 1.0)
            return self.margin_logits(cos, labels.long().view(-1, 1))

    def margin_logits(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _check(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"{type(self).__name__} expects embeddings [B, {self.embedding_size}], got {list(embeddings.shape)}"
            )
        if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(f"labels must have shape [{embeddings.shape[0]}], got {list(labels.shape)}")
        # Asserted on the device, so the step does not wait for it (the loop checks the dataset's labels once per
        # run, with the values; this catches a bad batch from elsewhere, on CUDA as a device-side assert).
        torch._assert_async(((labels >= 0) & (labels < self.num_classes)).all(),
                            f"labels outside [0, {self.num_classes}) for {type(self).__name__}")

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, s={self.s}"


class _ElasticHead(MarginHead):
    """Per-sample margins m_i ~ Normal(m, std), drawn from the global RNG at every forward.

    With ``plus`` (the paper's "+" variants) the drawn margins are reassigned by rank so that the sample with
    the lowest target cosine (the hardest) gets the largest margin.
    """

    plus = False

    def __init__(self, embedding_size: int, num_classes: int, s: float, m: float, std: float) -> None:
        super().__init__(embedding_size, num_classes, s)
        if std < 0:
            raise ValueError(f"margin std must be >= 0, got {std}")
        self.m = float(m)
        self.std = float(std)

    def sample_margins(self, target_cos: torch.Tensor) -> torch.Tensor:
        """Margins for a batch, one per sample, aligned with ``target_cos`` ``[B]``."""
        if self.std == 0:
            return torch.full_like(target_cos, self.m)
        margins = torch.normal(self.m, self.std, size=target_cos.shape, device=target_cos.device)
        if not self.plus:
            return margins
        easiest_first = torch.argsort(target_cos.detach(), descending=True)
        ranked = torch.empty_like(margins)
        ranked[easiest_first] = torch.sort(margins).values
        return ranked

    def margin_logits(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        target = cos.gather(1, labels).squeeze(1)
        new_target = self.target_logit(target, self.sample_margins(target))
        return (cos * self.s).scatter(1, labels, (new_target * self.s).unsqueeze(1))

    def target_logit(self, target_cos: torch.Tensor, margins: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, m={self.m}, std={self.std}"


class ElasticArcFace(_ElasticHead):
    """Target logit s * cos(theta_y + m_i); gradient flows through acos and cos."""

    def __init__(
        self, embedding_size: int, num_classes: int, *, s: float = 64.0, m: float = 0.5, std: float = 0.05
    ) -> None:
        super().__init__(embedding_size, num_classes, s, m, std)

    def target_logit(self, target_cos: torch.Tensor, margins: torch.Tensor) -> torch.Tensor:
        return cos_plus_margin(target_cos, margins)


class ElasticArcFacePlus(ElasticArcFace):
    plus = True

    def __init__(
        self, embedding_size: int, num_classes: int, *, s: float = 64.0, m: float = 0.5, std: float = 0.0175
    ) -> None:
        super().__init__(embedding_size, num_classes, s=s, m=m, std=std)


class ArcFace(ElasticArcFace):
    """ElasticArcFace with a fixed margin (std 0)."""

    def __init__(self, embedding_size: int, num_classes: int, *, s: float = 64.0, m: float = 0.5) -> None:
        super().__init__(embedding_size, num_classes, s=s, m=m, std=0.0)


class ElasticCosFace(_ElasticHead):
    """Target logit s * (cos(theta_y) - m_i)."""

    def __init__(
        self, embedding_size: int, num_classes: int, *, s: float = 64.0, m: float = 0.35, std: float = 0.05
    ) -> None:
        super().__init__(embedding_size, num_classes, s, m, std)

    def target_logit(self, target_cos: torch.Tensor, margins: torch.Tensor) -> torch.Tensor:
        return target_cos - margins


class ElasticCosFacePlus(ElasticCosFace):
    plus = True

    def __init__(
        self, embedding_size: int, num_classes: int, *, s: float = 64.0, m: float = 0.35, std: float = 0.02
    ) -> None:
        super().__init__(embedding_size, num_classes, s=s, m=m, std=std)


class CosFace(ElasticCosFace):
    """ElasticCosFace with a fixed margin (std 0)."""

    def __init__(self, embedding_size: int, num_classes: int, *, s: float = 64.0, m: float = 0.35) -> None:
        super().__init__(embedding_size, num_classes, s=s, m=m, std=0.0)


class CurricularFace(MarginHead):
    """CurricularFace (Huang et al., 2020).

    Target: cos(theta_y + m) while theta_y + m < pi, else cos(theta_y) - m sin(m) (keeps it monotonic).
    Negatives harder than the target margin (cos_j > cos(theta_y + m)) become cos_j * (t + cos_j), where
    ``t`` is an EMA of the batch's mean target cosine (weight ``t_momentum`` on the new batch, updated in
    training mode before it is used).
    """

    def __init__(
        self, embedding_size: int, num_classes: int, *, s: float = 64.0, m: float = 0.5, t_momentum: float = 0.01
    ) -> None:
        super().__init__(embedding_size, num_classes, s)
        self.m = float(m)
        self.t_momentum = float(t_momentum)
        self.threshold = math.cos(math.pi - self.m)
        self.fallback = math.sin(math.pi - self.m) * self.m
        self.register_buffer("t", torch.zeros(1))

    def margin_logits(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        target = cos.gather(1, labels)
        target_m = cos_plus_margin(target, self.m)
        hard = cos > target_m
        if self.training:
            with torch.no_grad():
                self.t.mul_(1.0 - self.t_momentum).add_(self.t_momentum * target.mean())
        final_target = torch.where(target > self.threshold, target_m, target - self.fallback)
        logits = torch.where(hard, cos * (self.t + cos), cos)
        return logits.scatter(1, labels, final_target) * self.s

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, m={self.m}, t_momentum={self.t_momentum}"


HEADS: dict[str, type[MarginHead]] = {
    "ElasticArcFace": ElasticArcFace,
    "ElasticArcFacePlus": ElasticArcFacePlus,
    "ElasticCosFace": ElasticCosFace,
    "ElasticCosFacePlus": ElasticCosFacePlus,
    "ArcFace": ArcFace,
    "CosFace": CosFace,
    "CurricularFace": CurricularFace,
}
ELASTIC_HEADS = ("ElasticArcFace", "ElasticArcFacePlus", "ElasticCosFace", "ElasticCosFacePlus")


def get_head(name: str, embedding_size: int, num_classes: int, **params: Any) -> MarginHead:
    """Build a margin head by name; ``params`` are its keyword hyperparameters (s, m, std, ...)."""
    if name not in HEADS:
        raise ValueError(f"unknown margin head {name!r}; known heads: {', '.join(HEADS)}")
    cls = HEADS[name]
    fixed = ("self", "embedding_size", "num_classes")
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in fixed]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"margin head {name} does not take {unknown}; it accepts {accepted}")
    return cls(embedding_size, num_classes, **params)


def build_head(cfg: Any, num_classes: int, adaptor_stage: bool = False) -> MarginHead:
    """The head of the stage (``cfg.adaptor_loss`` for adaptors, else ``cfg.loss``) with ``cfg.margin_params``.

    Fixed-margin heads have no std: ``adaptor_std`` does not apply to them, and an explicit non-zero ``std``
    for a fixed-margin ``loss`` is a configuration error.
    """
    name = cfg.margin_loss(adaptor_stage)
    params = cfg.margin_params(adaptor_stage)
    if name not in ELASTIC_HEADS:
        if not adaptor_stage and cfg.std not in (None, 0, 0.0):
            raise ValueError(f"config key std={cfg.std} has no effect on loss={cfg.loss}; use an Elastic* loss")
        params.pop("std", None)
    return get_head(name, cfg.embedding_size, num_classes, **params)
