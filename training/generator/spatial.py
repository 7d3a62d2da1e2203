"""Spatial augmentation: random affine A = T R Z E and a smooth nonlinear
deformation phi (direct or a stationary velocity field integrated by scaling
and squaring), composed Phi = phi o A and applied ONCE to the label map.

Coordinates. A grid of ``shape`` voxels of size ``voxsize`` mm has its
physical frame centred on the grid centre: p = (i - (S - 1) / 2) * voxsize,
per tensor axis (no world orientation is involved: the label map's own axes).
A transform maps an OUTPUT point to the INPUT point it samples (pull-back).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

# Grids, sampling and SVF integration live in synthtools (the registration
# networks use them too); re-exported here for the generator's callers.
from synthtools.warp import (centered_grid, integrate_svf, jacobian_determinant,  # noqa: F401
                                  mm_to_voxel, sample)

from .noise import coarse_shape, resize, smooth_noise
from .rng import randint, uniform


# ----------------------------------------------------------------- grids

def nearest(labels: torch.Tensor, coords: torch.Tensor, fill: int = 0) -> torch.Tensor:
    """Nearest-neighbour lookup of an integer (*S) map at voxel coordinates
    given channel-first, (N, *T), in tensor-axis order: exact label values,
    any dtype, ``fill`` outside the map."""
    shape = labels.shape
    inside = None
    flat = None
    for ax, s in enumerate(shape):
        i = coords[ax].round().to(torch.int32)
        ok = (i >= 0) & (i < s)
        inside = ok if inside is None else inside & ok
        i = i.clamp_(0, s - 1)
        flat = i.long() if flat is None else flat.mul_(s).add_(i)
    out = labels.reshape(-1)[flat]
    return out.masked_fill_(~inside, fill)


# ----------------------------------------------------------------- affine

def rotation_matrix(angles_deg: Sequence[float]) -> torch.Tensor:
    """Rotation about the axes (3 angles in 3D, 1 in 2D), degrees."""
    a = [math.radians(float(x)) for x in angles_deg]
    if len(a) == 1:
        c, s = math.cos(a[0]), math.sin(a[0])
        return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    r = torch.eye(3, dtype=torch.float64)
    for ax, ang in enumerate(a):
        i, j = [k for k in range(3) if k != ax]
        m = torch.eye(3, dtype=torch.float64)
        m[i, i] = m[j, j] = math.cos(ang)
        m[i, j], m[j, i] = -math.sin(ang), math.sin(ang)
        r = r @ m
    return r


def compose_affine(translation, rotation, scaling, shear) -> torch.Tensor:
    """A = T R Z E as an (N+1) x (N+1) matrix in mm. Shear holds the upper
    off-diagonal terms (xy, xz, yz in 3D; xy in 2D)."""
    n = len(translation)
    rot = rotation_matrix(rotation)
    zoom = torch.diag(torch.tensor(list(scaling), dtype=torch.float64))
    e = torch.eye(n, dtype=torch.float64)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    for (i, j), s in zip(pairs, shear):
        e[i, j] = s
    mat = torch.eye(n + 1, dtype=torch.float64)
    mat[:n, :n] = rot @ zoom @ e
    mat[:n, n] = torch.tensor(list(translation), dtype=torch.float64)
    return mat


@dataclass
class RandomAffine:
    """Random affine A = T R Z E (Table II): translation (mm), rotation
    (degrees), scaling (factor), shear (fraction), each U(a, b) per parameter."""
    translation: tuple[float, float] = (-30.0, 30.0)
    rotation: tuple[float, float] = (-30.0, 30.0)
    scaling: tuple[float, float] = (0.9, 1.1)
    shear: tuple[float, float] = (-0.1, 0.1)
    prob: float = 1.0

    def __call__(self, ndim: int, gen: torch.Generator) -> torch.Tensor:
        if uniform(gen, 0, 1) >= self.prob:
            return torch.eye(ndim + 1, dtype=torch.float64)
        nrot = 3 if ndim == 3 else 1
        nshear = ndim * (ndim - 1) // 2
        return compose_affine(uniform(gen, *self.translation, n=ndim), uniform(gen, *self.rotation, n=nrot),
                              uniform(gen, *self.scaling, n=ndim), uniform(gen, *self.shear, n=nshear))


# ----------------------------------------------------------------- warps

@dataclass
class RandomWarp:
    """Smooth nonlinear deformation: a noise vector field scaled to a maximum
    displacement ~ U(strength) mm, with ~U(2, points) control points per axis.
    With ``svf`` the field is a velocity integrated into a diffeomorphism.

    ``max_strain`` caps the strength at that fraction of the smallest
    control-point spacing (mm): a 20 mm field on 17 mm cells compresses
    tissue ~50-fold, which no grid resolves (the sampled map folds) and no
    anatomy needs; low-frequency warps keep the full Table II range."""
    strength: tuple[float, float] = (0.0, 20.0)
    points: tuple[int, int] = (2, 16)
    kind: str = "perlin"
    svf: bool = True
    steps: int = 7
    max_strain: float | None = 0.5
    prob: float = 1.0

    def __call__(self, shape: Sequence[int], voxsize: Sequence[float], gen: torch.Generator,
                 device="cpu") -> torch.Tensor | None:
        """Velocity/displacement field (1, N, *coarse) in mm on a coarse grid
        spanning the same extent as ``shape``, or None when not applied."""
        if uniform(gen, 0, 1) >= self.prob or self.strength[1] <= 0:
            return None
        maxp = randint(gen, *self.points)
        # >= 3 samples per control-point cell (24^3 at least): a finer grid
        # only slows the scaling and squaring (48^3 cost 0.3 s per image).
        grid = coarse_shape(shape, maxp, limit=24)
        field = smooth_noise(self.kind, grid, gen, channels=len(shape), max_points=maxp, device=device)
        strength = uniform(gen, *self.strength)
        if self.max_strain is not None:
            spacing = min((s - 1) * v for s, v in zip(shape, voxsize)) / max(maxp - 1, 1)
            strength = min(strength, self.max_strain * spacing)
        return strength * (2 * field - 1)


def field_to_voxels(field_mm: torch.Tensor, shape: Sequence[int], voxsize: Sequence[float]) -> torch.Tensor:
    """Convert a coarse field in mm to units of its own coarse-grid voxels."""
    coarse = field_mm.shape[2:]
    step = [v * (s - 1) / max(c - 1, 1) for s, v, c in zip(shape, voxsize, coarse)]
    return field_mm / torch.tensor(step, device=field_mm.device).view(1, -1, *[1] * len(shape))


def displacement(field_mm: torch.Tensor, shape, voxsize, svf: bool, steps: int = 7,
                 inverse: bool = False) -> torch.Tensor:
    """Coarse displacement (1, N, *coarse) in coarse voxels for phi (or its
    inverse, exact for an SVF: exp(-v))."""
    vox = field_to_voxels(field_mm, shape, voxsize)
    if svf:
        return integrate_svf(-vox if inverse else vox, steps)
    return -vox if inverse else vox


def apply_displacement(points_vox: torch.Tensor, disp: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Move voxel coordinates (1, *T, N) of a ``shape`` grid by a coarse
    displacement (1, N, *coarse) spanning the same extent: x + u(x)."""
    coarse = disp.shape[2:]
    ratio = torch.tensor([(c - 1) / max(s - 1, 1) for s, c in zip(shape, coarse)], device=points_vox.device)
    u = sample(disp, points_vox * ratio, padding="border").movedim(1, -1)
    return points_vox + u / ratio


# ----------------------------------------------------------------- composition

@dataclass
class Transform:
    """A sampled spatial transform from an output grid to an input grid:
    Phi(p) = phi(A p). ``field`` is the coarse velocity/displacement in mm on
    the input grid (None for affine only)."""
    matrix: torch.Tensor            # (N+1, N+1) float64, output mm -> input mm
    field: torch.Tensor | None
    svf: bool
    steps: int
    in_shape: tuple
    in_voxsize: tuple
    out_shape: tuple
    out_voxsize: tuple

    def coords(self, device="cpu", spacing: float = 4.0) -> torch.Tensor:
        """Input voxel coordinates sampled by each output voxel, channel-first
        (N, *out_shape). Phi is smooth, so it is evaluated on a coarse grid
        (``spacing`` mm, corners aligned with the output grid) and upsampled
        linearly: exact for the affine part, and ~4x cheaper than evaluating
        the warp at every voxel."""
        n = len(self.out_shape)
        if self.field is None:
            coarse = [min(s, 2) for s in self.out_shape]
        else:
            coarse = [min(s, int(math.ceil((s - 1) * v / spacing)) + 1)
                      for s, v in zip(self.out_shape, self.out_voxsize)]
        axes = [torch.linspace(-(s - 1) / 2 * v, (s - 1) / 2 * v, c, device=device)
                for s, v, c in zip(self.out_shape, self.out_voxsize, coarse)]
        p = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
        m = self.matrix.to(device=device, dtype=torch.float32)
        vox = mm_to_voxel(p @ m[:n, :n].T + m[:n, n], self.in_shape, self.in_voxsize)[None]
        if self.field is not None:
            disp = displacement(self.field.to(device), self.in_shape, self.in_voxsize, self.svf, self.steps)
            vox = apply_displacement(vox, disp, self.in_shape)
        return resize(vox.movedim(-1, 1), self.out_shape)[0]

    def jacobian_determinant(self, device="cpu") -> torch.Tensor:
        return jacobian_determinant(self.coords(device).movedim(0, -1))


def sample_transform(in_shape, in_voxsize, gen: torch.Generator, affine: RandomAffine | None,
                     warp: RandomWarp | None, out_shape=None, out_voxsize=None, device="cpu") -> Transform:
    """Draw Phi = phi o A for an input grid; the output grid defaults to the input's."""
    n = len(in_shape)
    out_shape = tuple(out_shape or in_shape)
    out_voxsize = tuple(out_voxsize or in_voxsize)
    mat = affine(n, gen) if affine is not None else torch.eye(n + 1, dtype=torch.float64)
    field = warp(in_shape, in_voxsize, gen, device) if warp is not None else None
    return Transform(mat, field, bool(warp and warp.svf), warp.steps if warp else 7,
                     tuple(in_shape), tuple(in_voxsize), out_shape, out_voxsize)
