"""Image corruptions, in the paper's order: bias, blur, noise, gamma,
downsampling, cropping (FOV mask); plus slice clearing and simulated
skull-stripping. Each is an object holding its documented ranges (physical
units) and an application probability; ``__call__`` draws from a
``torch.Generator`` and works on (C, *spatial) float tensors in 2D or 3D.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .noise import coarse_shape, normalize, resize, separable_blur, smooth_noise
from .rng import randint, uniform


def _apply(prob: float, gen: torch.Generator) -> bool:
    # Draw even when prob is 0 or 1 so the random stream, hence every later
    # step, does not depend on which steps are switched on.
    return uniform(gen, 0, 1) < prob


@dataclass
class BiasField:
    """Multiplicative bias. 'symmetric' (eq. 5): x (1 - ||B|| B^), B^ in
    [0, 1], ||B|| ~ U(strength) (fraction: maximum intensity drop).
    'exp': exp of a smooth field of SD ~ U(strength), the SynthSeg variant."""
    strength: tuple[float, float] = (0.0, 0.5)
    points: tuple[int, int] = (2, 4)
    kind: str = "perlin"
    mode: str = "symmetric"
    prob: float = 1.0

    def field(self, shape: Sequence[int], gen: torch.Generator, device="cpu") -> torch.Tensor:
        pts = randint(gen, *self.points)
        low = smooth_noise(self.kind, coarse_shape(shape, pts, limit=24), gen, max_points=pts, device=device)
        b = resize(low, shape)[0]
        s = uniform(gen, *self.strength)
        if self.mode == "symmetric":
            return 1 - s * b
        if self.mode == "exp":
            return torch.exp(s * 2 * (2 * b - 1))
        raise ValueError(f"unknown bias mode {self.mode!r}")

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if not _apply(self.prob, gen):
            return x
        return x * self.field(x.shape[1:], gen, x.device)


@dataclass
class Blur:
    """Gaussian blur with per-axis SD ~ U(sigma) mm (eq. 6)."""
    sigma: tuple[float, float] = (0.0, 2.0)
    prob: float = 1.0

    def __call__(self, x: torch.Tensor, voxsize: Sequence[float], gen: torch.Generator) -> torch.Tensor:
        sd = uniform(gen, *self.sigma, n=len(voxsize))
        if not _apply(self.prob, gen):
            return x
        return separable_blur(x[None], [s / v for s, v in zip(sd, voxsize)])[0]


@dataclass
class Noise:
    """Additive Gaussian noise of SD ~ U(std), fraction of the [0, 1] range."""
    std: tuple[float, float] = (0.0, 0.1)
    prob: float = 1.0

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        sd = uniform(gen, *self.std)
        if not _apply(self.prob, gen) or sd == 0:
            return x
        return x + sd * torch.randn(x.shape, generator=gen).to(x.device)


@dataclass
class Gamma:
    """Min-max normalisation then x ** gamma, gamma ~ U(gamma) (eq. 7). The
    normalisation always happens: the network sees images in [0, 1]."""
    gamma: tuple[float, float] = (0.5, 1.5)
    prob: float = 1.0

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        g = uniform(gen, *self.gamma)
        x = normalize(x[None])[0]
        if not _apply(self.prob, gen):
            return x
        return x.clamp_min(0) ** g


@dataclass
class Downsample:
    """Simulated low-resolution acquisition: per-axis acquired voxel size
    ~ U(resolution) mm, i.e. factor d_i = max(1, r_i / voxsize_i); downsample
    by d_i and upsample back ('nearest' or 'linear'). ``one_axis`` makes
    only one random axis thick part of the time (clinical 2D scans)."""
    resolution: tuple[float, float] = (1.0, 4.0)
    mode: str = "linear"
    one_axis_prob: float = 0.0
    prob: float = 1.0

    def __call__(self, x: torch.Tensor, voxsize: Sequence[float], gen: torch.Generator) -> torch.Tensor:
        n = len(voxsize)
        res = uniform(gen, *self.resolution, n=n)
        thick = randint(gen, 0, n - 1)
        if _apply(self.one_axis_prob, gen):
            res = [r if i == thick else v for i, (r, v) in enumerate(zip(res, voxsize))]
        if not _apply(self.prob, gen):
            return x
        shape = x.shape[1:]
        low = [max(2, int(round(s * v / max(r, v)))) for s, v, r in zip(shape, voxsize, res)]
        if list(low) == list(shape):
            return x
        if self.mode == "nearest":
            small = F.interpolate(x[None], size=low, mode="nearest")
            return F.interpolate(small, size=tuple(shape), mode="nearest")[0]
        mode = {2: "bilinear", 3: "trilinear"}[n]
        small = F.interpolate(x[None], size=low, mode=mode, align_corners=True, antialias=False)
        return F.interpolate(small, size=tuple(shape), mode=mode, align_corners=True)[0]


def fov_mask(shape: Sequence[int], proportion: float, axis: int, side: str, device="cpu") -> torch.Tensor:
    """Binary mask zeroing ``proportion`` of the outermost voxels along ``axis``
    (side 'low', 'high' or 'both'), as a product of broadcast 1D masks (eq. 4)."""
    n = len(shape)
    mask = torch.ones([1] * n, dtype=torch.bool, device=device)
    for ax, s in enumerate(shape):
        m = torch.ones(s, dtype=torch.bool, device=device)
        if ax == axis:
            k = int(round(proportion * s))
            if side == "low":
                m[:k] = False
            elif side == "high":
                m[s - k:] = False
            else:
                m[:k // 2] = False
                m[s - (k - k // 2):] = False
        view = [1] * n
        view[ax] = s
        mask = mask & m.view(view)
    return mask


@dataclass
class RandomFOV:
    """Partial field of view: zero a proportion ~ U(proportion) (fraction) of
    the outermost voxels along one random axis, one random side."""
    proportion: tuple[float, float] = (0.0, 0.2)
    prob: float = 1.0

    def __call__(self, shape: Sequence[int], gen: torch.Generator, device="cpu") -> torch.Tensor:
        p = uniform(gen, *self.proportion)
        axis = randint(gen, 0, len(shape) - 1)
        side = ("low", "high", "both")[randint(gen, 0, 2)]
        if not _apply(self.prob, gen):
            p = 0.0
        return fov_mask(shape, p, axis, side, device)


@dataclass
class ClearSlices:
    """Zero up to ``max_fraction`` of the slices along one random axis at
    random locations (saturation / missing-slice artefacts)."""
    max_fraction: float = 0.05
    prob: float = 0.0

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        axis = randint(gen, 0, x.ndim - 2)
        count = randint(gen, 1, max(1, int(math.ceil(self.max_fraction * x.shape[1 + axis]))))
        if not _apply(self.prob, gen):
            return x
        idx = torch.randperm(x.shape[1 + axis], generator=gen)[:count].to(x.device)
        x = x.clone()
        x.index_fill_(1 + axis, idx, 0.0)
        return x


@dataclass
class SkullStrip:
    """Zero all non-brain voxels part of the time (simulated skull-stripping)."""
    prob: float = 0.0

    def __call__(self, x: torch.Tensor, brain: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
        if not _apply(self.prob, gen) or brain is None:
            return x
        return x * brain.to(x.dtype)
