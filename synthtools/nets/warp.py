"""Dense spatial maths shared by the generator (``training``) and the
registration networks (``synthtools``): centred grids, grid sampling at voxel
coordinates, scaling-and-squaring integration of stationary velocity fields,
warping images by displacement fields and Jacobian determinants. One
implementation: ``training.generator.spatial`` imports these.

Conventions: fields are channel-first (B, N, *S) with components in
tensor-axis order; displacements and velocities are in voxels of the grid
they live on; a displacement ``u`` is a pull-back: the warped image is
``out(x) = image(x + u(x))``. A grid of ``shape`` voxels of size ``voxsize``
mm has its centred physical frame p = (i - (S - 1) / 2) * voxsize.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["centered_grid", "mm_to_voxel", "sample", "integrate_svf", "identity_grid", "warp_image",
           "jacobian_determinant", "centered_vox2mm"]


def centered_grid(shape: Sequence[int], voxsize: Sequence[float], device="cpu") -> torch.Tensor:
    """Physical coordinates (mm) of every voxel centre, shape (*shape, N)."""
    axes = [(torch.arange(s, device=device, dtype=torch.float32) - (s - 1) / 2) * v
            for s, v in zip(shape, voxsize)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def centered_vox2mm(shape: Sequence[int], voxsize: float | Sequence[float], dtype=torch.float32,
                    device="cpu") -> torch.Tensor:
    """(N+1, N+1) matrix: voxel index -> centred mm frame of the grid."""
    n = len(shape)
    vs = [float(voxsize)] * n if isinstance(voxsize, (int, float)) else [float(v) for v in voxsize]
    m = torch.eye(n + 1, dtype=dtype, device=device)
    for i, (s, v) in enumerate(zip(shape, vs)):
        m[i, i] = v
        m[i, n] = -(s - 1) / 2 * v
    return m


def mm_to_voxel(points: torch.Tensor, shape: Sequence[int], voxsize: Sequence[float]) -> torch.Tensor:
    """Centred mm coordinates (..., N) to voxel indices of a grid."""
    c = torch.tensor([(s - 1) / 2 for s in shape], device=points.device, dtype=points.dtype)
    v = torch.tensor(list(voxsize), device=points.device, dtype=points.dtype)
    return points / v + c


def sample(field: torch.Tensor, coords: torch.Tensor, mode: str = "bilinear",
           padding: str = "zeros") -> torch.Tensor:
    """Interpolate a (B, C, *S) field at voxel coordinates (B, *T, N) given in
    tensor-axis order; returns (B, C, *T)."""
    shape = field.shape[2:]
    scale = torch.tensor([2.0 / max(s - 1, 1) for s in shape], device=coords.device, dtype=coords.dtype)
    norm = (coords * scale - 1).flip(-1)  # grid_sample wants (x, y, z) = last axis first
    return F.grid_sample(field, norm.to(field.dtype), mode=mode, padding_mode=padding, align_corners=True)


def identity_grid(shape: Sequence[int], device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Voxel coordinates of every voxel, (1, *shape, N)."""
    return torch.stack(torch.meshgrid(*[torch.arange(s, device=device, dtype=dtype) for s in shape],
                                      indexing="ij"), dim=-1)[None]


def integrate_svf(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Scaling and squaring of a stationary velocity field (B, N, *S) given in
    voxels of its own grid; returns the displacement of exp(v), same units."""
    disp = velocity / (2 ** steps)
    shape = velocity.shape[2:]
    ident = torch.stack(torch.meshgrid(*[torch.arange(s, device=velocity.device, dtype=velocity.dtype)
                                         for s in shape], indexing="ij"), dim=-1)[None]
    for _ in range(steps):
        disp = disp + sample(disp, ident + disp.movedim(1, -1), padding="border")
    return disp


def warp_image(image: torch.Tensor, disp: torch.Tensor, mode: str = "bilinear",
               padding: str = "zeros") -> torch.Tensor:
    """Pull an image (B, C, *S) back through a displacement (B, N, *S) in
    voxels of the same grid: ``out(x) = image(x + disp(x))``."""
    ident = identity_grid(disp.shape[2:], disp.device, disp.dtype)
    return sample(image, ident + disp.movedim(1, -1), mode=mode, padding=padding)


def jacobian_determinant(coords: torch.Tensor) -> torch.Tensor:
    """Determinant of the Jacobian of a coordinate map (*S, N) by central
    differences (interior voxels only)."""
    n = coords.shape[-1]
    grads = []
    for ax in range(n):
        sl_hi = [slice(1, -1)] * n
        sl_lo = [slice(1, -1)] * n
        sl_hi[ax] = slice(2, None)
        sl_lo[ax] = slice(None, -2)
        grads.append((coords[tuple(sl_hi)] - coords[tuple(sl_lo)]) / 2)
    jac = torch.stack(grads, dim=-1)  # (..., N components, N axes)
    return torch.linalg.det(jac.double())
