"""Sanity checks of a registration result, cheap enough to run every time.

* :func:`similarity` -- normalised mutual information between the fixed image
  and the moving image resampled through a transform, on a coarse copy of
  the fixed grid (contrast-agnostic, as the images may differ in contrast).
  ``synthmorph register`` warns when the result is less similar than doing
  nothing (the identity transform, i.e. the scanner alignment).
* :func:`coverage` -- the fraction of the fixed grid whose pulled-back point
  falls inside the moving image: 0 means the output would be all fill.
"""
from __future__ import annotations

import math

import numpy as np

from ..io import Volume
from .transforms import Affine, Geometry, Transform, Warp, apply_transform, as_geometry

__all__ = ["similarity", "coverage", "coarse_grid", "nmi"]

# Voxels per axis of the grid the similarity is measured on: enough for a
# stable histogram (about 64^3 = 260k voxels), cheap next to a registration.
SIMILARITY_GRID = 64


def nmi(a: np.ndarray, b: np.ndarray, bins: int = 32) -> float:
    """Normalised mutual information (H(a) + H(b)) / H(a, b), in [1, 2]:
    1 for independent images, 2 for one image a function of the other.
    Intensities are binned between their 0.5th and 99.5th percentiles."""
    def binned(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64).ravel()
        lo, hi = np.percentile(x, [0.5, 99.5])
        if hi <= lo:
            return np.zeros(x.shape, dtype=np.int64)
        return np.clip(((x - lo) / (hi - lo) * bins).astype(np.int64), 0, bins - 1)

    joint = np.bincount(binned(a) * bins + binned(b), minlength=bins * bins).reshape(bins, bins)
    p = joint / joint.sum()

    def entropy(q: np.ndarray) -> float:
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    h_joint = entropy(p)
    return (entropy(p.sum(1)) + entropy(p.sum(0))) / h_joint if h_joint > 0 else 2.0


def coarse_grid(grid: Geometry, step: int) -> Geometry:
    """Every ``step``-th voxel of ``grid`` along each axis (same corner voxel)."""
    affine = grid.affine @ np.diag([step, step, step, 1.0])
    return Geometry(tuple(-(-n // step) for n in grid.shape), affine, grid.path)


def _on_grid(t: Transform, grid: Geometry, step: int) -> Transform:
    """``t`` restricted to the coarse grid (a Warp is subsampled)."""
    if isinstance(t, Warp):
        return Warp(t.disp[::step, ::step, ::step], coarse_grid(t.grid, step), t.moving)
    return t


def _step(grid: Geometry) -> int:
    return max(1, math.ceil(max(grid.shape) / SIMILARITY_GRID))


def similarity(t: Transform, moving: Volume, fixed: Volume) -> float:
    """NMI (:func:`nmi`) of ``fixed`` and ``moving`` resampled through ``t``
    (pull-back, fixed RAS -> moving RAS; a Warp on the fixed grid), on a grid
    of about 64 voxels per axis; first frames only."""
    g = as_geometry(fixed)
    step = _step(g)
    coarse = coarse_grid(g, step)
    mov = Volume(np.asarray(moving.data[..., 0] if moving.data.ndim == 4 else moving.data, np.float32),
                 moving.affine)
    moved = apply_transform(_on_grid(t, g, step), mov, coarse, order=1)
    fix = np.asarray(fixed.data[..., 0] if fixed.data.ndim == 4 else fixed.data)[::step, ::step, ::step]
    return nmi(moved, fix)


def identity_similarity(moving: Volume, fixed: Volume) -> float:
    """:func:`similarity` of the identity transform (the images as the
    scanner placed them)."""
    return similarity(Affine(np.eye(4)), moving, fixed)


def coverage(t: Transform, moving: Volume, grid: Geometry) -> float:
    """Fraction (0..1) of ``grid`` voxels (sampled every few voxels) whose
    pulled-back point lies inside the moving image's voxel grid."""
    g = as_geometry(grid)
    step = _step(g)
    coarse = coarse_grid(g, step)
    inside = np.ones(moving.shape, dtype=np.float32)
    moved = apply_transform(_on_grid(t, g, step), Volume(inside, moving.affine), coarse, order=0)
    return float(np.mean(moved > 0.5))
