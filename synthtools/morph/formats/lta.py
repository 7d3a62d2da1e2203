"""FreeSurfer LTA (linear transform array): FreeSurfer's push-forward
matrix with src/dst volume info (see :mod:`synthtools.morph.formats`)."""
from __future__ import annotations

import re

import numpy as np

from ..transforms import Affine, Geometry
from .common import _check_matrix, _error, _fs_affine, _fs_geometry_fields, _text_lines


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
