"""Improved ResNets (iResNet) for face recognition, with the parameter names of insightface / ElasticFace.

The names matter: the MST-KD authors released teachers and students as plain state_dicts of this layout,
and they must load with ``strict=True``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

BN_EPS = 1e-05
# Spatial stride of the whole network: the stem keeps the resolution, each of the four stages halves it.
TOTAL_STRIDE = 16

DEPTHS: dict[str, tuple[int, int, int, int]] = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
}


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class SEModule(nn.Module):
    """Squeeze-and-excitation gate with 1x1 convolutions named ``fc1``/``fc2`` (release layout)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))
        return x * gate


class IBasicBlock(nn.Module):
    """Pre-activation style residual block: BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN (+ SE)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, use_se: bool = False) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=BN_EPS)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.se_block = SEModule(planes) if use_se else None
        self.downsample: nn.Sequential | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes, eps=BN_EPS),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        if self.se_block is not None:
            out = self.se_block(out)
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """iResNet backbone returning the raw (un-normalised) embedding ``[B, embedding_size]``."""

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        input_size: int = 112,
        embedding_size: int = 512,
        dropout: float = 0.0,
        use_se: bool = False,
        width: int = 64,
    ) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"iresnet width must be positive, got {width}")
        widths = [c * width // 64 for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=BN_EPS)
        self.prelu = nn.PReLU(widths[0])
        inplanes = widths[0]
        stages = []
        for planes, depth in zip(widths, layers):
            blocks = [IBasicBlock(inplanes, planes, stride=2, use_se=use_se)]
            blocks += [IBasicBlock(planes, planes, use_se=use_se) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = nn.BatchNorm2d(inplanes, eps=BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        side = math.ceil(input_size / TOTAL_STRIDE)
        self.fc = nn.Linear(inplanes * side * side, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=BN_EPS)
        # The output BN only centres: its scale stays 1 and is excluded from training (insightface recipe).
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        self._init_weights()

    def _init_weights(self) -> None:
        # Initialisation of the reference training recipe (insightface / ElasticFace).
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1.0)
                nn.init.constant_(module.bias, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.bn2(x), 1)
        return self.features(self.fc(self.dropout(x)))


def _factory(name: str):
    def build(**kwargs) -> IResNet:
        return IResNet(DEPTHS[name], **kwargs)

    build.__name__ = name
    build.__doc__ = f"{name} with blocks {DEPTHS[name]}; kwargs as :class:`IResNet`."
    return build


iresnet18 = _factory("iresnet18")
iresnet34 = _factory("iresnet34")
iresnet50 = _factory("iresnet50")
iresnet100 = _factory("iresnet100")
