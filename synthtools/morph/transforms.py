"""Spatial transforms between two images: model, file formats, resampling.

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

Files (the format follows the extension) and the tools that read them
-----------------------------------------------------------------------
``.lta`` -- FreeSurfer linear transform array, written as type 1
    (LINEAR_RAS_TO_RAS) with full ``src``/``dst`` volume info blocks;
    types 0 (LINEAR_VOX_TO_VOX) and 3 (LINEAR_SURF_TO_SURF, tkregister RAS)
    are read too, converted with the volume info (or the images given).
    FreeSurfer stores the *push-forward*: its matrix maps SOURCE (= moving)
    RAS to DESTINATION (= fixed) RAS, so the LTA matrix is ``inv(M)``.
    Read by FreeSurfer (``mri_vol2vol --lta``, ``mri_convert -at``,
    ``freeview`` ``:reg=``, ``mri_synthmorph apply``, surfa/nitransforms);
    ``lta_convert`` turns it into FSL (``--outfsl``), ITK (``--outitk``),
    NiftyReg or register.dat. FSL users: ``lta_convert --infsl x.mat --src
    MOVING --trg FIXED --outlta x.lta`` converts a FLIRT matrix for us.
``.txt`` / ``.tfm`` -- ITK text transform (``#Insight Transform File V1.0``,
    ``AffineTransform_double_3_3``, 12 ``Parameters`` = row-major 3x3 matrix
    and translation, ``FixedParameters`` = centre). ITK maps FIXED to MOVING
    points (pull-back, like us) in LPS: ``M_lps = F @ M @ F`` with
    ``F = diag(-1, -1, 1, 1)``; with centre ``c`` the map is
    ``A (x - c) + t + c``. ``MatrixOffsetTransformBase_*_3_3`` and the float
    variants read the same; several affines in one file (a composite) are
    chained as ITK does (the last listed acts first). We write centre 0.
    Read by ANTs (``antsApplyTransforms -t``), ITK/SimpleITK, 3D Slicer,
    ITK-SNAP; ANTs' binary ``.mat`` is converted to this by
    ``ConvertTransformFile 3 in.mat out.txt``. An ITK affine carries no
    image grid: applying it needs the fixed image.
``.nii.gz`` / ``.nii`` -- ITK/ANTs displacement field: shape (X, Y, Z, 1, 3),
    ``intent_code`` 1007 (NIFTI_INTENT_VECTOR), displacements in LPS mm, grid
    = the fixed image grid, pull-back (``x + u(x)`` is the moving point).
    Read by ``antsApplyTransforms -t``, ITK/SimpleITK
    (``DisplacementFieldTransform``), 3D Slicer, and FreeSurfer's
    ``mri_warp_convert --inlps``. On reading, intent 1006
    (NIFTI_INTENT_DISPVECT, as FreeSurfer/surfa and ITK >= 5.3 write it) is
    taken as RAS displacements; 1007 (or 0 with the 5D layout) as LPS.
``.mgz`` / ``.mgh`` -- FreeSurfer warp, as ``mri_synthmorph`` writes it
    (surfa ``Warp`` saved in format ``disp_ras``): an MGH volume on the fixed
    grid with 3 float frames holding the RAS displacement ``moving RAS -
    fixed RAS`` in mm, the warp intent (3, MGZ_WARPMAP) encoded in the version
    field, a TAG_GCAMORPH_GEOM tag with the source (moving) and target
    (fixed) geometries and a TAG_GCAMORPH_META tag (data format 3 =
    WARPFIELD_DTFMT_DISP_RAS, spacing 1, exp_k 0). On reading, the other data
    formats (0 absolute voxel, 1 voxel displacement, 2 absolute RAS) are
    converted too. Read by ``mri_synthmorph apply``, surfa
    (``sf.load_warp``), ``mri_warp_convert --inmgzwarp`` (FreeSurfer 8; it
    converts to m3z, ITK or FSL warps) and, as a plain RAS displacement
    volume, ``mri_warp_convert --inras`` (FreeSurfer 7.4).

Resampling (:func:`apply_transform`) goes through torch ``grid_sample``
(trilinear or nearest); a 4D moving image is resampled frame by frame with the
same transform. :func:`update_header` gives the vox2ras for ``-H``
(header-only) output of a linear transform. Every problem with a file is an
:class:`~synthtools.io.InputError` whose one-line message starts with its path.
"""
from __future__ import annotations

import gzip
import os
import re
import struct
from dataclasses import dataclass
from typing import Any, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..conform import resample
from ..io import InputError, Volume, atomic_output

__all__ = [
    "Geometry", "Affine", "Warp", "Transform", "as_geometry", "read_transform", "write_transform",
    "invert", "compose", "to_dense", "apply_transform", "update_header", "TRANSFORM_EXTENSIONS",
    "LINEAR_EXTENSIONS", "WARP_EXTENSIONS", "transform_kind",
]

LINEAR_EXTENSIONS = (".lta", ".txt", ".tfm")
WARP_EXTENSIONS = (".nii.gz", ".nii", ".mgz", ".mgh")
TRANSFORM_EXTENSIONS = LINEAR_EXTENSIONS + WARP_EXTENSIONS

# RAS <-> LPS: negate the first two world axes (its own inverse).
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_LPS3 = np.array([-1.0, -1.0, 1.0])

# Output voxels per grid_sample call along the first axis (bounds memory).
_SLAB = 32
# Grids closer than this (mm, affine entries) count as the same grid.
_GRID_TOL = 1e-3

# FreeSurfer constants (utils/tags.h, mri.h, warpfield.h).
_MGH_VERSION = 1
_MGZ_WARPMAP = 3
_MGZ_WARPMAP_INV = 4
_MRI_FLOAT = 3
_TAG_GCAMORPH_GEOM = 10
_TAG_GCAMORPH_META = 13
_TAG_GCAMORPH_GEOM_PLUSSHEAR = 15
_TAG_OLD_XFORM = 30
_LENGTHLESS_TAGS = {1, 2, 10, 11, 12, 20}  # no length field: size implied by the tag
_GEOM_BYTES = 4 + 12 + 12 + 36 + 12 + 512  # valid, shape, voxsize, Mdc, c_ras, file name
_DISP_RAS, _ABS_RAS, _DISP_CRS, _ABS_CRS = 3, 2, 1, 0

_NIFTI_INTENT_DISPVECT = 1006
_NIFTI_INTENT_VECTOR = 1007


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


# --------------------------------------------------------- file formats --

def _error(path: str, problem: str) -> InputError:
    return InputError(f"{path}: {problem}")


def transform_kind(path: str | os.PathLike) -> str | None:
    """'lta', 'itk', 'nifti' or 'mgh' from the extension (None if unknown)."""
    lower = os.fspath(path).lower()
    for ext, kind in ((".lta", "lta"), (".txt", "itk"), (".tfm", "itk"), (".nii.gz", "nifti"),
                      (".nii", "nifti"), (".mgz", "mgh"), (".mgh", "mgh")):
        if lower.endswith(ext):
            return kind
    return None


_HINTS = {
    ".mat": " (FSL FLIRT: lta_convert --infsl; ANTs binary: ConvertTransformFile 3 in.mat out.txt)",
    ".m3z": " (convert with mri_warp_convert --inm3z IN.m3z --outmgzwarp OUT.mgz)",
    ".h5": " (ANTs composite: CompositeTransformUtil --disassemble, or use the .nii.gz warp)",
    ".dat": " (register.dat: convert with lta_convert --inreg IN.dat --outlta OUT.lta)",
    ".xfm": " (MNI .xfm: convert with lta_convert --inmni IN.xfm --outlta OUT.lta --src MOVING --trg FIXED)",
}


def _unknown_extension(path: str) -> InputError:
    _, ext = os.path.splitext(path)
    found = f"'{ext}'" if ext else "none"
    return _error(path, f"unknown transform file type {found} (use .lta or .txt/.tfm for linear, "
                        f".nii.gz/.nii or .mgz for deformable transforms){_HINTS.get(ext.lower(), '')}")


def read_transform(path: str | os.PathLike, fixed: GeometryLike | None = None,
                   moving: GeometryLike | None = None) -> Transform:
    """Read a transform file (format from the extension, see module doc).

    ``fixed``/``moving`` (Volume, Geometry or (shape, affine)) fill in grids
    a file lacks: needed for a voxel-to-voxel LTA without volume info; an
    Affine read from ITK text gets them as its grids. InputError on any problem.
    """
    path = os.fspath(path)
    kind = transform_kind(path)
    if kind is None:
        raise _unknown_extension(path)
    if not os.path.exists(path):
        raise _error(path, "file not found")
    if os.path.isdir(path):
        raise _error(path, "is a folder, a transform file is required")
    if not os.access(path, os.R_OK):
        raise _error(path, "file is not readable (permission denied)")
    fixed_g, moving_g = _opt_geometry(fixed), _opt_geometry(moving)
    try:
        if kind == "lta":
            return _read_lta(path, fixed_g, moving_g)
        if kind == "itk":
            return _read_itk(path, fixed_g, moving_g)
        if kind == "nifti":
            return _read_nifti_warp(path, moving_g)
        return _read_mgh_warp(path, moving_g)
    except InputError:
        raise
    except Exception as exc:  # OS, parse, struct, gzip, unicode errors: all mean "unreadable"
        raise _error(path, f"cannot read transform ({type(exc).__name__}: {exc})") from None


def write_transform(t: Transform, path: str | os.PathLike, fixed: GeometryLike | None = None,
                    moving: GeometryLike | None = None) -> str:
    """Write ``t`` atomically to ``path`` (format from the extension).

    ``fixed``/``moving`` override the grids stored with ``t`` (LTA volume
    info, warp source geometry). An Affine written to a warp format becomes a
    dense field on the fixed grid; a Warp cannot be written as a linear file.
    Returns the path.
    """
    path = os.fspath(path)
    kind = transform_kind(path)
    if kind is None:
        raise _unknown_extension(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise _error(path, f"output folder {folder} does not exist")
    fixed_g, moving_g = _opt_geometry(fixed), _opt_geometry(moving)
    if isinstance(t, Warp) and kind in ("lta", "itk"):
        raise _error(path, "a deformable transform cannot be saved as a linear transform file "
                           "(use .nii.gz or .mgz)")
    if isinstance(t, Affine) and kind in ("nifti", "mgh"):
        grid = fixed_g or t.fixed
        if grid is None:
            raise _error(path, "saving a linear transform as a displacement field needs the fixed grid")
        t = compose(t, grid=grid)
        fixed_g = None
    if kind == "lta":
        data: bytes = _lta_text(t, fixed_g or t.fixed, moving_g or t.moving).encode()  # type: ignore[union-attr]
    elif kind == "itk":
        data = _itk_text(t).encode()  # type: ignore[arg-type]
    elif kind == "nifti":
        if fixed_g is not None:
            _check_warp_grid(t, fixed_g)  # type: ignore[arg-type]
        return _atomic_nifti(_nifti_warp_image(t), path)  # type: ignore[arg-type]
    else:
        if fixed_g is not None:
            _check_warp_grid(t, fixed_g)  # type: ignore[arg-type]
        data = _mgh_warp_bytes(t, moving_g or t.moving)  # type: ignore[arg-type]
        if path.lower().endswith(".mgz"):
            data = gzip.compress(data, compresslevel=6)
    _atomic_write(path, data)
    return path


def _atomic_write(path: str, data: bytes) -> None:
    with atomic_output(path, what="transform") as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def _atomic_nifti(img, path: str) -> str:
    import nibabel as nib

    ext = ".nii.gz" if path.lower().endswith(".nii.gz") else ".nii"
    with atomic_output(path, ext, "transform") as tmp:  # nibabel picks compression from the name
        nib.save(img, tmp)
    return path


def _check_matrix(path: str, m: np.ndarray, what: str = "matrix") -> np.ndarray:
    if not np.all(np.isfinite(m)):
        raise _error(path, f"{what} contains NaN or Inf")
    if not np.allclose(m[3], [0, 0, 0, 1], atol=1e-6):
        raise _error(path, f"{what} is not affine (last row {m[3].tolist()})")
    if abs(np.linalg.det(m[:3, :3])) < 1e-12:
        raise _error(path, f"{what} is singular")
    return m


# ------------------------------------------------------------------ LTA --

def _fs_geometry_fields(g: Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FreeSurfer geometry: voxel size, direction cosines (columns), c_ras.

    FreeSurfer's vox2ras is ``Mdc @ diag(voxsize)`` with the world point of
    voxel ``shape / 2`` at ``c_ras``; with un-normalised shear-free columns
    this reproduces any affine exactly (also a sheared one)."""
    lin = g.affine[:3, :3]
    vs = np.sqrt(np.sum(lin**2, axis=0))
    mdc = lin / vs
    c_ras = lin @ (np.asarray(g.shape, dtype=np.float64) / 2.0) + g.affine[:3, 3]
    return vs, mdc, c_ras


def _fs_affine(shape: Sequence[int], vs: Sequence[float], mdc: np.ndarray, c_ras: Sequence[float]) -> np.ndarray:
    lin = np.asarray(mdc, dtype=np.float64) * np.asarray(vs, dtype=np.float64)[None, :]
    aff = np.eye(4)
    aff[:3, :3] = lin
    aff[:3, 3] = np.asarray(c_ras, dtype=np.float64) - lin @ (np.asarray(shape, dtype=np.float64) / 2.0)
    return aff


def _tkr_affine(g: Geometry) -> np.ndarray:
    """FreeSurfer tkregister (surface RAS) vox2ras: LIA axes whatever the
    image orientation, the voxel sizes of the image, centred (c_ras = 0)."""
    vs, _, _ = _fs_geometry_fields(g)
    lia = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
    return _fs_affine(g.shape, vs, lia, (0.0, 0.0, 0.0))


def _vol_info(g: Geometry | None) -> str:
    def row(v) -> str:
        return " ".join(f"{float(x):.15e}" for x in v)

    if g is None:  # FreeSurfer's reader needs every line, even for invalid info
        return ("valid = 0  # volume info invalid\nfilename = none\nvolume = 256 256 256\n"
                f"voxelsize = {row([1, 1, 1])}\nxras   = {row([-1, 0, 0])}\nyras   = {row([0, 0, -1])}\n"
                f"zras   = {row([0, 1, 0])}\ncras   = {row([0, 0, 0])}\n")
    vs, mdc, c_ras = _fs_geometry_fields(g)
    name = "".join((g.path or "none").split()) or "none"  # FreeSurfer reads the name as one token
    return (f"valid = 1  # volume info valid\nfilename = {name}\n"
            f"volume = {g.shape[0]:d} {g.shape[1]:d} {g.shape[2]:d}\n"
            f"voxelsize = {row(vs)}\nxras   = {row(mdc[:, 0])}\nyras   = {row(mdc[:, 1])}\n"
            f"zras   = {row(mdc[:, 2])}\ncras   = {row(c_ras)}\n")


def _lta_text(t: Affine, fixed: Geometry | None, moving: Geometry | None) -> str:
    # FreeSurfer stores moving (src) RAS -> fixed (dst) RAS: the inverse of ours.
    push = np.linalg.inv(t.matrix)
    rows = "".join(" ".join(f"{x:.15e}" for x in r) + "\n" for r in push)
    return ("# transform file written by synthtools (synthmorph)\n"
            "# matrix: moving (src) RAS -> fixed (dst) RAS, FreeSurfer convention\n"
            "type      = 1 # LINEAR_RAS_TO_RAS\nnxforms   = 1\n"
            "mean      = 0.0000 0.0000 0.0000\nsigma     = 1.0000\n1 4 4\n"
            f"{rows}src volume info\n{_vol_info(moving)}dst volume info\n{_vol_info(fixed)}")


def _parse_vol_info(path: str, fields: dict[str, list[str]]) -> Geometry | None:
    if not fields.get("valid") or fields["valid"][0] != "1":
        return None
    try:
        shape = [int(float(v)) for v in fields["volume"][:3]]
        vs = [float(v) for v in fields["voxelsize"][:3]]
        mdc = np.array([[float(v) for v in fields[k][:3]] for k in ("xras", "yras", "zras")]).T
        c_ras = [float(v) for v in fields.get("cras", fields.get("c_ras", []))[:3]]
        if len(shape) != 3 or len(vs) != 3 or len(c_ras) != 3 or mdc.shape != (3, 3):
            raise ValueError
    except (KeyError, ValueError):
        raise _error(path, "incomplete volume info block") from None
    name = fields.get("filename", ["none"])[0]
    return Geometry(shape, _fs_affine(shape, vs, mdc, c_ras), None if name == "none" else name)


def _text_lines(path: str, what: str) -> list[str]:
    """The lines of a text transform file; a binary file (a gzipped or
    image file under a text extension) is a one-line InputError, not a
    UnicodeDecodeError."""
    with open(path, "rb") as f:
        raw = f.read()
    kind = ("gzip-compressed data" if raw[:2] == b"\x1f\x8b" else
            "a NIfTI image" if raw[344:348] in (b"n+1\x00", b"ni1\x00") else "binary data")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = "\x00"
    if "\x00" in text:
        raise _error(path, f"not {what}: it holds {kind}, and {what} is a text file")
    return text.splitlines()


def _read_lta(path: str, fixed: Geometry | None, moving: Geometry | None) -> Affine:
    lines = [line.split("#", 1)[0].strip() for line in _text_lines(path, "a FreeSurfer LTA file")]
    lines = [line for line in lines if line]
    lta_type = None
    matrix = None
    blocks: dict[str, dict[str, list[str]]] = {"src": {}, "dst": {}}
    current = None
    i = 0
    while i < len(lines):
        line = lines[i]
        words = line.replace("=", " = ").split()
        if words[0] == "type" and len(words) >= 3:
            lta_type = int(words[2])
        elif words[0] == "nxforms" and len(words) >= 3 and int(words[2]) != 1:
            raise _error(path, f"holds {words[2]} transforms, only single-transform LTAs are supported")
        elif matrix is None and re.fullmatch(r"\d+\s+4\s+4", line):
            if len(lines) < i + 5:
                raise _error(path, "truncated matrix")
            matrix = np.array([[float(v) for v in lines[i + k].split()] for k in range(1, 5)])
            if matrix.shape != (4, 4):
                raise _error(path, "matrix must have 4 rows of 4 numbers")
            i += 5
            continue
        elif line in ("src volume info", "dst volume info"):
            current = line[:3]
        elif current is not None and "=" in line:
            key, _, value = line.partition("=")
            blocks[current][key.strip()] = value.split()
        i += 1
    if lta_type is None or matrix is None:
        raise _error(path, "not a FreeSurfer LTA file (no 'type' line or no 4x4 matrix)")
    matrix = _check_matrix(path, matrix)
    src = _parse_vol_info(path, blocks["src"])
    dst = _parse_vol_info(path, blocks["dst"])
    src_g, dst_g = src or moving, dst or fixed
    if lta_type == 1:  # LINEAR_RAS_TO_RAS: src RAS -> dst RAS
        push = matrix
    elif lta_type in (0, 3):
        if src_g is None or dst_g is None:
            name = "LINEAR_VOX_TO_VOX" if lta_type == 0 else "LINEAR_SURF_TO_SURF"
            raise _error(path, f"{name} LTA without valid volume info: the moving and fixed images are needed")
        if lta_type == 0:  # src voxel -> dst voxel
            push = dst_g.affine @ matrix @ np.linalg.inv(src_g.affine)
        else:  # tkregister RAS of src -> tkregister RAS of dst
            push = (dst_g.affine @ np.linalg.inv(_tkr_affine(dst_g)) @ matrix
                    @ _tkr_affine(src_g) @ np.linalg.inv(src_g.affine))
    else:
        raise _error(path, f"unsupported LTA type {lta_type} (use 0 LINEAR_VOX_TO_VOX, 1 LINEAR_RAS_TO_RAS "
                           "or 3 LINEAR_SURF_TO_SURF)")
    return Affine(np.linalg.inv(push), fixed=dst_g, moving=src_g)


# ------------------------------------------------------------------ ITK --

_ITK_AFFINE = re.compile(r"(AffineTransform|MatrixOffsetTransformBase)_(double|float)_3_3")
_ITK_IDENTITY = re.compile(r"IdentityTransform_(double|float)_3")


def _itk_text(t: Affine) -> str:
    m = _LPS @ t.matrix @ _LPS  # RAS pull-back -> LPS pull-back
    params = [*m[:3, :3].ravel(), *m[:3, 3]]
    return ("#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
            "Parameters: " + " ".join(f"{p:.17g}" for p in params) + "\nFixedParameters: 0 0 0\n")


def _read_itk(path: str, fixed: Geometry | None, moving: Geometry | None) -> Affine:
    lines = [line.strip() for line in _text_lines(path, "an ITK text transform")]
    if not lines or not lines[0].startswith("#Insight Transform File"):
        raise _error(path, "not an ITK text transform (first line must be '#Insight Transform File V1.0')")
    entries: list[dict[str, Any]] = []
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if not sep or line.startswith("#"):
            continue
        key = key.strip()
        if key == "Transform":
            entries.append({"name": value.strip()})
        elif key in ("Parameters", "FixedParameters"):
            if not entries:
                raise _error(path, f"'{key}' before any 'Transform:' line")
            entries[-1][key] = [float(v) for v in value.split()]
    matrices = []
    for e in entries:
        name = e["name"]
        if name.startswith("CompositeTransform"):
            continue
        if _ITK_IDENTITY.fullmatch(name):
            matrices.append(np.eye(4))
            continue
        if not _ITK_AFFINE.fullmatch(name):
            raise _error(path, f"unsupported ITK transform '{name}' (only AffineTransform_double_3_3 and "
                               "MatrixOffsetTransformBase_double_3_3)")
        p = e.get("Parameters")
        if p is None or len(p) != 12:
            raise _error(path, f"{name} needs 12 Parameters, got {0 if p is None else len(p)}")
        c = np.asarray(e.get("FixedParameters") or [0.0, 0.0, 0.0], dtype=np.float64)
        if c.shape != (3,):
            raise _error(path, f"{name} needs 3 FixedParameters (the centre), got {c.size}")
        a = np.asarray(p[:9], dtype=np.float64).reshape(3, 3)
        m = np.eye(4)
        m[:3, :3] = a
        m[:3, 3] = np.asarray(p[9:12]) + c - a @ c  # x -> A (x - c) + t + c
        matrices.append(m)
    if not matrices:
        raise _error(path, "contains no transform")
    lps = np.eye(4)
    for m in matrices:  # ITK composite: the last listed acts first
        lps = lps @ m
    lps = _check_matrix(path, lps)
    return Affine(_LPS @ lps @ _LPS, fixed=fixed, moving=moving)


# ----------------------------------------------------- NIfTI (ITK) warp --

def _nifti_warp_image(t: Warp):
    import nibabel as nib

    data = (t.disp * _LPS3.astype(np.float32))[:, :, :, None, :]  # (X, Y, Z, 1, 3), LPS
    img = nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.float32), t.grid.affine)
    img.set_sform(t.grid.affine, code=1)
    img.set_qform(t.grid.affine, code=1)
    img.header.set_intent("vector")  # NIFTI_INTENT_VECTOR, 1007: what ANTs/ITK write
    img.header.set_xyzt_units("mm", "sec")
    return img


def _read_nifti_warp(path: str, moving: Geometry | None) -> Warp:
    import nibabel as nib

    try:
        img = nib.load(path, mmap=False)
    except Exception as exc:
        raise _error(path, f"not a readable NIfTI displacement field ({type(exc).__name__}: {exc})") from None
    code = int(img.header.get("intent_code", 0)) if hasattr(img.header, "get") else 0
    shape = tuple(int(n) for n in img.shape)
    dims = "x".join(map(str, shape))
    if len(shape) == 5 and shape[3] == 1 and shape[4] == 3 and code in (0, _NIFTI_INTENT_VECTOR,
                                                                       _NIFTI_INTENT_DISPVECT):
        data = np.asarray(img.dataobj, dtype=np.float32)[:, :, :, 0, :]
    elif len(shape) == 4 and shape[3] == 3 and code in (_NIFTI_INTENT_VECTOR, _NIFTI_INTENT_DISPVECT):
        data = np.asarray(img.dataobj, dtype=np.float32)
    else:
        raise _error(path, f"not a displacement field (shape {dims}, intent code {code}); expected "
                           "X x Y x Z x 1 x 3 with intent 1007 (ITK/ANTs, LPS) or 1006 (RAS)")
    if not np.all(np.isfinite(data)):
        raise _error(path, "displacement field contains NaN or Inf")
    if min(shape[:3]) < 2:
        raise _error(path, f"displacement field grid {dims} is not 3D")
    if code != _NIFTI_INTENT_DISPVECT:
        data = data * _LPS3.astype(np.float32)  # ITK stores LPS vectors
    grid = Geometry(shape[:3], np.asarray(img.affine, dtype=np.float64), path)
    return Warp(data, grid, moving=moving)


# --------------------------------------------------- FreeSurfer MGH warp --

def _geom_bytes(g: Geometry | None, fallback: Geometry) -> bytes:
    valid = g is not None
    vs, mdc, c_ras = _fs_geometry_fields(g if g is not None else fallback)
    shape = (g if g is not None else fallback).shape
    name = ((g.path or "") if g is not None else "").encode("utf-8")[:511]
    return (struct.pack(">i", int(valid)) + struct.pack(">3i", *shape) + struct.pack(">3f", *vs)
            + struct.pack(">9f", *mdc.ravel(order="F")) + struct.pack(">3f", *c_ras)
            + name.ljust(512, b"\x00"))


def _mgh_warp_bytes(t: Warp, moving: Geometry | None) -> bytes:
    g = t.grid
    vs, mdc, c_ras = _fs_geometry_fields(g)
    header = (struct.pack(">7i", (_MGZ_WARPMAP << 8) | _MGH_VERSION, *g.shape, 3, _MRI_FLOAT, 1)
              + struct.pack(">h", 1) + struct.pack(">3f", *vs) + struct.pack(">9f", *mdc.ravel(order="F"))
              + struct.pack(">3f", *c_ras))
    header = header.ljust(284, b"\x00")
    body = np.asarray(t.disp, dtype=">f4").ravel(order="F").tobytes()
    fov = float(np.max(vs * np.asarray(g.shape)))
    footer = struct.pack(">5f", 0.0, 0.0, 0.0, 0.0, fov)  # TR, flip angle, TE, TI, FoV
    tags = (struct.pack(">i", _TAG_GCAMORPH_GEOM) + _geom_bytes(moving, g) + _geom_bytes(g, g)
            + struct.pack(">iq", _TAG_GCAMORPH_META, 12) + struct.pack(">iif", _DISP_RAS, 1, 0.0))
    return header + body + footer + tags


def _parse_geom(buf: bytes, pos: int) -> tuple[Geometry | None, int]:
    valid = struct.unpack_from(">i", buf, pos)[0]
    shape = struct.unpack_from(">3i", buf, pos + 4)
    vs = struct.unpack_from(">3f", buf, pos + 16)
    mdc = np.array(struct.unpack_from(">9f", buf, pos + 28)).reshape(3, 3, order="F")
    c_ras = struct.unpack_from(">3f", buf, pos + 64)
    name = buf[pos + 76:pos + 76 + 512].split(b"\x00", 1)[0].decode("utf-8", "replace") or None
    geom = None
    if valid and min(shape) > 0 and min(vs) > 0:
        geom = Geometry(shape, _fs_affine(shape, vs, mdc, c_ras), name)
    return geom, pos + _GEOM_BYTES


def _read_mgh_warp(path: str, moving: Geometry | None) -> Warp:
    with open(path, "rb") as f:
        magic = f.read(2)
    opener = gzip.open if magic == b"\x1f\x8b" else open
    with opener(path, "rb") as f:
        buf = f.read()
    if len(buf) < 284:
        raise _error(path, "not an MGH file (shorter than its header)")
    version, nx, ny, nz, nframes, dtype_id, _dof = struct.unpack_from(">7i", buf, 0)
    good_ras = struct.unpack_from(">h", buf, 28)[0]
    if version & 0xFF != _MGH_VERSION:
        raise _error(path, f"not an MGH file (version {version})")
    if nframes != 3 or min(nx, ny, nz) < 2:
        raise _error(path, f"not a warp: shape {nx}x{ny}x{nz}x{nframes}, expected X x Y x Z x 3")
    if dtype_id != _MRI_FLOAT:
        raise _error(path, f"not a warp: data type {dtype_id}, expected float")
    if not good_ras:
        raise _error(path, "warp has no valid geometry (goodRASflag 0)")
    vs = struct.unpack_from(">3f", buf, 30)
    mdc = np.array(struct.unpack_from(">9f", buf, 42)).reshape(3, 3, order="F")
    c_ras = struct.unpack_from(">3f", buf, 78)
    grid = Geometry((nx, ny, nz), _fs_affine((nx, ny, nz), vs, mdc, c_ras), path)
    count = nx * ny * nz * 3
    end = 284 + 4 * count
    if len(buf) < end:
        raise _error(path, "truncated MGH data")
    data = np.frombuffer(buf, dtype=">f4", count=count, offset=284).reshape((nx, ny, nz, 3), order="F")
    data = data.astype(np.float32)

    fmt, source = None, None
    pos = end + 20  # TR, flip angle, TE, TI, FoV
    while pos + 4 <= len(buf):
        tag = struct.unpack_from(">i", buf, pos)[0]
        pos += 4
        if tag == 0:
            break
        if tag == _TAG_GCAMORPH_GEOM:
            source, pos = _parse_geom(buf, pos)
            _, pos = _parse_geom(buf, pos)
            continue
        if tag in _LENGTHLESS_TAGS:
            break  # size not known here: nothing we need follows in practice
        if tag == _TAG_OLD_XFORM:
            length = struct.unpack_from(">i", buf, pos)[0]
            pos += 4
        else:
            length = struct.unpack_from(">q", buf, pos)[0]
            pos += 8
        if tag == _TAG_GCAMORPH_META and length >= 4:
            fmt = struct.unpack_from(">i", buf, pos)[0]
        pos += max(int(length), 0)

    intent = (version >> 8) & 0xFFFF
    if fmt is None:
        raise _error(path, f"no warp data-format tag (MGH intent {intent}): not a FreeSurfer warp "
                           "(as mri_synthmorph or mri_warp_convert --outmgzwarp write)")
    if not np.all(np.isfinite(data)):
        raise _error(path, "warp contains NaN or Inf")
    src = source or moving
    if fmt in (_ABS_CRS, _DISP_CRS) and src is None:
        raise _error(path, "voxel-coordinate warp without a valid source (moving) geometry")
    disp = np.empty_like(data)
    for x0, x1, world in _world_slabs(grid):
        d = data[x0:x1].astype(np.float64)
        if fmt == _DISP_RAS:
            disp[x0:x1] = d
            continue
        if fmt == _ABS_RAS:
            moved = d
        elif fmt in (_ABS_CRS, _DISP_CRS):
            if fmt == _DISP_CRS:  # delta = moving voxel - fixed voxel
                idx = np.stack(np.meshgrid(np.arange(x0, x1), np.arange(ny), np.arange(nz), indexing="ij"), -1)
                d = d + idx
            moved = _apply_matrix(src.affine, d)  # type: ignore[union-attr]
        else:
            raise _error(path, f"unknown warp data format {fmt}")
        disp[x0:x1] = moved - world
    return Warp(disp, grid, moving=src)
