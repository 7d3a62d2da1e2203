"""Mapping between an image's native voxel grid and a network's working grid.

``conform`` resamples an image onto an isotropic grid whose axes follow a
given orientation code (e.g. LIA, FreeSurfer's conformed space);
``Conformed.to_native`` maps results back onto the exact native grid.

Array layouts: native data (as loaded by :func:`synthtools.io.load_volume`)
is (X, Y, Z) or (X, Y, Z, frames); conformed data and everything passed to
:func:`resample` is (X, Y, Z) or channel-first (C, X, Y, Z).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import nibabel as nib
import numpy as np
import torch

from .warp import grid_sample

__all__ = ["Conformed", "conform", "resample", "orientation_affine", "orientation_matrix", "axcodes", "lr_axis",
           "field_of_view_mm", "check_field_of_view", "MIN_EXTENT_MM"]

# Smallest field of view (mm, along every axis) a whole-brain model accepts
# unless its metadata says otherwise (``input.min_extent_mm``,
# :attr:`synthtools.space.ModelSpace.min_extent_mm`). An adult
# brain spans 140-170 mm per axis; thick-slice clinical scans cover it with
# 20-40 slices of 3-5 mm. Below 50 mm (a partial slab) the networks see too
# little anatomy: a 5-slice slab registered with a ~180 degree rotation and
# was segmented with cortex on the scalp, both without a word.
MIN_EXTENT_MM = 50.0

# World (RAS) direction in which each orientation letter points.
_LETTER_DIRECTION = {
    "R": (1.0, 0.0, 0.0),
    "L": (-1.0, 0.0, 0.0),
    "A": (0.0, 1.0, 0.0),
    "P": (0.0, -1.0, 0.0),
    "S": (0.0, 0.0, 1.0),
    "I": (0.0, 0.0, -1.0),
}

# Output voxels per grid_sample call along the first axis; bounds the sampling
# grid to about SLAB * Y * Z * 12 bytes (≈25 MB for 256^2).
_SLAB = 32


def field_of_view_mm(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """Extent of the grid along each voxel axis: voxels times voxel size (mm)."""
    vs = np.sqrt(np.sum(np.asarray(affine, dtype=np.float64)[:3, :3] ** 2, axis=0))
    return np.asarray(shape[:3], dtype=np.float64) * vs


def check_field_of_view(shape: Sequence[int], affine: np.ndarray, path: str | None,
                        min_mm: float = MIN_EXTENT_MM, what: str = "the model") -> None:
    """InputError (one line) if any axis of the grid spans less than ``min_mm``."""
    from .io import InputError

    fov = field_of_view_mm(shape, affine)
    if np.any(fov < min_mm):
        text = "x".join(f"{v:.0f}" for v in fov)
        raise InputError(f"{path or 'image'}: field of view {text} mm is too small for {what} (at least "
                         f"{min_mm:g} mm along every axis: a partial slab cannot be placed in the brain)")


def axcodes(affine: np.ndarray) -> str:
    """Orientation code of a voxel->world affine, e.g. 'LIA' or 'RAS'."""
    return "".join(nib.aff2axcodes(np.asarray(affine, dtype=np.float64)))


def lr_axis(orientation: str) -> int:
    """Array axis of a grid with this orientation code that runs left-right."""
    return [c in "LR" for c in orientation.upper()].index(True)


def orientation_matrix(orientation: str) -> np.ndarray:
    """3x3 matrix whose columns are the unit world (RAS) directions of the
    voxel axes of an orientation code; ValueError (one line) for a bad code."""
    code = str(orientation).upper()
    if len(code) != 3 or any(c not in _LETTER_DIRECTION for c in code):
        raise ValueError(f"orientation must be 3 letters from L/R, A/P, S/I, got {orientation!r}")
    pairs = [{"L": 0, "R": 0, "A": 1, "P": 1, "S": 2, "I": 2}[c] for c in code]
    if sorted(pairs) != [0, 1, 2]:
        raise ValueError(f"orientation {orientation!r} must use each of L/R, A/P, S/I once")
    return np.array([_LETTER_DIRECTION[c] for c in code], dtype=np.float64).T


def _voxsize3(voxsize: float | Sequence[float]) -> np.ndarray:
    vs = np.broadcast_to(np.asarray(voxsize, dtype=np.float64), (3,)).copy()
    if np.any(vs <= 0) or not np.all(np.isfinite(vs)):
        raise ValueError(f"voxel size must be positive, got {voxsize}")
    return vs


def orientation_affine(
    orientation: str,
    voxsize: float | Sequence[float],
    shape: Sequence[int],
    center_world: Sequence[float],
) -> np.ndarray:
    """Voxel->world affine of a world-aligned grid.

    ``orientation``: 3-letter code (LIA, RAS, LPS, ...) naming the world
    direction each voxel axis increases toward; ``voxsize`` in mm;
    ``shape`` in voxels; the grid centre (voxel (shape-1)/2) lands on
    ``center_world`` (mm).
    """
    direction = orientation_matrix(orientation)
    vs = _voxsize3(voxsize)
    lin = direction * vs[None, :]
    center_vox = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    affine = np.eye(4)
    affine[:3, :3] = lin
    affine[:3, 3] = np.asarray(center_world, dtype=np.float64) - lin @ center_vox
    return affine


def _to_tensor(data: Any) -> tuple[torch.Tensor, bool, Any]:
    """Float32 tensor view/copy of ``data``; also whether it was numpy and its dtype."""
    if isinstance(data, torch.Tensor):
        return data.detach().to(torch.float32), False, data.dtype
    arr = np.asarray(data)
    # Convert in numpy: torch lacks some numpy types (uint16/uint32, big-endian).
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)), True, arr.dtype


def resample(
    data: Any,
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    dst_shape: Sequence[int],
    order: int = 1,
    fill: float = 0.0,
) -> Any:
    """Resample ``data`` from one voxel grid to another through world space.

    ``data``: (X, Y, Z) or (C, X, Y, Z), numpy array or torch tensor, on the
    grid ``src_affine`` (voxel->world, mm). Returns the same kind of array on
    the grid (``dst_affine``, ``dst_shape``). ``order=1``: trilinear, float32
    output; ``order=0``: nearest neighbour, output keeps the input dtype
    (integer labels are exact below 2**24). Points outside the source get
    ``fill``. Memory beyond input and output is a float32 copy of the input
    plus a sampling grid for a slab of output slices.
    """
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order}")
    tensor, was_numpy, in_dtype = _to_tensor(data)
    if tensor.ndim == 3:
        tensor = tensor[None]
        squeeze = True
    elif tensor.ndim == 4:
        squeeze = False
    else:
        raise ValueError(f"data must be (X, Y, Z) or (C, X, Y, Z), got shape {tuple(tensor.shape)}")
    dst_shape = tuple(int(n) for n in dst_shape)
    if len(dst_shape) != 3 or min(dst_shape) < 1:
        raise ValueError(f"dst_shape must be 3 positive ints, got {dst_shape}")

    if fill != 0.0:
        # grid_sample pads with zeros: shift so that zero means `fill`.
        # Exact for integer labels and fills; linear blends toward `fill`.
        tensor = tensor - float(fill)
    for axis in range(1, 4):
        if tensor.shape[axis] == 1:
            # With align_corners=True a 1-voxel axis maps every coordinate to
            # index 0 (never out of bounds); a zero slice restores the edge.
            tensor = torch.cat([tensor, torch.zeros_like(tensor)], dim=axis)
    src_shape = tuple(tensor.shape[1:])
    vol = tensor[None].contiguous()  # (1, C, X, Y, Z)

    # dst voxel -> src voxel, then src voxel -> grid_sample's [-1, 1]
    # (align_corners=True: -1 and +1 are the centres of the edge voxels).
    vox2vox = np.linalg.inv(np.asarray(src_affine, np.float64)) @ np.asarray(dst_affine, np.float64)
    norm = np.eye(4)
    norm[:3, :3] = np.diag([2.0 / (n - 1) for n in src_shape])
    norm[:3, 3] = -1.0
    mat = norm @ vox2vox  # dst voxel -> normalised src coordinate
    # grid_sample's last grid dim is (W, H, D) = (Z, Y, X): reverse rows.
    mat = mat[[2, 1, 0]]

    nx, ny, nz = dst_shape
    # 1D per-axis contributions in float64, summed in float32 by broadcasting:
    # no full-size float64 coordinate array is ever built.
    iy = torch.from_numpy((mat[:, 1:2] * np.arange(ny)[None, :]).astype(np.float32))  # (3, ny)
    iz = torch.from_numpy((mat[:, 2:3] * np.arange(nz)[None, :] + mat[:, 3:4]).astype(np.float32))
    yz = iy[:, :, None] + iz[:, None, :]  # (3, ny, nz)
    mode = "bilinear" if order == 1 else "nearest"  # 'bilinear' is trilinear for 5D

    out = torch.empty((tensor.shape[0],) + dst_shape, dtype=torch.float32)
    grid = torch.empty((1, min(_SLAB, nx), ny, nz, 3), dtype=torch.float32)
    for x0 in range(0, nx, _SLAB):
        x1 = min(nx, x0 + _SLAB)
        ix = torch.from_numpy((mat[:, 0:1] * np.arange(x0, x1)[None, :]).astype(np.float32))
        g = grid[:, : x1 - x0]
        for c in range(3):
            torch.add(yz[c][None], ix[c][:, None, None], out=g[0, ..., c])
        out[:, x0:x1] = grid_sample(vol, g, mode=mode, padding="zeros")[0]
    del grid, vol

    if fill != 0.0:
        out += float(fill)
    if squeeze:
        out = out[0]

    if was_numpy:
        result = out.numpy()
        if order == 0 and np.dtype(in_dtype) != np.float32:
            result = result.astype(np.dtype(in_dtype).newbyteorder("="))
        return result
    if order == 0 and in_dtype != torch.float32:
        return out.to(in_dtype)
    return out


@dataclass
class Conformed:
    """An image resampled onto a network grid, with the way back.

    ``data``: float32 tensor (X, Y, Z) or (C, X, Y, Z) on the conformed grid;
    ``affine``: voxel->world (mm) of that grid; ``native_affine`` and
    ``native_shape`` describe the original grid.
    """

    data: torch.Tensor
    affine: np.ndarray
    native_affine: np.ndarray
    native_shape: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape of the conformed grid (voxels)."""
        return tuple(int(n) for n in self.data.shape[-3:])  # type: ignore[return-value]

    @property
    def voxsize(self) -> np.ndarray:
        """Voxel size of the conformed grid (mm)."""
        return np.sqrt(np.sum(self.affine[:3, :3] ** 2, axis=0))

    def to_native(self, x: Any, *, order: int = 1, fill: float = 0.0) -> np.ndarray:
        """Resample ``x`` from the conformed grid onto the exact native grid.

        ``x``: (X, Y, Z) or (C, X, Y, Z) on the conformed grid, numpy or
        torch. ``order=1`` trilinear (images, distances, posteriors),
        ``order=0`` nearest (labels keep their integer values and dtype).
        Returns a numpy array, (X, Y, Z) or (C, X, Y, Z) in native voxels.
        """
        spatial = tuple(int(n) for n in x.shape[-3:])
        if spatial != self.shape or len(x.shape) not in (3, 4):
            raise ValueError(f"expected (..., {self.shape}) on the conformed grid, got {tuple(x.shape)}")
        out = resample(x, self.affine, self.native_affine, self.native_shape, order, fill)
        if isinstance(out, torch.Tensor):
            out = out.numpy()
        return out


def conform(
    volume: Any,
    *,
    voxsize: float | Sequence[float] = 1.0,
    orientation: str = "LIA",
    multiple: int | None = 16,
    shape: Sequence[int] | None = None,
    order: int = 1,
) -> Conformed:
    """Resample an image onto a world-aligned grid for a network.

    ``volume``: a :class:`synthtools.io.Volume` or a ``(data, affine)`` pair,
    data in file layout (X, Y, Z) or (X, Y, Z, frames). The grid has voxel
    size ``voxsize`` (mm), axes along ``orientation`` (e.g. 'LIA'), is centred
    on the input's centre and covers the input's whole world bounding box,
    with each dimension rounded up to a multiple of ``multiple`` voxels -- or
    exactly ``shape`` voxels if given. ``order``: 1 trilinear, 0 nearest.
    """
    if isinstance(volume, (tuple, list)):
        data, affine = volume
    else:
        data, affine = volume.data, volume.affine
    affine = np.asarray(affine, dtype=np.float64)
    if data.ndim == 4:
        # File layout has frames last; the network layout is channel-first.
        data = data.permute(3, 0, 1, 2) if isinstance(data, torch.Tensor) else np.moveaxis(data, -1, 0)
    elif data.ndim != 3:
        raise ValueError(f"data must be (X, Y, Z) or (X, Y, Z, frames), got shape {tuple(data.shape)}")
    native_shape = tuple(int(n) for n in data.shape[-3:])
    vs = _voxsize3(voxsize)
    direction = orientation_matrix(orientation)

    # Centre of the native grid (mm); the grid is symmetric about it.
    center = affine[:3, :3] @ ((np.array(native_shape) - 1.0) / 2.0) + affine[:3, 3]
    if shape is None:
        # Extent of the 8 outer voxel-edge corners along the target axes.
        corners = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in native_shape], indexing="ij"))
        corners = corners.reshape(3, -1)
        world = affine[:3, :3] @ corners + affine[:3, 3:4]
        along = direction.T @ world  # (3 target axes, 8 corners), mm
        extent = along.max(axis=1) - along.min(axis=1)
        # The small tolerance stops float noise from adding a whole voxel.
        n_vox = np.maximum(np.ceil(extent / vs - 1e-4), 1).astype(int)
        m = int(multiple) if multiple else 1
        out_shape = tuple(int(-(-n // m) * m) for n in n_vox)
    else:
        out_shape = tuple(int(n) for n in shape)
        if len(out_shape) != 3 or min(out_shape) < 1:
            raise ValueError(f"shape must be 3 positive ints, got {shape}")

    out_affine = orientation_affine(orientation, vs, out_shape, center)
    out = resample(data, affine, out_affine, out_shape, order=order, fill=0.0)
    if not isinstance(out, torch.Tensor):
        out = torch.from_numpy(out)
    return Conformed(
        data=out.to(torch.float32),
        affine=out_affine,
        native_affine=affine,
        native_shape=native_shape,  # type: ignore[arg-type]
    )
