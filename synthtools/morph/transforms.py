"""Spatial transforms between two images: model and resampling.

Convention
----------
World space is scanner RAS in mm (the NIfTI/FreeSurfer world). Every
transform is held as a *pull-back* point map ``T`` from FIXED world
coordinates to MOVING world coordinates: the moving image resampled into the
fixed space is ``moved(x) = moving(T(x))`` for every fixed voxel centre ``x``.
This is the direction resampling needs, and the one ITK/ANTs store.

* :class:`Affine`: a 4x4 matrix ``M``, ``moving_point = M @ fixed_point``
  (homogeneous RAS mm), with optional FIXED and MOVING grids (shape and
  voxel->RAS affine), which an LTA file records.
* :class:`Warp`: a displacement field ``u`` in RAS mm, shape (X, Y, Z, 3),
  defined on the FIXED grid: ``moving_point = x + u(x)``.

File formats (LTA, ITK text, NIfTI and MGH warps): :mod:`synthtools.morph.formats`.

Resampling (:func:`apply_transform`) goes through torch ``grid_sample``
(trilinear or nearest); a 4D moving image is resampled frame by frame with the
same transform. :func:`update_header` gives the vox2ras for ``-H``
(header-only) output of a linear transform. Every problem with a file is an
:class:`~synthtools.io.InputError` whose one-line message starts with its path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..conform import resample
from ..io import InputError, Volume

__all__ = ["Geometry", "Affine", "Warp", "Transform", "as_geometry", "invert", "compose", "to_dense",
           "apply_transform", "update_header"]

# Output voxels per grid_sample call along the first axis (bounds memory).
_SLAB = 32
# Grids closer than this (mm, affine entries) count as the same grid.
_GRID_TOL = 1e-3

# ---------------------------------------------------------------- model --

@dataclass
class Geometry:
    """An image grid: spatial ``shape`` and voxel->RAS ``affine`` (mm);
    ``path`` names the image (written into LTA volume info)."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    path: str | None = None

    def __post_init__(self) -> None:
        self.shape = tuple(int(n) for n in self.shape)  # type: ignore[assignment]
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"grid shape must be 3 positive ints, got {self.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"grid affine must be 4x4, got {self.affine.shape}")

    def same_grid(self, other: "Geometry", tol: float = _GRID_TOL) -> bool:
        """Same shape and (within ``tol``) the same affine."""
        return self.shape == other.shape and bool(np.allclose(self.affine, other.affine, atol=tol))

    def describe(self) -> str:
        vs = np.sqrt(np.sum(self.affine[:3, :3] ** 2, axis=0))
        return "x".join(map(str, self.shape)) + " voxels of " + "x".join(f"{v:.4g}" for v in vs) + " mm"


GeometryLike = Union[Geometry, Volume, tuple, Any]


def as_geometry(obj: GeometryLike) -> Geometry:
    """A :class:`Geometry` from a Geometry, a Volume, a nibabel image or a
    ``(shape, affine)`` pair."""
    if isinstance(obj, Geometry):
        return obj
    if isinstance(obj, Volume):
        return Geometry(obj.shape, obj.affine, obj.path)
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        return Geometry(tuple(obj[0])[:3], obj[1])
    if hasattr(obj, "affine") and hasattr(obj, "shape"):  # nibabel image
        return Geometry(tuple(obj.shape)[:3], obj.affine, getattr(obj, "get_filename", lambda: None)())
    raise TypeError(f"cannot make an image grid from {type(obj).__name__}")


def _opt_geometry(obj: GeometryLike | None) -> Geometry | None:
    return None if obj is None else as_geometry(obj)


@dataclass
class Affine:
    """Linear transform: ``matrix`` (4x4) maps FIXED RAS to MOVING RAS (mm),
    the pull-back used for resampling. ``fixed``/``moving``: the grids it was
    computed for (optional; an LTA's ``dst``/``src`` volume info)."""

    matrix: np.ndarray
    fixed: Geometry | None = None
    moving: Geometry | None = None

    def __post_init__(self) -> None:
        m = np.asarray(self.matrix, dtype=np.float64)
        if m.shape == (3, 4):
            m = np.vstack([m, [0.0, 0.0, 0.0, 1.0]])
        if m.shape != (4, 4):
            raise ValueError(f"affine matrix must be 4x4, got {m.shape}")
        self.matrix = m
        self.fixed = _opt_geometry(self.fixed)
        self.moving = _opt_geometry(self.moving)


@dataclass
class Warp:
    """Deformable transform: displacement ``disp`` (X, Y, Z, 3) in RAS mm on
    the FIXED grid ``grid``; fixed point ``x`` maps to moving point
    ``x + disp(x)``. ``moving``: the moving grid, if known."""

    disp: np.ndarray
    grid: Geometry
    moving: Geometry | None = None

    def __post_init__(self) -> None:
        self.grid = as_geometry(self.grid)
        self.moving = _opt_geometry(self.moving)
        d = np.asarray(self.disp, dtype=np.float32)
        if d.ndim != 4 or d.shape[3] != 3 or tuple(d.shape[:3]) != self.grid.shape:
            raise ValueError(f"displacement must be {self.grid.shape + (3,)}, got {d.shape}")
        self.disp = d

    @property
    def fixed(self) -> Geometry:
        """The fixed grid (the grid the field is defined on)."""
        return self.grid


Transform = Union[Affine, Warp]


def invert(t: Affine) -> Affine:
    """The inverse of a linear transform (MOVING to FIXED), grids swapped."""
    if not isinstance(t, Affine):
        raise TypeError("only linear transforms can be inverted (inverting a warp is not supported)")
    return Affine(np.linalg.inv(t.matrix), fixed=t.moving, moving=t.fixed)


def compose(*transforms: Transform, grid: GeometryLike | None = None) -> Transform:
    """Chain pull-back point maps like matrices: ``compose(a, b)`` maps ``x``
    to ``a(b(x))`` (``b`` acts first), i.e. ``a.matrix @ b.matrix``.

    So if ``b`` takes FIXED to an intermediate space and ``a`` that space to
    MOVING, the result takes FIXED to MOVING. Affines only (and no ``grid``)
    give an Affine; otherwise the result is a Warp on ``grid``, by default
    the grid of the last transform (a Warp's grid, or an Affine's fixed grid):
    ``compose(affine, grid=g)`` is the dense field of an affine. Displacements
    are sampled trilinearly; outside its grid a warp displaces by 0.
    """
    if not transforms:
        raise ValueError("compose needs at least one transform")
    if grid is None and all(isinstance(t, Affine) for t in transforms):
        m = np.eye(4)
        for t in transforms:
            m = m @ t.matrix
        return Affine(m, fixed=transforms[-1].fixed, moving=transforms[0].moving)
    inner = transforms[-1]
    g = _opt_geometry(grid) or (inner.grid if isinstance(inner, Warp) else inner.fixed)
    if g is None:
        raise ValueError("compose: the innermost affine has no fixed grid; pass grid=")
    disp = np.empty(g.shape + (3,), dtype=np.float32)
    for x0, x1, world in _world_slabs(g):
        pts = world.reshape(-1, 3)
        for t in reversed(transforms):
            pts = _map_points(t, pts)
        disp[x0:x1] = (pts.reshape(world.shape) - world).astype(np.float32)
    return Warp(disp, g, moving=transforms[0].moving)


# ----------------------------------------------------------- coordinates --

def _world_slabs(g: Geometry, dtype=np.float64):
    """(x0, x1, world RAS of voxels x0..x1-1 as (n, Y, Z, 3)) over the grid."""
    nx, ny, nz = g.shape
    a = g.affine
    jy = np.arange(ny, dtype=np.float64)[:, None, None] * a[:3, 1]
    kz = np.arange(nz, dtype=np.float64)[None, :, None] * a[:3, 2]
    yz = jy + kz + a[:3, 3]  # (ny, nz, 3)
    for x0 in range(0, nx, _SLAB):
        x1 = min(nx, x0 + _SLAB)
        ix = np.arange(x0, x1, dtype=np.float64)[:, None, None, None] * a[:3, 0]
        yield x0, x1, (ix + yz[None]).astype(dtype)


def _apply_matrix(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:3, :3].T + m[:3, 3]


def _prepare_volume(data_cf: np.ndarray | torch.Tensor, fill: float) -> torch.Tensor:
    """(1, C, X, Y, Z) float32 tensor for grid_sample; zero means ``fill``."""
    t = data_cf if isinstance(data_cf, torch.Tensor) else torch.from_numpy(
        np.ascontiguousarray(data_cf, dtype=np.float32))
    t = t.to(torch.float32)
    if fill != 0.0:
        t = t - float(fill)
    for axis in range(1, 4):
        if t.shape[axis] == 1:  # align_corners=True: a 1-voxel axis never goes out of bounds
            t = torch.cat([t, torch.zeros_like(t)], dim=axis)
    return t[None].contiguous()


def _sample_vox(vol: torch.Tensor, vox: torch.Tensor, order: int) -> torch.Tensor:
    """Sample (1, C, X, Y, Z) at voxel coordinates ``vox`` (..., 3) -> (C, ...)."""
    shape = vol.shape[2:]
    scale = torch.tensor([2.0 / (n - 1) for n in shape], dtype=torch.float32)
    g = (vox.to(torch.float32) * scale - 1.0).flip(-1)  # grid_sample wants (z, y, x)
    lead = g.shape[:-1]
    g = g.reshape(1, -1, 1, 1, 3) if len(lead) != 3 else g[None]
    mode = "bilinear" if order == 1 else "nearest"
    out = F.grid_sample(vol, g, mode=mode, padding_mode="zeros", align_corners=True)[0]
    return out.reshape((vol.shape[1],) + tuple(lead))


def _map_points(t: Transform, pts: np.ndarray) -> np.ndarray:
    """Apply the pull-back map to RAS points (N, 3) -> (N, 3)."""
    if isinstance(t, Affine):
        return _apply_matrix(t.matrix, pts)
    vol = _prepare_volume(np.moveaxis(t.disp, -1, 0), 0.0)
    to_vox = np.linalg.inv(t.grid.affine)
    out = np.empty_like(pts)
    step = 1 << 20
    for i in range(0, len(pts), step):
        p = pts[i:i + step]
        vox = torch.from_numpy(_apply_matrix(to_vox, p).astype(np.float32))
        out[i:i + step] = p + _sample_vox(vol, vox, 1).T.numpy().astype(np.float64)
    return out


def _check_warp_grid(t: Warp, g: Geometry, what: str = "the fixed grid") -> None:
    if not t.grid.same_grid(g):
        raise InputError(f"{t.grid.path or 'warp'}: displacement field grid ({t.grid.describe()}) "
                         f"does not match {what} ({g.describe()})")


def to_dense(t: Transform, fixed_grid: GeometryLike) -> np.ndarray:
    """MOVING RAS coordinates (3, X, Y, Z), float32, of every voxel of the
    fixed grid. A Warp must be defined on that grid (InputError otherwise)."""
    g = as_geometry(fixed_grid)
    if isinstance(t, Warp):
        _check_warp_grid(t, g)
    out = np.empty((3,) + g.shape, dtype=np.float32)
    for x0, x1, world in _world_slabs(g):
        moved = _apply_matrix(t.matrix, world) if isinstance(t, Affine) else world + t.disp[x0:x1]
        out[:, x0:x1] = np.moveaxis(moved, -1, 0)
    return out


# ------------------------------------------------------------ resampling --

def apply_transform(t: Transform, moving: Volume, fixed_grid: GeometryLike, order: int = 1,
                    fill: float = 0.0) -> np.ndarray:
    """Resample ``moving`` into the fixed grid: ``out(x) = moving(T(x))``.

    ``moving.data``: (X, Y, Z) or (X, Y, Z, frames) -- every frame gets the
    same transform. ``order`` 1: trilinear, float32 result; 0: nearest, the
    input dtype is kept (labels stay exact). Points outside the moving image
    get ``fill``. A Warp must be defined on ``fixed_grid`` (InputError
    otherwise). Returns (X, Y, Z[, frames]) on the fixed grid.
    """
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order}")
    g = as_geometry(fixed_grid)
    data = np.asarray(moving.data)
    if data.ndim not in (3, 4):
        raise InputError(f"{moving.path or 'image'}: expected a 3D or 4D image, got shape {data.shape}")
    cf = data[None] if data.ndim == 3 else np.moveaxis(data, -1, 0)  # channel-first
    if isinstance(t, Affine):
        # resample() maps dst voxel -> src voxel by inv(src_affine) @ dst_affine;
        # we need inv(A_mov) @ M @ A_fix, i.e. src_affine = inv(M) @ A_mov.
        out = resample(cf, np.linalg.inv(t.matrix) @ moving.affine, g.affine, g.shape, order, fill)
    else:
        _check_warp_grid(t, g)
        out = _resample_warp(cf, moving.affine, t, order, fill)
    return out[0] if data.ndim == 3 else np.moveaxis(out, 0, -1)


def _resample_warp(cf: np.ndarray, mov_affine: np.ndarray, t: Warp, order: int, fill: float) -> np.ndarray:
    vol = _prepare_volume(cf, fill)
    nx, ny, nz = t.grid.shape
    to_vox = np.linalg.inv(mov_affine)
    vox2vox = to_vox @ t.grid.affine  # fixed voxel -> moving voxel, before displacement
    lin = torch.from_numpy(to_vox[:3, :3].astype(np.float32))
    out = torch.empty((cf.shape[0], nx, ny, nz), dtype=torch.float32)
    jk = np.stack(np.meshgrid(np.arange(ny), np.arange(nz), indexing="ij"), -1).astype(np.float64)
    base_yz = jk[..., 0:1] * vox2vox[:3, 1] + jk[..., 1:2] * vox2vox[:3, 2] + vox2vox[:3, 3]
    for x0 in range(0, nx, _SLAB):
        x1 = min(nx, x0 + _SLAB)
        base = np.arange(x0, x1, dtype=np.float64)[:, None, None, None] * vox2vox[:3, 0] + base_yz[None]
        vox = torch.from_numpy(base.astype(np.float32)) + torch.from_numpy(t.disp[x0:x1]) @ lin.T
        out[:, x0:x1] = _sample_vox(vol, vox, order)
    if fill != 0.0:
        out += float(fill)
    result = out.numpy()
    if order == 0 and cf.dtype != np.float32:
        result = result.astype(np.dtype(cf.dtype).newbyteorder("="))
    return result


def update_header(t: Transform, moving: Volume | np.ndarray) -> np.ndarray:
    """vox2ras that places the UNCHANGED moving voxels in the fixed space (-H).

    A moving voxel ``v`` lies at moving RAS ``p = A_mov v``; the fixed point
    that the pull-back ``M`` sends to ``p`` is ``q = inv(M) p``. So the new
    vox2ras is ``inv(M) @ A_mov``; resampling that image onto the fixed grid
    is exactly :func:`apply_transform` (same voxel-to-voxel map).
    """
    if not isinstance(t, Affine):
        raise InputError("header-only output (-H) needs a linear transform (.lta, .txt, .tfm), "
                         "not a displacement field")
    affine = moving.affine if isinstance(moving, Volume) else np.asarray(moving, dtype=np.float64)
    return np.linalg.inv(t.matrix) @ affine
