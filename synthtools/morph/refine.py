"""Test-time refinement of a linear registration.

The barycentre fit (:class:`~synthtools.nets.registration.BarycenterAffine`)
is robust to any starting pose but only as precise as the feature maps'
centroids. Refinement then optimises the transform directly, coarse to fine
(4 mm, the network's 2 mm grid, optionally the scans' own grids), with one
of two criteria:

* the network's feature maps: mean squared difference between the fixed
  maps and the moving maps pulled back through the transform, at the fixed
  brain's voxels (where the maps have mass, dilated);
* the images: local NCC^2 (squared correlation in small cubes around random
  points of that same fixed brain). It is insensitive to contrast (any
  locally linear relation, either sign) and, unlike the mutual information
  of the whole masked brain used before, it has no pull towards stretching
  the moving brain over the mask (affine benchmark: SPM PD -> T1 1.04 ->
  0.36 mm, Lesjak FLAIR -> T1W 0.87 -> 0.28 mm).

Parameters: a rotation vector (radians, through the matrix exponential) and
a translation (mm) for rigid; all 12 entries for affine. Only a small
correction is sought, so it runs after the barycentre passes.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..warp import sample

__all__ = ["refine_linear", "refine_linear_group", "patch_ncc2", "patch_centres", "brain_mask", "dilate_cube"]

TRANSLATION_SCALE = 50.0   # mm per parameter unit: rotations (rad) and shifts step alike
# Local-NCC^2 criterion: cubes of WINDOW voxels around PATCHES random fixed-brain points per level.
# Chosen on the linear benchmark (benchmarks/reg.py, affine mode): 2000 cubes of 5 voxels,
# mean error 0.156 mm; 4000 cubes 0.175, 7-voxel cubes 0.205 (+2.5 s), seeds 0/1/2: 0.156-0.187.
PATCHES = 2000
WINDOW = 5


def _correction(theta: torch.Tensor, rigid: bool) -> torch.Tensor:
    """4x4 map (fixed frame -> fixed frame) from the parameters (identity at 0)."""
    out = torch.eye(4, dtype=theta.dtype)
    if rigid:
        w = theta[:3]
        zero = torch.zeros((), dtype=theta.dtype)
        skew = torch.stack([torch.stack([zero, -w[2], w[1]]), torch.stack([w[2], zero, -w[0]]),
                            torch.stack([-w[1], w[0], zero])])
        lin = torch.linalg.matrix_exp(skew)
        shift = theta[3:6] * TRANSLATION_SCALE
    else:
        lin = torch.eye(3, dtype=theta.dtype) + theta[:9].reshape(3, 3)
        shift = theta[9:12] * TRANSLATION_SCALE
    top = torch.cat([lin, shift[:, None]], dim=1)
    return torch.cat([top, out[3:]], dim=0)


def _pool(feat: torch.Tensor, vox2mm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2x average pooling of (K, *S) maps and the pooled grid's vox2mm."""
    pooled = F.avg_pool3d(feat[None], 2, ceil_mode=True)[0]
    step = torch.tensor([[2.0, 0, 0, 0.5], [0, 2.0, 0, 0.5], [0, 0, 2.0, 0.5], [0, 0, 0, 1]], dtype=vox2mm.dtype)
    return pooled, vox2mm @ step


def _sample_points(feat: torch.Tensor, vox: torch.Tensor) -> torch.Tensor:
    """Trilinear values (K, N) of (K, *S) maps at voxel coordinates (N, 3)."""
    return sample(feat[None], vox.view(1, 1, 1, -1, 3))[0, :, 0, 0]


def brain_mask(feat: torch.Tensor, threshold: float, dilate: int) -> torch.Tensor:
    """(*S) bool: where the (K, *S) feature maps' total mass exceeds
    ``threshold``, dilated by ``dilate`` voxels (the fixed brain)."""
    return dilate_cube(feat.sum(0) > threshold, dilate)


def dilate_cube(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of a bool (*S) mask by a (2 radius + 1)-voxel cube:
    per axis, OR of shifted slices (as ``max_pool3d`` with stride 1, ~100x
    faster on CPU)."""
    for ax in range(mask.ndim):
        n = mask.shape[ax]
        out = mask.clone()
        for s in range(1, min(radius, n - 1) + 1):
            out.narrow(ax, s, n - s).logical_or_(mask.narrow(ax, 0, n - s))
            out.narrow(ax, 0, n - s).logical_or_(mask.narrow(ax, s, n - s))
        mask = out
    return mask


def _brain_voxels(feat: torch.Tensor) -> torch.Tensor:
    """Voxel indices (N, 3), float, where the fixed (K, *S) maps have mass,
    dilated by 2 voxels: the fixed brain, where every criterion is sampled."""
    return brain_mask(feat, 0.05, 2).nonzero().to(torch.float32)


def _fixed_points(feat: torch.Tensor, max_points: int = 40000) -> torch.Tensor:
    """At most ``max_points`` of the fixed brain's voxels (N, 3), evenly
    spread over the list (a 2 mm brain has ~250k: the fit needs far fewer,
    each step costs N)."""
    vox = _brain_voxels(feat)
    if len(vox) > max_points:
        vox = vox[torch.linspace(0, len(vox) - 1, max_points).round().long()]
    return vox


def _cube_points(centres: torch.Tensor, window: int) -> torch.Tensor:
    """Voxel coordinates (P * window^3, 3) of the cubes of ``window`` voxels
    (odd) centred on ``centres`` (P, 3), one cube after the other."""
    r = torch.arange(window, dtype=torch.float32) - window // 2
    offsets = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    return (centres[:, None] + offsets).reshape(-1, 3)


def patch_centres(feat: torch.Tensor, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` random points (voxels, (count, 3)) of the fixed brain of the
    (K, *S) feature maps, each jittered uniformly within its voxel so that
    no grid is favoured."""
    vox = _brain_voxels(feat)
    pick = torch.randperm(len(vox), generator=gen)[:count]
    return vox[pick] + torch.rand(len(pick), 3, generator=gen) - 0.5


def patch_ncc2(target: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
    """Mean over patches of the squared correlation of (P, V) samples: the
    local NCC^2 at P points, each over V voxels around it (1: locally
    linearly related, either sign; 0: unrelated or flat)."""
    a = target - target.mean(1, keepdim=True)
    b = moved - moved.mean(1, keepdim=True)
    cov = (a * b).mean(1)
    return (cov * cov / ((a * a).mean(1) * (b * b).mean(1) + 1e-9)).mean()


def refine_linear(feat_fixed: torch.Tensor, feat_moving: torch.Tensor | None, fixed_vox2mm: torch.Tensor,
                  moving_vox2mm: torch.Tensor, rigid: bool, iterations: tuple[int, ...] = (40, 20),
                  lr: float = 0.01, images: tuple[torch.Tensor, torch.Tensor] | None = None,
                  native: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                  native_iterations: int = 30, seed: int = 0, points: int = 40000,
                  patches: int = PATCHES, window: int = WINDOW) -> torch.Tensor:
    """The 4x4 correction E (fixed mm -> fixed mm) that best aligns the maps:
    the refined pull-back is ``M @ E`` when ``moving_vox2mm`` already holds
    the current estimate M (the moving image re-posed by it).

    ``feat_*`` (K, *S) float maps on their grids; ``*_vox2mm`` (4, 4) map
    voxel indices to one shared frame (mm). ``iterations``: Adam steps per
    level, coarsest first (each level halves the resolution); ``points``: at
    most this many fixed brain voxels per level. With ``images`` (fixed,
    moving: (*S) intensities on the same grids) the criterion is their local
    NCC^2 instead (:func:`patch_ncc2`: ``patches`` cubes of ``window`` voxels
    of each level's grid, centred at random points of the fixed brain, where
    the feature maps have mass: not neck or skull), and ``feat_moving`` is
    not used (may be None).

    ``native`` (fixed image, its vox2mm, moving image, its vox2mm, on their
    own, typically finer, grids) adds a last local-NCC^2 level of
    ``native_iterations`` steps on the scans as acquired, its cubes spanning
    ``window`` voxels of the fixed scan, so the answer is not limited by the
    conformed grid's spacing. ``seed`` draws the cubes' centres."""
    if images is not None:
        return refine_linear_group(feat_fixed, fixed_vox2mm, images[0], [(images[1], moving_vox2mm)], rigid,
                                   iterations, lr, None if native is None else native[:2],
                                   None if native is None else [native[2:]], native_iterations, seed,
                                   patches, window)[0]
    if feat_moving is None:
        raise ValueError("refine_linear: the feature criterion needs feat_moving")
    af, am = fixed_vox2mm.to(torch.float32), moving_vox2mm.to(torch.float32)
    ff = feat_fixed.float()
    pyramid = [(ff, feat_moving.float(), af, am)]
    for _ in range(len(iterations) - 1):
        f, m, a, b = pyramid[-1]
        pf, pa = _pool(f, a)
        pm, pb = _pool(m, b)
        pyramid.append((pf, pm, pa, pb))
    theta = torch.zeros(6 if rigid else 12, dtype=torch.float32, requires_grad=True)
    for (f, m, a, b), steps in zip(reversed(pyramid), iterations):
        if steps <= 0:
            continue
        vox = _fixed_points(f, max_points=points)
        if len(vox) == 0:
            continue
        mm = vox @ a[:3, :3].T + a[:3, 3]
        _optimize(theta, rigid, mm, _sample_points(f, vox), m, b, steps, lr, None)
        lr = lr / 3   # finer level: smaller steps
    with torch.no_grad():
        return _correction(theta.detach(), rigid).to(torch.float64)


def refine_linear_group(feat_fixed: torch.Tensor, fixed_vox2mm: torch.Tensor, fixed_image: torch.Tensor,
                        movings: Sequence[tuple[torch.Tensor, torch.Tensor]], rigid: bool,
                        iterations: tuple[int, ...] = (40, 20), lr: float = 0.01,
                        native_fixed: tuple[torch.Tensor, torch.Tensor] | None = None,
                        native_movings: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
                        native_iterations: int = 30, seed: int = 0, patches: int = PATCHES,
                        window: int = WINDOW) -> list[torch.Tensor]:
    """Local-NCC^2 refinement (:func:`refine_linear` with ``images``) of one
    fixed image against several moving ones: one 4x4 correction per moving
    image, each exactly what :func:`refine_linear` gives for that pair (the
    same cubes, drawn from the fixed brain with ``seed``). The fixed side's
    work (its pyramid, brain voxels, cubes and their values) is done once for
    all the pairs; each pair is then optimised on its own (optimising them
    together, one backward pass per step for all, was 25% slower on CPU:
    the pairs' working sets no longer stay in cache).

    ``movings``: (image (*S), vox2mm) per moving image, on the fixed image's
    frame; ``native_fixed`` / ``native_movings``: the scans as acquired with
    their vox2mm, for the last level (both or neither)."""
    af = fixed_vox2mm.to(torch.float32)
    pyramid = [(feat_fixed.float(), fixed_image.float()[None], af)]
    for _ in range(len(iterations) - 1):
        sel, f, a = pyramid[-1]
        psel, pa = _pool(sel, a)
        pyramid.append((psel, _pool(f, a)[0], pa))
    gen = torch.Generator().manual_seed(seed)
    patch = window ** 3
    # The fixed side of every level, coarsest first: (level, cube points in mm, their fixed values, steps).
    levels = []
    for level, ((sel, f, a), steps) in enumerate(zip(reversed(pyramid), iterations)):
        if steps <= 0:
            continue
        vox = _cube_points(patch_centres(sel, patches, gen), window)
        if len(vox):
            levels.append((len(pyramid) - 1 - level, vox @ a[:3, :3].T + a[:3, 3], _sample_points(f, vox), steps))
    native = None
    if native_fixed is not None and native_movings is not None and native_iterations > 0:
        native = _native_points(feat_fixed.float(), af, native_fixed, gen, patches, window)
    out = []
    for k, (moving, b) in enumerate(movings):
        moving_pyr = [(moving.float()[None], b.to(torch.float32))]
        for _ in range(len(iterations) - 1):
            moving_pyr.append(_pool(*moving_pyr[-1]))
        theta = torch.zeros(6 if rigid else 12, dtype=torch.float32, requires_grad=True)
        step = lr
        for level, mm, target, steps in levels:
            _optimize(theta, rigid, mm, target, *moving_pyr[level], steps, step, patch)
            step = step / 3   # finer level: smaller steps
        if native is not None:
            m, mb = native_movings[k]
            _optimize(theta, rigid, *native, m.float()[None], mb.to(torch.float32), native_iterations, step, patch)
        with torch.no_grad():
            out.append(_correction(theta.detach(), rigid).to(torch.float64))
    return out


def _native_points(feat_fixed: torch.Tensor, af: torch.Tensor, native_fixed, gen: torch.Generator, patches: int,
                   window: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The fixed side of :func:`refine_linear_group`'s last level, on the
    native grid: cube points (mm) centred at random points of the fixed
    brain, spanning ``window`` voxels of the fixed scan, and the scan's
    values there; None if the brain is empty."""
    fixed, fixed_v2m = native_fixed
    fixed_v2m = fixed_v2m.to(torch.float32)
    to_fixed = torch.linalg.inv(fixed_v2m)
    centres = patch_centres(feat_fixed, patches, gen) @ af[:3, :3].T + af[:3, 3]     # mm
    centres = centres @ to_fixed[:3, :3].T + to_fixed[:3, 3]                         # fixed scan voxels
    vox = _cube_points(centres, window)
    if len(vox) == 0:
        return None
    return vox @ fixed_v2m[:3, :3].T + fixed_v2m[:3, 3], _sample_points(fixed.float()[None], vox)


class _Adam:
    """Adam (torch's defaults: betas 0.9 / 0.999, eps 1e-8) on one tensor.
    ``torch.optim`` is not used because importing it pulls in
    ``torch._dynamo``: 1.7 s of every ``synthmorph`` call, for 12 numbers."""

    def __init__(self, param: torch.Tensor, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.p, self.lr, self.betas, self.eps, self.t = param, lr, betas, eps, 0
        self.m, self.v = torch.zeros_like(param), torch.zeros_like(param)

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = self.betas
        g = self.p.grad
        self.t += 1
        self.m.mul_(b1).add_(g, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (self.v / (1 - b2 ** self.t)).sqrt_().add_(self.eps)
        self.p.addcdiv_(self.m, denom, value=-self.lr / (1 - b1 ** self.t))


def _optimize(theta: torch.Tensor, rigid: bool, points_mm: torch.Tensor, target: torch.Tensor,
              moving: torch.Tensor, moving_v2m: torch.Tensor, steps: int, lr: float, patch: int | None) -> None:
    """Adam on ``theta``: the (C, *S) ``moving`` maps sampled at the fixed
    points (N, 3; mm) moved by the correction, against their fixed values
    ``target`` (C, N): mean squared difference, or with ``patch`` (C = 1,
    the points in consecutive runs of ``patch`` per cube) minus the local
    NCC^2."""
    to_moving = torch.linalg.inv(moving_v2m)
    adam = _Adam(theta, lr)
    for _ in range(steps):
        e = _correction(theta, rigid)
        lin = to_moving[:3, :3] @ e[:3, :3]
        off = to_moving[:3, :3] @ e[:3, 3] + to_moving[:3, 3]
        moved = _sample_points(moving, points_mm @ lin.T + off)
        if patch is None:
            loss = ((moved - target) ** 2).mean()
        else:
            loss = -patch_ncc2(target.view(-1, patch), moved.view(-1, patch))
        theta.grad = None
        loss.backward()
        adam.step()
