"""ITK text affine transforms (``.txt``/``.tfm``): LPS pull-back matrices
(see :mod:`synthtools.morph.formats`)."""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from ..transforms import Affine, Geometry
from .common import _LPS, _check_matrix, _error, _text_lines

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
