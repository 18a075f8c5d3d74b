"""MobileFaceNet (Chen et al., 2018) and insightface's wider ``mbf`` variant.

Both share one layout: a stride-2 3x3 stem, a grouped 3x3 conv, three stages of inverted-residual
bottlenecks (each opened by a stride-2 block without shortcut), a 1x1 conv, and the embedding head
global depthwise conv -> flatten -> Linear -> BatchNorm1d. They differ only in channel counts, given
here for ``width=64``; ``width`` scales every channel count by ``width / 64``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

TOTAL_STRIDE = 16


@dataclass(frozen=True)
class Stage:
    channels: int  # output channels of every block of the stage
    strided_inner: int  # expansion channels of the opening stride-2 block
    residual_inner: int  # expansion channels of the stride-1 residual blocks
    residual_blocks: int


@dataclass(frozen=True)
class MobileFaceNetSpec:
    stem: int
    stem_groups: int
    stages: tuple[Stage, Stage, Stage]
    head: int  # channels of the last 1x1 conv and of the global depthwise conv


# The paper's table: bottleneck expansions t=2/4 over 64/128 channels, 5 + 1 + 6 + 1 + 2 bottlenecks.
CLASSIC = MobileFaceNetSpec(
    stem=64,
    stem_groups=64,
    stages=(Stage(64, 128, 128, 4), Stage(128, 256, 256, 6), Stage(128, 512, 256, 2)),
    head=512,
)
# insightface arcface_torch "mbf" (scale 2, blocks (1, 4, 6, 2)): channels doubled, expansions kept.
MBF = MobileFaceNetSpec(
    stem=128,
    stem_groups=64,
    stages=(Stage(128, 128, 128, 4), Stage(256, 256, 256, 6), Stage(256, 512, 256, 2)),
    head=512,
)


def _conv_bn(
    in_c: int, out_c: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True, pad: bool = True
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=kernel // 2 if pad else 0, groups=groups, bias=False),
        nn.BatchNorm2d(out_c),
    ]
    if act:
        layers.append(nn.PReLU(out_c))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """Inverted residual: 1x1 expand -> 3x3 depthwise (stride) -> 1x1 linear projection."""

    def __init__(self, in_c: int, out_c: int, inner: int, stride: int) -> None:
        super().__init__()
        self.residual = stride == 1 and in_c == out_c
        self.body = nn.Sequential(
            _conv_bn(in_c, inner),
            _conv_bn(inner, inner, kernel=3, stride=stride, groups=inner),
            _conv_bn(inner, out_c, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return out + x if self.residual else out


class MobileFaceNet(nn.Module):
    """Returns the raw (un-normalised) embedding ``[B, embedding_size]``."""

    def __init__(
        self,
        spec: MobileFaceNetSpec = CLASSIC,
        input_size: int = 112,
        embedding_size: int = 512,
        dropout: float = 0.0,
        width: int = 64,
    ) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"mobilefacenet width must be positive, got {width}")

        def ch(n: int) -> int:
            return max(1, n * width // 64)

        self.stem = nn.Sequential(
            _conv_bn(3, ch(spec.stem), kernel=3, stride=2),
            _conv_bn(ch(spec.stem), ch(spec.stem), kernel=3, groups=ch(spec.stem_groups)),
        )
        blocks: list[nn.Module] = []
        in_c = ch(spec.stem)
        for stage in spec.stages:
            out_c = ch(stage.channels)
            blocks.append(Bottleneck(in_c, out_c, ch(stage.strided_inner), stride=2))
            blocks += [Bottleneck(out_c, out_c, ch(stage.residual_inner), 1) for _ in range(stage.residual_blocks)]
            in_c = out_c
        self.blocks = nn.Sequential(*blocks)
        head = ch(spec.head)
        self.conv_sep = _conv_bn(in_c, head)
        side = math.ceil(input_size / TOTAL_STRIDE)
        # Global depthwise conv: one learned spatial weighting per channel instead of average pooling.
        self.gdc = _conv_bn(head, head, kernel=side, groups=head, act=False, pad=False)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(head, embedding_size, bias=False)
        self.features = nn.BatchNorm1d(embedding_size)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_sep(self.blocks(self.stem(x)))
        x = torch.flatten(self.gdc(x), 1)
        return self.features(self.fc(self.dropout(x)))


def mobilefacenet(**kwargs) -> MobileFaceNet:
    """The classic MobileFaceNet (about 1.2 M parameters and 0.22 GMACs at 112x112, 512-D)."""
    return MobileFaceNet(CLASSIC, **kwargs)


def mbf(**kwargs) -> MobileFaceNet:
    """insightface's ``mbf`` (about 2.06 M parameters and 0.44 GMACs at 112x112, 512-D)."""
    return MobileFaceNet(MBF, **kwargs)
