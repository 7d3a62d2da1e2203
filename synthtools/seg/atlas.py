"""Multi-atlas spatial prior for segmentation.

The segmentation network, trained for ~5 % of SynthSeg's schedule on a
CPU, has learnt a blurred shape prior. Labelled brains registered to the
target give sharper anatomy: each shipped atlas (a SynthSeg-style label map,
brain only, 1 mm) is turned into a T1-like image, registered to the target
with ``synthmorph register -m joint`` (affine network + test-time SVF fit,
whose squared local correlation does not care which contrast the target
has), and its labels, as soft 2 mm fractions, are pulled onto the network's
grid. The fractions averaged over atlases multiply the network's posteriors:

    prior_c = p_c * (alpha + f_c) / sum_k p_k * (alpha + f_k)

``alpha`` keeps a label the atlases miss possible where the network is sure
of it. The intensity refinement (:mod:`synthtools.seg.refine`) then runs on
this prior as it does on the network's alone. Measured gains are in
``runs/README.md`` ("Atlas prior", session 17).

Atlas files: ``<model>/atlas_XX.nii.gz``, uint8 FreeSurfer values,
listed in the model's ``metadata.json`` as ``{"atlas": {"files": [...],
"registration": "synthmorph-affine", "alpha": 0.05}}``. They are derived
from SynthSeg's training label maps (Apache 2.0, see the model card) by
``training/atlases.py``.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..io import Volume, load_volume
from ..morph.transforms import Warp
from ..weights import Model, ModelError, load_model
from .coords import world_coords

__all__ = ["T1_INTENSITY", "DEFAULT_ALPHA", "atlas_files", "default_atlases", "atlas_image", "soft_labels",
           "AtlasPrior", "MovedAtlas", "move_atlases", "apply_prior"]

# T1-weighted intensities (arbitrary units, WM 110) per FreeSurfer label: the
# atlases' synthetic image. Any plausible contrast works (the fit is
# contrast-agnostic); a T1 keeps deep grey matter apart from white matter.
T1_INTENSITY = {2: 110, 41: 110, 3: 70, 42: 70, 4: 25, 43: 25, 5: 25, 44: 25, 14: 25, 15: 25, 24: 35,
                7: 100, 46: 100, 8: 75, 47: 75, 10: 92, 49: 92, 11: 78, 50: 78, 12: 85, 51: 85,
                13: 100, 52: 100, 16: 100, 17: 72, 53: 72, 18: 72, 54: 72, 26: 78, 58: 78, 28: 95, 60: 95}

DEFAULT_ALPHA = 0.05


def atlas_files(model: Model) -> list[Path]:
    """The atlas label maps listed in ``model``'s metadata (empty if none)."""
    spec = model.meta.get("atlas") or {}
    files = [Path(model.path) / f for f in spec.get("files", [])]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ModelError(f"{missing[0]}: atlas file missing from the model folder")
    return files


def default_atlases(model: Model) -> int:
    """How many atlases ``model`` uses by default (metadata ``atlas.default``),
    at most the number it ships."""
    return min(int((model.meta.get("atlas") or {}).get("default", 0)), len(atlas_files(model)))


def atlas_image(labels: np.ndarray) -> np.ndarray:
    """T1-like float32 image of a label map (1 voxel Gaussian blur, zero
    outside the brain), the atlas side of the registration."""
    lut = np.zeros(max(256, int(labels.max()) + 1), np.float32)
    for k, v in T1_INTENSITY.items():
        lut[k] = v
    return ndimage.gaussian_filter(lut[labels], 1.0) * (labels > 0)


def _channel_lut(values: Sequence[int], size: int = 256) -> np.ndarray:
    """FreeSurfer value -> channel index of ``values`` (uint8, ``size``
    entries); values not listed go to the background channel (value 0)."""
    values = np.asarray(values)
    lut = np.full(max(size, int(values.max()) + 1), int(np.flatnonzero(values == 0)[0]), np.uint8)
    lut[values] = np.arange(len(values))
    return lut


def soft_labels(labels: np.ndarray, affine: np.ndarray, values: Sequence[int],
                factor: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Label fractions (X', Y', Z', C) float32 of ``labels`` averaged over
    ``factor``^3 voxel blocks, one channel per entry of ``values`` (other
    labels count as background, channel of value 0), and their affine."""
    lut = _channel_lut(values, int(labels.max()) + 1)
    idx = torch.from_numpy(lut[labels].astype(np.int64))
    pad = [(-n) % factor for n in idx.shape]
    idx = F.pad(idx, (0, pad[2], 0, pad[1], 0, pad[0]), value=int(lut[0]))
    frac = torch.zeros((len(values),) + tuple(n // factor for n in idx.shape))
    weight = torch.full((1,) + tuple(frac.shape[1:]), 1.0 / factor ** 3)
    for i, j, k in itertools.product(range(factor), repeat=3):   # each voxel of a block adds to its channel
        frac.scatter_add_(0, idx[i::factor, j::factor, k::factor][None], weight)
    out_affine = np.asarray(affine, np.float64).copy()
    # Block q covers voxels factor*q .. factor*q + factor - 1: its centre is at (factor - 1) / 2.
    out_affine[:3, 3] = affine[:3, :3] @ np.full(3, (factor - 1) / 2) + affine[:3, 3]
    out_affine[:3, :3] = affine[:3, :3] * factor
    return frac.movedim(0, -1).numpy(), out_affine


@dataclass
class MovedAtlas:
    """One atlas registered to the target: ``warp`` (fixed = the network's
    grid) and the atlas as a uint8 map of channel indices with its affine."""
    warp: Warp
    channels: np.ndarray
    affine: np.ndarray

    def channels_at(self, world: torch.Tensor, background: int) -> np.ndarray:
        """Channel index (nearest atlas voxel) at world points (N, 3) float32,
        mm; ``background`` outside the atlas."""
        from ..warp import sample
        to_grid = torch.as_tensor(np.linalg.inv(self.warp.grid.affine), dtype=torch.float32)
        to_atlas = torch.as_tensor(np.linalg.inv(self.affine), dtype=torch.float32)
        disp = torch.from_numpy(self.warp.disp).movedim(-1, 0)[None]      # (1, 3, *grid), mm
        out = np.full(len(world), background, np.uint8)
        shape = torch.tensor(self.channels.shape)
        for i in range(0, len(world), 1 << 20):   # bounded temporaries
            p = world[i:i + (1 << 20)]
            q = p + sample(disp, (p @ to_grid[:3, :3].T + to_grid[:3, 3])[None, None, None])[0, :, 0, 0].T
            vox = torch.round(q @ to_atlas[:3, :3].T + to_atlas[:3, 3]).long()
            inside = ((vox >= 0) & (vox < shape)).all(1)
            v = vox[inside].numpy()
            out[i:i + len(p)][inside.numpy()] = self.channels[v[:, 0], v[:, 1], v[:, 2]]
        return out


@dataclass
class AtlasPrior:
    """Atlases moved onto a target: ``fractions`` (C, X, Y, Z) float32 on
    the network's grid (mean of the soft 2 mm labels), the registered
    ``atlases`` (for native-grid labels: nearest 1 mm atlas voxels, sharper
    than the fractions resampled), ``background`` channel and ``alpha``."""
    fractions: np.ndarray
    atlases: list[MovedAtlas]
    background: int
    alpha: float = DEFAULT_ALPHA

    def native_fractions(self, region: np.ndarray, affine: np.ndarray) -> np.ndarray:
        """(N, C) float32 fraction of atlases giving each channel at the True
        voxels of ``region`` (C order) of the grid ``affine``: only those
        points are mapped, not the whole native grid."""
        world = world_coords(region, affine)
        out = np.zeros((len(world), self.fractions.shape[0]), np.float32)
        rows = np.arange(len(world))
        for atlas in self.atlases:   # one (row, channel) pair per row: plain fancy indexing adds correctly
            out[rows, atlas.channels_at(world, self.background)] += 1.0 / len(self.atlases)
        return out


def move_atlases(target: Volume, values: Sequence[int], files: Sequence[Path],
                 registration: Model | str = "synthmorph-affine", regularization: float = 0.5,
                 alpha: float = DEFAULT_ALPHA) -> AtlasPrior:
    """Register each atlas of ``files`` to ``target`` (the network's
    conformed image) and move its soft labels onto that grid."""
    from ..morph.register import joint_fixed_side, register
    from ..morph.transforms import apply_transform, as_geometry
    model = load_model(registration) if isinstance(registration, str) else registration
    models = {"linear": model, "deform": model}
    side = joint_fixed_side(model, target)     # the target's features: once for all atlases
    grid = as_geometry(target)
    lut = _channel_lut(values)
    background = int(lut[0])
    total, moved_atlases = None, []
    for f in files:
        vol = load_volume(f, dtype=None)
        labels = np.rint(np.asarray(vol.data)).astype(np.int32)
        reg = register(Volume(atlas_image(labels), vol.affine), target, "joint", models,
                       regularization=regularization, inverse=False, side=side)
        frac, frac_affine = soft_labels(labels, vol.affine, values)
        moved = apply_transform(reg.transform, Volume(frac, frac_affine), grid, order=1)
        moved = torch.as_tensor(np.asarray(moved, np.float32)).movedim(-1, 0)
        total = moved if total is None else total.add_(moved)
        moved_atlases.append(MovedAtlas(reg.transform, lut[np.clip(labels, 0, len(lut) - 1)],
                                        np.asarray(vol.affine)))
    return AtlasPrior((total / len(files)).numpy(), moved_atlases, background, alpha)


def apply_prior(prob: torch.Tensor, fractions: np.ndarray | torch.Tensor, alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """``prob`` (C, *S) posteriors times ``alpha + fractions``, renormalised
    per voxel, in place. Returns ``prob``."""
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0 (a label no atlas has would be impossible), got {alpha}")
    prob.mul_(torch.as_tensor(fractions, dtype=prob.dtype).add_(alpha))
    prob.div_(prob.sum(0, keepdim=True).clamp_min_(1e-12))
    return prob
