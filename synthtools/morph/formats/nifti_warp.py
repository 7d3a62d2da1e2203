"""ITK/ANTs NIfTI displacement fields (``.nii.gz``/``.nii``; see
:mod:`synthtools.morph.formats`)."""
from __future__ import annotations

import numpy as np

from ..transforms import Geometry, Warp
from .common import _LPS3, _error

_NIFTI_INTENT_DISPVECT = 1006
_NIFTI_INTENT_VECTOR = 1007


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
