"""Dense spatial maths, no network: centred grids, grid sampling at voxel
coordinates, scaling-and-squaring integration of stationary velocity fields,
warping images by displacement fields and Jacobian determinants. One
implementation for resampling (:mod:`synthtools.conform`), the registration
networks and fits (:mod:`synthtools.nets.registration`, :mod:`synthtools.morph`)
and the generator (:mod:`synthtools.training.generator.spatial` re-exports these).

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

__all__ = ["centered_grid", "mm_to_voxel", "sample", "grid_sample", "integrate_svf", "identity_grid", "warp_image",
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
    return grid_sample(field, norm.to(field.dtype), mode=mode, padding=padding)


def grid_sample(field: torch.Tensor, norm: torch.Tensor, mode: str = "bilinear",
                padding: str = "zeros") -> torch.Tensor:
    """``F.grid_sample`` (align_corners=True) of a (B, C, *S) field at
    normalised coordinates (B, *T, N), using every CPU thread for a 3D batch
    of one (see :func:`_batch_split`); same values."""
    parts = _batch_split(field, norm)
    if parts > 1:
        return _sample_split(field, norm, parts, mode, padding)
    return F.grid_sample(field, norm, mode=mode, padding_mode=padding, align_corners=True)


# Below this many target points a split costs more than the second thread gains.
_SPLIT_MIN_POINTS = 1 << 15


def _batch_split(field: torch.Tensor, norm: torch.Tensor) -> int:
    """How many pieces to cut a 3D CPU sampling into. ATen's 3D CPU
    grid sampler runs one thread per batch item (forward and backward), so a
    batch of one uses one core whatever ``torch.get_num_threads()`` says;
    the same points as a batch of ``threads`` run ~1.5x faster on 2 threads."""
    if field.device.type != "cpu" or field.ndim != 5 or field.shape[0] != 1:
        return 1
    if norm[0, ..., 0].numel() < _SPLIT_MIN_POINTS:
        return 1
    return max(1, torch.get_num_threads())


def _sample_split(field: torch.Tensor, norm: torch.Tensor, parts: int, mode: str,
                  padding: str) -> torch.Tensor:
    """``grid_sample`` of a batch-of-one field at (1, *T, 3) normalised
    coordinates, cut along the longest target axis into ``parts`` batch items
    (the last piece padded by repeating its final slice); same values."""
    axis = 1 + max(range(norm.ndim - 2), key=lambda a: norm.shape[1 + a])
    n = norm.shape[axis]
    size = -(-n // parts)
    pad = size * parts - n
    if pad:
        norm = torch.cat([norm, norm.narrow(axis, n - 1, 1).expand(
            *[pad if d == axis else -1 for d in range(norm.ndim)])], dim=axis)
    pieces = torch.cat(norm.split(size, dim=axis), dim=0)
    out = F.grid_sample(field.expand(parts, *field.shape[1:]), pieces, mode=mode, padding_mode=padding,
                        align_corners=True)
    out = torch.cat(out.split(1, dim=0), dim=axis + 1)       # output axes: (B, C, *T)
    return out.narrow(axis + 1, 0, n) if pad else out


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
