"""Voxel-to-world coordinates of a region, shared by the segmenter (the
refinement's bias field) and the atlas prior (atlas labels at native voxels)."""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["world_coords"]


def world_coords(region: np.ndarray, affine: np.ndarray) -> torch.Tensor:
    """(N, 3) float32 world coordinates (mm) of the True voxels of ``region``, in C order."""
    ijk = np.nonzero(region)
    lin = np.asarray(affine, np.float64)
    xyz = np.empty((len(ijk[0]), 3), dtype=np.float32)
    for r in range(3):   # one output column at a time: no (N, 3) float64 temporaries
        xyz[:, r] = lin[r, 0] * ijk[0] + lin[r, 1] * ijk[1] + lin[r, 2] * ijk[2] + lin[r, 3]
    return torch.from_numpy(xyz)
