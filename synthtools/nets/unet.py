"""A U-Net configured by a few numbers, for 2D or 3D inputs (voxelmorph /
neurite style): features per level, convolutions per level and, optionally,
a normalisation after each convolution: ``batch`` (SynthSeg's choice; in
eval mode it uses the running statistics) or ``instance`` (nnU-Net's: the
statistics of the input itself, in training and inference alike, so a
batch of one trains as it predicts), and deep supervision heads on the
coarser decoder levels (training only: ``forward`` returns the full-resolution
output)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


NORMS = (None, "batch", "instance")


def _conv(ndim: int):
    return {2: nn.Conv2d, 3: nn.Conv3d}[ndim]


class ConvBlock(nn.Sequential):
    """``n`` convolutions (3^N kernels), each followed by LeakyReLU(0.2), or
    by a normalisation (``norm``: ``"batch"`` or ``"instance"``, with a
    learnt scale and shift per channel) then LeakyReLU."""

    def __init__(self, ndim: int, cin: int, cout: int, n: int = 2, norm: str | None = None):
        if norm not in NORMS:
            raise ValueError(f"unknown normalisation {norm!r} (one of {NORMS})")
        layers: list[nn.Module] = []
        for i in range(n):
            layers.append(_conv(ndim)(cin if i == 0 else cout, cout, 3, padding=1))
            if norm == "batch":
                layers.append({2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[ndim](cout))
            elif norm == "instance":
                layers.append({2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[ndim](cout, affine=True))
            layers.append(nn.LeakyReLU(0.2))
        super().__init__(*layers)


def levels(ndim: int, in_channels: int, features: Sequence[int], convs: int,
           norm: str | None = None) -> tuple[nn.ModuleList, nn.ModuleList]:
    """Encoder blocks (``features[k]`` channels at level k, level 0 = full
    resolution) and decoder blocks (deepest level up, each fed the upsampled
    features and the encoder's skip): the U-Net every network here shares."""
    f = list(features)
    down, cin = nn.ModuleList(), in_channels
    for c in f:
        down.append(ConvBlock(ndim, cin, c, convs, norm))
        cin = c
    up = nn.ModuleList()
    for k in range(len(f) - 2, -1, -1):
        up.append(ConvBlock(ndim, cin + f[k], f[k], convs, norm))
        cin = f[k]
    return down, up


def run_levels(x: torch.Tensor, down: nn.ModuleList, up: nn.ModuleList,
               modulate: Sequence[Callable[[torch.Tensor], torch.Tensor]] | None = None) -> list[torch.Tensor]:
    """Activations after every block of ``levels``: max-pool down, nearest
    upsampling back. ``modulate[0]`` (optional) acts on the bottleneck
    output, ``modulate[j]`` on the j-th decoder block's output."""
    pool = {4: F.max_pool2d, 5: F.max_pool3d}[x.ndim]
    out, skips = [], []
    for k, block in enumerate(down):
        x = block(pool(x, 2) if k else x)
        out.append(x)
        skips.append(x)
    if modulate is not None:
        x = out[-1] = modulate[0](x)
    for j, (block, skip) in enumerate(zip(up, reversed(skips[:-1])), start=1):
        x = F.interpolate(x, size=skip.shape[2:], mode="nearest")
        x = block(torch.cat([x, skip], dim=1))
        if modulate is not None:
            x = modulate[j](x)
        out.append(x)
    return out


class UNet(nn.Module):
    """Encoder-decoder with skip connections. ``features[k]`` channels at level
    k (level 0 = full resolution); inputs need sizes divisible by
    2 ** (len(features) - 1). ``norm``: None, ``"batch"`` or ``"instance"``.
    ``deep_supervision``: number of extra 1x1 heads on the decoder levels
    just above full resolution (level 1, 2, ...), for :meth:`forward_all`."""

    def __init__(self, ndim: int = 3, in_channels: int = 1, out_channels: int = 1,
                 features: Sequence[int] = (16, 32, 64, 64), convs: int = 2, norm: str | None = None,
                 deep_supervision: int = 0):
        super().__init__()
        self.ndim = ndim
        self.config = dict(ndim=ndim, in_channels=in_channels, out_channels=out_channels,
                           features=list(features), convs=convs)
        # Older metadata has neither key: such models stay loadable and unchanged.
        if norm is not None:
            self.config["norm"] = norm
        if deep_supervision:
            if not 0 < deep_supervision < len(features) - 1:
                raise ValueError(f"deep_supervision must be in 1..{len(features) - 2}, got {deep_supervision}")
            self.config["deep_supervision"] = int(deep_supervision)
        self.down, self.up = levels(ndim, in_channels, features, convs, norm)
        self.head = _conv(ndim)(features[0], out_channels, 1)
        self.aux = nn.ModuleList(_conv(ndim)(features[k], out_channels, 1)
                                 for k in range(1, deep_supervision + 1))

    @property
    def multiple(self) -> int:
        return 2 ** (len(self.down) - 1)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Activations after every block (for the invariance diagnostic)."""
        return run_levels(x, self.down, self.up)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """The full-resolution output; in training mode with deep supervision
        heads, :meth:`forward_all`'s list (so the loss sees every level even
        through a DistributedDataParallel wrapper, which calls forward)."""
        if self.training and len(self.aux):
            return self.forward_all(x)
        return self.head(self.features(x)[-1])

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Full-resolution output first, then one output per deep
        supervision head (level 1 = half resolution, level 2 = quarter...)."""
        out = self.features(x)
        outputs = [self.head(out[-1])]
        for k, head in enumerate(self.aux, start=1):
            outputs.append(head(out[-1 - k]))
        return outputs
