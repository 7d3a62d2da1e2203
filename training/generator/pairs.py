"""Image pairs for registration training: two images of one label map (same
anatomy; independent contrast and corruptions; independent or shared pose;
optional small extra warp for longitudinal change) or of two label maps,
with the ground-truth correspondence where it is known."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .spatial import Transform, apply_displacement, displacement, mm_to_voxel, nearest
from .synth import Sample, Synthesizer


@dataclass
class Pair:
    fixed: Sample
    moving: Sample
    # Moving-grid voxel coordinates (N, *fixed_shape) of every fixed voxel, or
    # None when unknown (different label maps, or a non-invertible warp).
    fixed_to_moving: torch.Tensor | None


def _input_to_output(t: Transform, coords: torch.Tensor) -> torch.Tensor | None:
    """Invert Phi: input-grid voxel coordinates (N, *S) -> output-grid voxel
    coordinates of ``t``; exact for affine and SVF transforms."""
    n = coords.shape[0]
    pts = coords.movedim(0, -1)
    if t.field is not None:
        if not t.svf:
            return None
        inv = displacement(t.field.to(coords.device), t.in_shape, t.in_voxsize, True, t.steps, inverse=True)
        pts = apply_displacement(pts[None], inv, t.in_shape)[0]
    c_in = torch.tensor([(s - 1) / 2 for s in t.in_shape], device=pts.device)
    mm = (pts - c_in) * torch.tensor(t.in_voxsize, device=pts.device, dtype=pts.dtype)
    minv = torch.linalg.inv(t.matrix).to(device=pts.device, dtype=torch.float32)
    out_mm = mm @ minv[:n, :n].T + minv[:n, n]
    return mm_to_voxel(out_mm, t.out_shape, t.out_voxsize).movedim(-1, 0)


def correspondence(fixed: Transform, moving: Transform, device="cpu") -> torch.Tensor | None:
    """For two samples of ONE label map: where each fixed voxel lies in the
    moving grid, Phi_m^-1(Phi_f(x)), as (N, *fixed_shape) voxel coordinates."""
    return _input_to_output(moving, fixed.coords(device))


def same_anatomy_pair(synth_fixed: Synthesizer, synth_moving: Synthesizer, index_map: torch.Tensor,
                      voxsize: Sequence[float], gen: torch.Generator, shared_pose: bool = False,
                      out_shape=None, out_voxsize=None) -> Pair:
    """Two images of one label map. With ``shared_pose`` both use the same
    spatial transform (the ground truth is the identity); otherwise each
    draws its own (use a small warp range in ``synth_moving`` for
    longitudinal, atrophy-like change)."""
    fixed = synth_fixed(index_map, voxsize, gen, out_shape, out_voxsize)
    if shared_pose:
        labels = fixed.labels if not synth_fixed.config.crop_labels else nearest(
            index_map, fixed.transform.coords(index_map.device))
        fov = synth_moving.config.fov(labels.shape, gen, labels.device)
        image = synth_moving.image(labels, fixed.transform.out_voxsize, gen, fov)
        moving = Sample(image, labels * fov if synth_moving.config.crop_labels else labels, fov, fixed.transform)
    else:
        moving = synth_moving(index_map, voxsize, gen, out_shape, out_voxsize)
    return Pair(fixed, moving, correspondence(fixed.transform, moving.transform, index_map.device))


def two_anatomy_pair(synth: Synthesizer, fixed_map: torch.Tensor, moving_map: torch.Tensor,
                     voxsize_fixed: Sequence[float], voxsize_moving: Sequence[float], gen: torch.Generator,
                     out_shape=None, out_voxsize=None) -> Pair:
    """Images of two different label maps (inter-subject); no ground truth."""
    fixed = synth(fixed_map, voxsize_fixed, gen, out_shape, out_voxsize)
    moving = synth(moving_map, voxsize_moving, gen, out_shape, out_voxsize)
    return Pair(fixed, moving, None)
