"""ResNet-18 trunk + FPN giving the four feature scales ACLUS pools masks on."""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torchvision
from torchvision.ops import FeaturePyramidNetwork

#: scale names, coarse to fine, with their channel count
SCALES = ("c5", "p4", "p3", "p2")
FPN_DIM = 256
C5_DIM = 512


class MultiScaleEncoder(nn.Module):
    """ResNet-18 + FPN.

    ``forward(x)`` with x: (N, 3, H, W) returns ``{"c5": (N, 512, H/32, W/32),
    "p4": (N, 256, H/16, W/16), "p3": (N, 256, H/8, W/8), "p2": (N, 256, H/4, W/4)}``;
    with ``fpn=False`` (a plain ResNet-18, for the classic BYOL) only ``{"c5": ...}``.

    The ResNet is a stock ``torchvision.models.resnet18`` (its ``fc`` unused), so its
    state dict loads into torchvision directly.
    """

    def __init__(self, pretrained: bool = False, fpn: bool = True):
        super().__init__()
        weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1 if pretrained else None
        self.resnet = torchvision.models.resnet18(weights=weights)
        self.resnet.fc = nn.Identity()  # keeps torchvision key names; no parameters
        self.fpn = None
        if fpn:
            self.fpn = FeaturePyramidNetwork([64, 128, 256, 512], FPN_DIM)
            # P5 is not used (C5 is): drop its 3x3 output conv so that no parameter is
            # left without gradient (DDP would stall on it) and no work is wasted.
            self.fpn.layer_blocks[-1] = nn.Identity()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        r = self.resnet
        x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        c2 = r.layer1(x)                 # N x 64 x H/4
        c3 = r.layer2(c2)                # N x 128 x H/8
        c4 = r.layer3(c3)                # N x 256 x H/16
        c5 = r.layer4(c4)                # N x 512 x H/32
        if self.fpn is None:
            return {"c5": c5}
        p = self.fpn(OrderedDict(p2=c2, p3=c3, p4=c4, p5=c5))
        return {"c5": c5, "p4": p["p4"], "p3": p["p3"], "p2": p["p2"]}


class MLP(nn.Module):
    """Linear - BN - ReLU - Linear, applied to the last dim of (..., in_dim) tensors."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim),
                                 nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return self.net(x.reshape(-1, shape[-1])).reshape(*shape[:-1], -1)
