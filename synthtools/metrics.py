"""Scores of a model's output against a reference: overlap (Dice), surface
distance (mm), label and tissue-class agreement, displacement error (mm).

Pure numpy (scipy for distances); no file, case list or model here: the
cases and the data root live in :mod:`synthtools.evaluation`. Masks are
boolean-like arrays on one voxel grid; label maps hold FreeSurfer values.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

# SynthSeg labels merged into BrainWeb's tissue classes.
TISSUE = {
    "CSF": (4, 5, 14, 15, 24, 43, 44),
    "GM": (3, 42, 8, 47, 10, 49, 11, 50, 12, 51, 13, 52, 17, 53, 18, 54, 26, 58),
    "WM": (2, 41, 7, 46, 16, 28, 60),
}
BRAINWEB_CLASS = {"CSF": 1, "GM": 2, "WM": 3}
LARGE = (2, 41, 3, 42, 4, 43, 7, 46, 8, 47, 10, 49, 12, 51)  # WM, cortex, ventricles, cerebellum, thalamus, putamen

# FreeSurfer aseg labels outside the SynthSeg 2.0 set that the training label maps draw as part
# of a SynthSeg structure (measured on the vxm scan: 75 % of our labels on the choroid plexus
# say lateral ventricle, 96 % on the corpus callosum say cerebral white matter).
ASEG_IN_VENTRICLE = {31: 4, 63: 43}               # choroid plexus, left/right
ASEG_IN_WHITE_MATTER = (77, 251, 252, 253, 254, 255)  # WM hypointensities, corpus callosum


# ---------------------------------------------------------------- masks

def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap (fraction, 0..1) of two masks on one grid; 1 when both are empty."""
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / total) if total else 1.0


def surface_distance_95(a: np.ndarray, b: np.ndarray, voxsize: Sequence[float]) -> float:
    """95th-percentile symmetric surface distance (mm) between two binary
    masks on one grid of voxel size ``voxsize`` (mm per axis): the larger of
    the two directed 95th percentiles of the distances from one mask's
    boundary voxels to the other's (MONAI's convention). Thick-slice scans
    need it beside Dice: a 1-voxel shift across 4 mm slices costs little
    Dice but shows here. inf when exactly one mask is empty, 0 when both are."""
    from scipy import ndimage as ndi
    a, b = a.astype(bool), b.astype(bool)
    if not a.any() and not b.any():
        return 0.0
    if not a.any() or not b.any():
        return float("inf")
    edge = [m & ~ndi.binary_erosion(m, border_value=0) for m in (a, b)]
    sampling = [float(v) for v in voxsize]
    to_a, to_b = (ndi.distance_transform_edt(~e, sampling=sampling) for e in edge)
    return float(max(np.percentile(to_b[edge[0]], 95), np.percentile(to_a[edge[1]], 95)))


def neck_crop(mask: np.ndarray, affine: np.ndarray, min_area_mm2: float = 1000.0) -> np.ndarray:
    """Boolean region keeping voxels above the lowest axial (world z, mm)
    level where the reference mask's cross-section reaches ``min_area_mm2``:
    below that the mask is spinal cord, which brain-extraction tools disagree on."""
    ijk = np.indices(mask.shape).reshape(3, -1)
    z = (affine[2, :3] @ ijk + affine[2, 3]).reshape(mask.shape)
    zs = np.round(z[mask > 0]).astype(int)
    levels, counts = np.unique(zs, return_counts=True)
    area = counts * float(np.prod(np.linalg.norm(affine[:3, :3], axis=0)))
    # area per ~1 mm level in mm^2 (voxel volume / 1 mm)
    ok = levels[area >= min_area_mm2]
    return z >= (ok.min() if len(ok) else -np.inf)


def mask_scores(mask: np.ndarray, ref: np.ndarray, region: np.ndarray,
                voxsize: Sequence[float]) -> dict[str, float | int]:
    """A brain mask against its reference inside the scoring ``region``:
    ``dice`` (fraction), ``sd95_mm`` (:func:`surface_distance_95`, mm) and
    the two masks' sizes (voxels)."""
    mask, ref = mask.astype(bool) & region, ref.astype(bool) & region
    return {"dice": dice(mask, ref), "sd95_mm": surface_distance_95(mask, ref, voxsize),
            "mask_voxels": int(mask.sum()), "reference_voxels": int(ref.sum())}


# ---------------------------------------------------------------- label maps

def seg_dice(pred: np.ndarray, ref: np.ndarray, labels: Sequence[int]) -> dict[int, float]:
    """Dice (fraction) per label value of ``labels`` present in the reference."""
    return {int(k): dice(pred == k, ref == k) for k in labels if (ref == k).any()}


def aseg_scores(pred: np.ndarray, ref: np.ndarray,
                labels: Sequence[int] | None = None) -> tuple[dict[int, float], float, float]:
    """Against a FreeSurfer aseg: Dice per label present (default: the
    SynthSeg 2.0 structures), their mean, and the mean over :data:`LARGE`."""
    if labels is None:
        from .nets.freesurfer import SYNTHSEG_LABELS   # the one list of SynthSeg 2.0 values
        labels = SYNTHSEG_LABELS[1:]
    d = seg_dice(pred, ref, labels)
    return d, float(np.mean(list(d.values()))), float(np.mean([d[k] for k in LARGE if k in d]))


def aseg_in_protocol(ref: np.ndarray) -> np.ndarray:
    """A FreeSurfer aseg relabelled into the SynthSeg training protocol:
    choroid plexus into its lateral ventricle, corpus callosum and WM
    hypointensities into the cerebral white matter of their hemisphere
    (the side of the plane halfway between the left and right white-matter
    centroids, perpendicular to the line joining them; voxel units). Every
    other label is unchanged."""
    out = np.asarray(ref).copy()
    for k, v in ASEG_IN_VENTRICLE.items():
        out[out == k] = v
    moved = np.isin(out, ASEG_IN_WHITE_MATTER)
    if moved.any() and (out == 2).any() and (out == 41).any():   # no hemispheres: left as they are
        left, right = (np.argwhere(out == k).mean(0) for k in (2, 41))
        normal = right - left
        side = (np.argwhere(moved) - (left + right) / 2) @ normal
        out[moved] = np.where(side < 0, 2, 41)
    return out


def tissue_classes(labels: np.ndarray) -> np.ndarray:
    """SynthSeg/aseg labels -> BrainWeb classes (0 other, 1 CSF, 2 GM, 3 WM)."""
    out = np.zeros(labels.shape, np.uint8)
    for cls, labs in TISSUE.items():
        out[np.isin(labels, labs)] = BRAINWEB_CLASS[cls]
    return out


def tissue_dice(pred: np.ndarray, ref_classes: np.ndarray) -> dict[str, float]:
    """Dice (fraction) per tissue class (CSF, GM, WM) of SynthSeg labels vs BrainWeb classes."""
    pred_classes = tissue_classes(pred)
    return {cls: dice(pred_classes == k, ref_classes == k) for cls, k in BRAINWEB_CLASS.items()}


def tissue_consistency(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over CSF, GM and WM of the Dice between two SynthSeg label maps
    of one anatomy on one grid, merged into tissue classes (1 when they
    agree, lower the more they differ; a class neither map has counts 1)."""
    ca, cb = tissue_classes(a), tissue_classes(b)
    return float(np.mean([dice(ca == k, cb == k) for k in BRAINWEB_CLASS.values()]))


# ---------------------------------------------------------------- transforms

def displacement_error(t, ref, fixed_grid, mask: np.ndarray) -> float:
    """Mean distance (mm) between where ``t`` and ``ref`` (pull-backs:
    Affine, or Warp on ``fixed_grid``) send the fixed voxels inside ``mask``."""
    from .morph.transforms import Affine, as_geometry
    g = as_geometry(fixed_grid)

    def apply(m, pts):   # pts @ m[:3, :3].T + m[:3, 3], without BLAS (slow when cores are busy)
        return sum(pts[:, k:k + 1] * m[:3, k] for k in range(3)) + m[:3, 3]

    world = apply(g.affine, np.argwhere(mask).astype(np.float64))

    def moved(x):
        if isinstance(x, Affine):
            return apply(x.matrix, world)
        if not x.grid.same_grid(g):
            raise ValueError("displacement_error: the warp is not on the fixed grid")
        return world + x.disp[mask]
    return float(np.mean(np.linalg.norm(moved(t) - moved(ref), axis=1)))


# ---------------------------------------------------------------- grouping

def case_score(metrics: Mapping[str, float], name: str) -> float | None:
    """One Dice per case: the case's value, its ``_mean`` (label maps), or
    the mean of its tissue classes (BrainWeb)."""
    if name in metrics:
        return metrics[name]
    if f"{name}_mean" in metrics:
        return metrics[f"{name}_mean"]
    vals = [metrics[f"{name}_{c}"] for c in ("CSF", "GM", "WM") if f"{name}_{c}" in metrics]
    return float(np.mean(vals)) if vals else None


def with_group_means(metrics: Mapping[str, float], groups: Mapping[str, str]) -> dict[str, float]:
    """``metrics`` plus ``mean_<group>``: the mean case score per group
    (``groups``: case name -> group) over the cases that were scored."""
    per: dict[str, list[float]] = {}
    for name, g in groups.items():
        s = case_score(metrics, name)
        if s is not None:
            per.setdefault(g, []).append(s)
    out = dict(metrics)
    out.update({f"mean_{g}": float(np.mean(v)) for g, v in sorted(per.items())})
    return out
