"""Segmentation with FreeSurfer's SynthSeg 2.0 / robust 2.0 weights,
preprocessed and post-processed as the published ``mri_synthseg`` does
(``preprocess`` and ``postprocess`` there; our own code, written from them),
then written through our native-grid, volume and QC outputs:

1. resolution: if any voxel size is outside 0.95-1.05 mm the image is
   resampled to 1 mm (Gaussian pre-filter of sigma 0.25 / factor voxels
   along axes that shrink, trilinear sampling on the published grid);
   otherwise the voxels are kept as they are;
2. the axes are permuted/flipped to RAS (``align_volume_to_ref`` to the
   identity), no interpolation;
3. ``--crop N``: centred crop to N rounded up to a multiple of 32;
4. intensities clipped to their 0.5 and 99.5 percentiles and rescaled to
   [0, 1];
5. zero padding, centred (floor before, ceil after), to a multiple of 32 and
   at least 128 voxels per axis (the crop size with ``--crop``);
6. network; for 2.0 the posteriors are blurred (sigma 0.5 voxel) and, with
   flip averaging (the published default, off with ``--no-flip``), averaged
   with the blurred posteriors of the image mirrored along its first (L-R)
   axis, channels swapped left/right; robust runs its three networks with
   neither;
7. post-processing of ``mri_synthseg --fast`` (what robust always uses):
   remove the padding; keep the largest connected component of
   {sum of the non-background posteriors > 0.25}; zero the non-background
   posteriors outside it and below 0.2; renormalise to sum 1.

Deviation, stated: the default (non ``--fast``) post-processing of 2.0 also
keeps the largest component of each topological class listed in
``synthseg_topological_classes_2.0.npy``; that file is binary and was not
available to us, so 2.0 uses the --fast post-processing too.

The posteriors then go to the input's native grid (trilinear) where the
labels are their argmax, as for our own models; volumes (soft, mm^3) and QC
are measured there (mri_synthseg reports its 1 mm grid's). ``--refine`` and
``--atlases`` belong to our models and are not applied to these.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from .conform import Conformed
from .io import Volume
from .seg.lut import names_for
from .seg.segmenter import SegResult, _map_to_native, flip_permutation, label_values
from .weights import Model

MULTIPLE = 32           # 2 ** n_levels of mri_synthseg's preprocess (n_levels=5)
MIN_PAD = 128           # min_pad without --crop


def ras_axes(affine: np.ndarray) -> np.ndarray:
    """Voxel axis along each world axis R, A, S (``get_ras_axes``: the largest
    entry of each column of the inverse affine), made a permutation."""
    inv = np.abs(np.linalg.inv(np.asarray(affine, float))[:3, :3])
    axes = inv.argmax(0)
    if sorted(axes) != [0, 1, 2]:   # a tie: give each world axis a distinct voxel axis
        order = np.argsort(-inv.max(0))
        axes, taken = np.zeros(3, int), set()
        for j in order:
            i = next(i for i in np.argsort(-inv[:, j]) if i not in taken)
            axes[j] = i
            taken.add(i)
    return axes


def align_to_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Voxel axes permuted and flipped so that axis j runs along world axis j,
    increasing (R, A, S); exact. Returns the data and its affine."""
    axes = ras_axes(affine)
    out = np.transpose(data, axes)
    aff = np.asarray(affine, float).copy()
    aff[:, :3] = aff[:, axes]
    for j in range(3):
        if aff[j, j] < 0:
            out = np.flip(out, axis=j)
            aff[:3, 3] += aff[:3, j] * (out.shape[j] - 1)
            aff[:3, j] = -aff[:3, j]
    return np.ascontiguousarray(out), aff


def _linear_along(x: np.ndarray, axis: int, coords: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``x`` along one axis at ``coords`` (in [0, n-1])."""
    i0 = np.floor(coords).astype(int)
    i1 = np.minimum(i0 + 1, x.shape[axis] - 1)
    w = (coords - i0).astype(np.float32)
    shape = [1] * x.ndim
    shape[axis] = -1
    return np.take(x, i0, axis) * (1 - w.reshape(shape)) + np.take(x, i1, axis) * w.reshape(shape)


def resample_1mm(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mri_synthseg's ``resample_volume`` to 1 mm: blur (sigma 0.25 / factor
    voxels where factor < 1), then trilinear samples at
    ``start + k / factor``, ``start = -(factor - 1) / (2 factor)``,
    ``ceil(n * factor)`` of them, clipped to the image."""
    vs = np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(0))
    factor = vs / 1.0
    sigmas = np.where(factor > 1, 0.0, 0.25 / factor)
    x = ndimage.gaussian_filter(data.astype(np.float32), sigmas) if np.any(sigmas > 0) else data.astype(np.float32)
    for ax in range(3):   # separable: trilinear on a grid is linear along each axis in turn
        start = -(factor[ax] - 1) / (2 * factor[ax])
        n = int(np.ceil(x.shape[ax] * factor[ax]))
        coords = np.clip(start + np.arange(n) / factor[ax], 0, x.shape[ax] - 1)
        x = _linear_along(x, ax, coords)
    aff = np.asarray(affine, float).copy()
    aff[:3, :3] = aff[:3, :3] / factor
    aff[:3, 3] -= aff[:3, :3] @ (0.5 * (factor - 1))
    return x.astype(np.float32), aff


def rescale(x: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5) -> np.ndarray:
    """Clip to the [lo, hi] percentiles and map them to [0, 1] (all zeros if equal)."""
    lo, hi = np.percentile(x, [lo_pct, hi_pct])
    if hi == lo:
        return np.zeros_like(x, dtype=np.float32)
    return ((np.clip(x, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def _up(n, m: int = MULTIPLE) -> np.ndarray:
    return (-(-np.asarray(n, int) // m)) * m


def centre_crop(x: np.ndarray, affine: np.ndarray, size) -> tuple[np.ndarray, np.ndarray]:
    """``crop_volume(mode='center')``: start ``int((n - size) / 2)``, never past the image."""
    size = np.broadcast_to(np.asarray(size, int), (3,))
    lo = np.maximum((np.array(x.shape) - size) // 2, 0)
    hi = np.minimum(lo + size, x.shape)
    shift = np.eye(4)
    shift[:3, 3] = lo
    return x[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], affine @ shift


def pad_to(x: np.ndarray, affine: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray, tuple[slice, ...]]:
    """Zero padding to ``shape``: floor of the margin before, ceil after.
    Returns the padded image, its affine and the slices of the original."""
    margin = np.maximum(np.array(shape) - np.array(x.shape), 0)
    before = margin // 2
    out = np.pad(x, [(int(b), int(m - b)) for b, m in zip(before, margin)])
    shift = np.eye(4)
    shift[:3, 3] = -before
    inner = tuple(slice(int(b), int(b + n)) for b, n in zip(before, x.shape))
    return out, affine @ shift, inner


def preprocess(data: np.ndarray, affine: np.ndarray, crop=None):
    """Steps 1-5: (network input, its affine, slices of the unpadded image)."""
    x = np.asarray(data, np.float32)
    aff = np.asarray(affine, float)
    vs = np.sqrt((aff[:3, :3] ** 2).sum(0))
    if np.any((vs > 1.05) | (vs < 0.95)):
        x, aff = resample_1mm(x, aff)
    x, aff = align_to_ras(x, aff)
    min_pad = MIN_PAD
    if crop is not None:
        crop = _up(np.broadcast_to(np.asarray(crop, int), (3,)))
        x, aff = centre_crop(x, aff, crop)
        min_pad = crop
    x = rescale(x)
    shape = np.maximum(_up(x.shape), _up(np.broadcast_to(min_pad, (3,))))
    return pad_to(x, aff, shape)


def _posteriors(model: Model, x: np.ndarray, flip: bool) -> torch.Tensor:
    """Step 6: (C, X, Y, Z) posteriors of the network on the padded image."""
    net = model.net
    device = next(net.parameters()).device
    robust = bool(model.meta.get("freesurfer", {}).get("robust"))
    xt = torch.from_numpy(x)[None, None].to(device)
    p = net(xt, blur=not robust)[0]
    if flip and not robust:
        perm = torch.as_tensor(flip_permutation(label_values(model)), device=device)
        mirrored = net(xt.flip(2), blur=True)[0].flip(1)       # axis 0 of (X, Y, Z) is dim 1 here
        p = 0.5 * (p + mirrored[perm])
    return p.float().cpu()


def postprocess(p: torch.Tensor) -> torch.Tensor:
    """Step 7 on (C, X, Y, Z) posteriors (channel 0 = background), in place."""
    fg = p[1:]
    mask = (fg.sum(0) > 0.25).numpy()
    lab, n = ndimage.label(mask)
    if n > 0:
        keep = lab == (np.bincount(lab.ravel())[1:].argmax() + 1)
        fg *= torch.from_numpy(keep)
    fg *= fg > 0.2
    total = p.sum(0, keepdim=True)
    # A voxel left with nothing (background ~0, the rest zeroed) is background.
    p[0][total[0] <= 0] = 1.0
    p /= p.sum(0, keepdim=True)
    return p


@torch.inference_mode()
def segment(model: Model, volume: Volume, frame: int | None = None, *, flip: bool = True,
            crop=None, posteriors: bool = False, **ours) -> SegResult:
    """:func:`synthtools.seg.segment` for a FreeSurfer SynthSeg model (see the
    module docstring). ``ours`` (refine, bias_field, atlases...) are options of
    our own models, accepted and not applied."""
    data = volume.data if frame is None else volume.data[..., frame]
    if data.ndim != 3:
        raise ValueError(f"a 3D image (or frame) is required, got shape {tuple(data.shape)}")
    x, aff, inner = preprocess(data, volume.affine, crop)
    prob = postprocess(_posteriors(model, x, flip)[(slice(None), *inner)].contiguous())
    image = torch.from_numpy(np.ascontiguousarray(x[inner]))
    shift = np.eye(4)
    shift[:3, 3] = [s.start for s in inner]
    conf = Conformed(data=image, affine=aff @ shift, native_affine=np.asarray(volume.affine, float),
                     native_shape=tuple(int(n) for n in data.shape))
    values = label_values(model)
    arg, summary, post = _map_to_native(conf, prob, values, keep=posteriors)
    names = [str(n) for n in model.meta["output"].get("names") or names_for(values)]
    return SegResult(label_values=values, names=names, labels=values[arg], native=summary, conformed=conf,
                     _conformed_posteriors=prob, _posteriors=post, network_posteriors=prob)
