"""Skull-stripping with FreeSurfer's SynthStrip weights, preprocessed as the
published ``mri_synthstrip`` does (our own code, written from its steps):

1. conform to 1 mm voxels, LIA axes (surfa ``conform(voxsize=1,
   orientation='LIA', method='nearest')``): the axes are permuted/flipped to
   the closest LIA order (exact, no interpolation); if the voxels are not
   1 mm the image is resampled with nearest neighbour onto a 1 mm grid of
   the same rotation and centre, ``ceil(size in mm)`` voxels per axis
   (checked voxel for voxel against surfa 0.6.3 in the tests);
2. crop to the bounding box of the voxels above zero;
3. pad or crop each axis, centred, to ``ceil(n / 64) * 64`` clipped to
   192-320 voxels;
4. subtract the minimum, divide by the 99th percentile, clip to [0, 1];
5. the network's signed distance goes back to the native grid (linear,
   100 mm outside the network's field of view), through our
   :class:`synthtools.conform.Conformed` path;
6. mask = distance < border, largest connected component, holes filled.

No flip averaging: the published script has none. Not reproduced: the newer
script's re-computation of the distance beyond its 4-5 mm band for large
borders (``extend_sdt``), so ``-b`` above ~4 mm saturates as the network's
output does.
"""
from __future__ import annotations

import numpy as np
import torch
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

from .conform import Conformed
from .io import Volume
from .skullstrip import StripResult, mask_from_sdt
from .weights import Model

OUTSIDE_MM = 100.0     # the published fill of the distance outside the network's grid


def reorient(data: np.ndarray, affine: np.ndarray, code: str = "LIA") -> tuple[np.ndarray, np.ndarray]:
    """Permute/flip the voxel axes to the closest ``code`` orientation; exact
    (no interpolation). Returns the data and its new voxel->world affine."""
    ornt = ornt_transform(io_orientation(affine), axcodes2ornt(tuple(code)))
    out = data
    new = np.eye(4)
    # ornt[i] = (destination axis, flip) of source axis i.
    perm = np.argsort(ornt[:, 0]).astype(int)
    out = np.transpose(out, perm)
    cols = np.asarray(affine, float)[:3, :3][:, perm]
    origin = np.asarray(affine, float)[:3, 3].copy()
    for j in range(3):
        if ornt[perm[j], 1] < 0:
            out = np.flip(out, axis=j)
            origin = origin + cols[:, j] * (out.shape[j] - 1)
            cols[:, j] = -cols[:, j]
    new[:3, :3], new[:3, 3] = cols, origin
    return np.ascontiguousarray(out), new


def resize_to_1mm(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour resampling to 1 mm voxels on a grid of the same
    rotation and centre (surfa's convention: the centre is voxel shape/2),
    ``ceil(shape * voxel size)`` voxels; unchanged if already 1 mm."""
    vs = np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(0))
    if np.allclose(vs, 1.0, atol=1e-5, rtol=0):
        return data, affine
    shape = np.ceil(vs * np.array(data.shape)).astype(int)
    rot = affine[:3, :3] / vs
    center = affine[:3, :3] @ (np.array(data.shape) / 2) + affine[:3, 3]
    new = np.eye(4)
    new[:3, :3] = rot
    new[:3, 3] = center - rot @ (shape / 2)
    return sample_nearest(data, affine, new, tuple(int(n) for n in shape)), new


def sample_nearest(data: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray, shape) -> np.ndarray:
    """Nearest-neighbour resampling as surfa's ``interpolate(method='nearest')``
    does it: source coordinates in float32, index ``floor(x + 0.5)``, zero
    outside (this convention reproduces surfa's output voxel for voxel; a
    round-half-even one differs on the many exact .5 ties of 1.5 mm grids).
    One slab of the first axis at a time."""
    m = np.linalg.inv(np.asarray(src_affine, float)) @ np.asarray(dst_affine, float)
    out = np.zeros(shape, np.float32)
    jk = np.stack(np.meshgrid(np.arange(shape[1]), np.arange(shape[2]), indexing="ij"), -1).reshape(-1, 2)
    base = (jk @ m[:3, 1:3].T + m[:3, 3]).astype(np.float64)
    limit = np.array(data.shape)
    for i in range(shape[0]):
        src = (base + i * m[:3, 0]).astype(np.float32)
        idx = np.floor(src + np.float32(0.5)).astype(np.int64)
        ok = np.all((idx >= 0) & (idx < limit), axis=1)
        plane = np.zeros(len(idx), np.float32)
        plane[ok] = data[idx[ok, 0], idx[ok, 1], idx[ok, 2]]
        out[i] = plane.reshape(shape[1], shape[2])
    return out


def fit_shape(data: np.ndarray, affine: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """Centred pad (zeros) or crop to ``shape`` as surfa's ``reshape``: the old
    voxel 0 lands at index ``trunc((new - old) / 2)``."""
    offset = np.trunc((np.array(shape) - np.array(data.shape)) / 2).astype(int)
    out = np.zeros(tuple(int(s) for s in shape), dtype=data.dtype)
    src, dst = [], []
    for n_old, n_new, o in zip(data.shape, shape, offset):
        lo, hi = max(0, -o), min(n_old, n_new - o)
        src.append(slice(lo, hi))
        dst.append(slice(lo + o, hi + o))
    out[tuple(dst)] = data[tuple(src)]
    shift = np.eye(4)
    shift[:3, 3] = -offset
    return out, affine @ shift


def target_shape(shape) -> tuple[int, ...]:
    """Each side rounded up to a multiple of 64, clipped to 192-320 voxels."""
    return tuple(int(n) for n in np.clip(np.ceil(np.array(shape) / 64).astype(int) * 64, 192, 320))


def preprocess(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1-4 of the module docstring: the network's input and its affine."""
    x, aff = reorient(np.asarray(data, np.float32), affine, "LIA")
    x, aff = resize_to_1mm(x, aff)
    nz = np.argwhere(x > 0)
    if len(nz):
        lo, hi = nz.min(0), nz.max(0) + 1
        x = x[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        shift = np.eye(4)
        shift[:3, 3] = lo
        aff = aff @ shift
    x, aff = fit_shape(x, aff, target_shape(x.shape))
    x = x - x.min()
    hi = np.percentile(x, 99)
    x = np.clip(x / hi, 0, 1) if hi > 0 else np.zeros_like(x)
    return x.astype(np.float32), aff


@torch.inference_mode()
def brain_sdt(model: Model, data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Signed distance (mm, negative inside) on the native grid of a 3D image."""
    x, aff = preprocess(data, affine)
    device = next(model.net.parameters()).device
    sdt = model.net(torch.from_numpy(x)[None, None].to(device))[0, 0].float().cpu()
    conf = Conformed(data=sdt, affine=aff, native_affine=np.asarray(affine, float),
                     native_shape=tuple(int(n) for n in data.shape[:3]))
    return conf.to_native(sdt, order=1, fill=OUTSIDE_MM).astype(np.float32)


def strip(model: Model, volume: Volume, border: float = 1.0, channel: int = 0,
          flip: bool = False) -> StripResult:
    """:func:`synthtools.skullstrip.strip` for a FreeSurfer SynthStrip model: 4D
    images frame by frame; ``channel`` and ``flip`` are accepted for the
    same call and ignored (one output; the published script does not flip)."""
    data = volume.data
    if data.ndim == 4:
        sdts = [brain_sdt(model, data[..., t], volume.affine) for t in range(data.shape[3])]
        return StripResult(np.stack(sdts, -1), np.stack([mask_from_sdt(s, border) for s in sdts], -1))
    sdt = brain_sdt(model, data, volume.affine)
    return StripResult(sdt, mask_from_sdt(sdt, border))
