"""Adaptors mapping the concatenated teacher embeddings (4 x 512 = 2048-D) to the common 512-D space.

Forward returns the raw projection; consumers L2-normalise it.
"""
from __future__ import annotations

import torch
from torch import nn


class _Adaptor(nn.Module):
    # The authors' released adaptor weights carry unused attention entries; loading drops them.
    ignored_release_prefixes: tuple[str, ...] = ("attention.", "key_vector", "value_vector")


class SLAdaptor(_Adaptor):
    """SL: a single Linear layer with bias."""

    def __init__(self, in_features: int = 2048, embedding_size: int = 512) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class DualLayerAdaptor(_Adaptor):
    """DuL (fc1 -> LeakyReLU -> fc2) or, with ``dropout`` > 0, DLDPO (fc1 -> Dropout -> LeakyReLU -> fc2)."""

    def __init__(
        self,
        in_features: int = 2048,
        embedding_size: int = 512,
        middle_layer_size: int = 512,
        dropout: float = 0.0,
        negative_slope: float = 0.01,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"adaptor dropout must be in [0, 1), got {dropout}")
        self.fc1 = nn.Linear(in_features, middle_layer_size)
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.act = nn.LeakyReLU(negative_slope)
        self.fc2 = nn.Linear(middle_layer_size, embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.dropout(self.fc1(x))))
