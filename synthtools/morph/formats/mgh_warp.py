"""FreeSurfer MGH/MGZ warps as ``mri_synthmorph`` writes them (see
:mod:`synthtools.morph.formats`)."""
from __future__ import annotations

import gzip
import struct

import numpy as np

from ..transforms import Geometry, Warp, _apply_matrix, _world_slabs
from .common import _error, _fs_affine, _fs_geometry_fields

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
