"""What the transform file formats share: one-line errors, atomic writes,
matrix checks, text-file reading, RAS <-> LPS and FreeSurfer's geometry fields."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ...io import InputError, atomic_output
from ..transforms import Geometry

# RAS <-> LPS: negate the first two world axes (its own inverse).
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_LPS3 = np.array([-1.0, -1.0, 1.0])


def _error(path: str, problem: str) -> InputError:
    return InputError(f"{path}: {problem}")


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
