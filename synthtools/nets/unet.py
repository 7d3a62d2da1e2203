"""A U-Net configured by a few numbers, for 2D or 3D inputs (voxelmorph /
neurite style): features per level, convolutions per level, no normalisation
layers (so inference does not depend on batch statistics)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def _conv(ndim: int):
    return {2: nn.Conv2d, 3: nn.Conv3d}[ndim]


class ConvBlock(nn.Sequential):
    """``n`` convolutions (3^N kernels), each followed by LeakyReLU(0.2)."""

    def __init__(self, ndim: int, cin: int, cout: int, n: int = 2):
        layers = []
        for i in range(n):
            layers += [_conv(ndim)(cin if i == 0 else cout, cout, 3, padding=1), nn.LeakyReLU(0.2)]
        super().__init__(*layers)


class UNet(nn.Module):
    """Encoder-decoder with skip connections. ``features[k]`` channels at level
    k (level 0 = full resolution); inputs need sizes divisible by
    2 ** (len(features) - 1)."""

    def __init__(self, ndim: int = 3, in_channels: int = 1, out_channels: int = 1,
                 features: Sequence[int] = (16, 32, 64, 64), convs: int = 2):
        super().__init__()
        self.ndim = ndim
        self.config = dict(ndim=ndim, in_channels=in_channels, out_channels=out_channels,
                           features=list(features), convs=convs)
        f = list(features)
        self.down = nn.ModuleList()
        cin = in_channels
        for c in f:
            self.down.append(ConvBlock(ndim, cin, c, convs))
            cin = c
        self.up = nn.ModuleList()
        for k in range(len(f) - 2, -1, -1):
            self.up.append(ConvBlock(ndim, cin + f[k], f[k], convs))
            cin = f[k]
        self.head = _conv(ndim)(cin, out_channels, 1)

    @property
    def multiple(self) -> int:
        return 2 ** (len(self.down) - 1)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Activations after every block (for the invariance diagnostic)."""
        out = []
        skips = []
        pool = {2: F.max_pool2d, 3: F.max_pool3d}[self.ndim]
        for k, block in enumerate(self.down):
            if k > 0:
                x = pool(x, 2)
            x = block(x)
            out.append(x)
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[2:], mode="nearest")
            x = block(torch.cat([x, skip], dim=1))
            out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)[-1])
