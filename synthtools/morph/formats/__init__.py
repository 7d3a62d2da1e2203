"""Transform files: the format follows the extension; one module per format.

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

Every problem with a file is an :class:`~synthtools.io.InputError` whose
one-line message starts with its path.
"""
from __future__ import annotations

import gzip
import os

from ...io import InputError
from ..transforms import Affine, GeometryLike, Transform, Warp, _check_warp_grid, _opt_geometry, compose
from .common import _atomic_nifti, _atomic_write, _error
from .itk import _itk_text, _read_itk
from .lta import _lta_text, _read_lta
from .mgh_warp import _mgh_warp_bytes, _read_mgh_warp
from .nifti_warp import _nifti_warp_image, _read_nifti_warp

__all__ = ["read_transform", "write_transform", "transform_kind", "TRANSFORM_EXTENSIONS", "LINEAR_EXTENSIONS",
           "WARP_EXTENSIONS"]

LINEAR_EXTENSIONS = (".lta", ".txt", ".tfm")
WARP_EXTENSIONS = (".nii.gz", ".nii", ".mgz", ".mgh")
TRANSFORM_EXTENSIONS = LINEAR_EXTENSIONS + WARP_EXTENSIONS


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
