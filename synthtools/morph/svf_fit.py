"""Deformable registration by fitting a stationary velocity field (SVF) to
two images at test time.

After the affine step, the moving image is resampled onto the fixed image's
conformed grid (2 mm). Adam then fits a velocity field ``v`` that maximises
the local squared normalised cross-correlation (NCC^2 in ``window``-voxel
cubes) of the fixed image and the moving image pulled back through
``exp(v)``, minus ``weight`` times the mean squared gradient of ``v``. The
squared NCC does not care about the sign of the local intensity relation,
so a T1 registers to a T2 or PD as well as to a T1 (measured, see
``benchmarks/results/reg_deform.md``). ``exp`` is scaling and squaring, so
the map is diffeomorphic whatever the weight; ``exp(-v)`` is its exact
inverse. The criterion is summed over the fixed brain only (a mask given by
the caller, from the registration network's feature maps), so neck, skull
and defacing do not pull the brain.

Why not the networks' outputs: matching the segmentation network's
posteriors (soft Dice) or its last feature maps made the true tissue overlap
of an inter-subject pair WORSE than the affine start (GM Dice 0.60 -> 0.57)
while the posteriors' own overlap rose (0.62 -> 0.84): the shipped
segmenter is not accurate enough to drive a deformable fit. NCC^2 took the
same pair to 0.78 (``runs/README.md``, "Deformable registration pilot").

Grids and units: images (*S) live on the "fine" grid (voxel indices ``x``).
The velocity lives on a coarser grid whose index ``c`` sits at fine
coordinate ``spacing * c`` and stores displacements in FINE voxels. Coarse
to fine: each level fits a velocity on its own spacing against the images
averaged over ``pool`` voxels, starting from the previous level's field.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..warp import identity_grid, integrate_svf, sample

__all__ = ["fit_svf", "svf_displacement", "local_ncc2", "LEVELS", "EmptyMaskError"]


class EmptyMaskError(ValueError):
    """The fixed image has no brain voxel for the fit to count."""

# (velocity spacing in fine voxels, image pooling in fine voxels, Adam steps), coarse first.
# Steps, step size (fit_svf's lr), NCC window and squarings were chosen together on the four
# benchmark pairs (runs/README.md, "Deformable fit speed", session 15): (50, 25) steps at lr 0.2,
# window 5, 5 squarings gave GM/WM Dice 0.7932 in 8.3 s a pair; (40, 18) at lr 0.25, window 3,
# 4 squarings 0.7912 in 6.2 s; these (30, 14) at lr 0.3 0.7886 in 4.3 s (with bf16 features).
LEVELS: tuple[tuple[int, int, int], ...] = ((4, 2, 30), (2, 1, 14))


def _coarse_shape(shape: Sequence[int], spacing: int) -> tuple[int, ...]:
    """Coarse grid covering fine indices 0 .. S - 1 (its last node at or beyond S - 1)."""
    return tuple(-(-(s - 1) // spacing) + 1 for s in shape)


def _pool(x: torch.Tensor, pool: int) -> torch.Tensor:
    """(C, *S) maps averaged over ``pool``-voxel cubes."""
    return x if pool == 1 else F.avg_pool3d(x[None], pool, ceil_mode=True)[0]


def _integrate(vel: torch.Tensor, spacing: int, steps: int) -> torch.Tensor:
    """exp(v) of a (3, *C) coarse velocity (fine voxels): its displacement,
    same grid and units (the integration runs in coarse voxels)."""
    return integrate_svf(vel[None] / spacing, steps)[0] * spacing


def _gradient_penalty(vel: torch.Tensor, spacing: int) -> torch.Tensor:
    """Mean squared forward difference of a (3, *C) velocity per fine voxel
    (dimensionless: displacement change per unit length)."""
    total = vel.new_zeros(())
    for ax in range(1, vel.ndim):
        total = total + (torch.diff(vel, dim=ax) / spacing).pow(2).mean()
    return total


def _resample_velocity(vel: torch.Tensor, old: int, new: int, shape: Sequence[int]) -> torch.Tensor:
    """A coarse velocity (fine voxels) moved to another spacing."""
    return sample(vel[None], identity_grid(_coarse_shape(shape, new)) * (new / old), padding="border")[0]


def _box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mean of (N, C, *S) maps over ``window``-voxel cubes centred on each
    voxel (odd ``window``), counting only voxels inside the grid at the
    edges. Separable, each axis a sum of ``window`` shifted slices: ~3x
    faster forward + backward than ``avg_pool3d`` on CPU (which made up
    ~40 % of a fit) and as exact, unlike differences of cumulative sums,
    whose rounding (~1e-7) swamps the variance of flat regions (BrainWeb's
    noise-free tissue) and blew up the NCC gradient there."""
    r = window // 2
    for ax in range(2, x.ndim):
        n = x.shape[ax]
        pad = [0, 0] * (x.ndim - 2)
        pad[2 * (x.ndim - 1 - ax)] = pad[2 * (x.ndim - 1 - ax) + 1] = r   # F.pad lists the last axis first
        xp = F.pad(x, pad)
        total = xp.narrow(ax, 0, n)
        for k in range(1, window):
            total = total + xp.narrow(ax, k, n)
        i = torch.arange(n)
        count = (torch.clamp(i + r, max=n - 1) - torch.clamp(i - r, min=0) + 1).to(x.dtype)
        shape = [1] * x.ndim
        shape[ax] = n
        x = total / count.view(shape)
    return x


def local_ncc2(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, window: int = 5,
               eps: float = 1e-9) -> torch.Tensor:
    """Mean over ``mask`` of the squared local correlation of two (1, 1, *S)
    images in ``window``-voxel cubes (1: locally linearly related, either
    sign; 0: unrelated or flat)."""
    m = _box_mean(torch.cat([a, b, a * a, b * b, a * b], dim=1), window)
    ma, mb, aa, bb, ab = m.unbind(1)
    cov = ab - ma * mb
    ncc2 = cov * cov / ((aa - ma * ma) * (bb - mb * mb) + eps)
    return (ncc2 * mask[:, 0]).sum() / mask.sum().clamp_min(1)


class _GlobalAdam:
    """Adam with ONE second-moment scalar for the whole field (the mean
    squared gradient), not one per node. Per-node Adam divides every node's
    gradient by its own size, so nodes with no signal (flat white matter,
    or an already aligned pair, where the gradient is rounding noise) take
    full-size random steps; with a global scale a node moves in proportion
    to its gradient. Gradients are scaled by the number of entries (a mean
    loss spreads over them), and ``eps`` is on that scale: a field whose
    RMS scaled gradient is far below ``eps`` (rounding noise at an optimum:
    ~1e-5; a real misalignment: 0.1-1) barely moves."""

    def __init__(self, param: torch.Tensor, lr: float, betas=(0.9, 0.999), eps: float = 1e-2):
        self.p, self.lr, self.betas, self.eps = param, lr, betas, eps
        self.m = torch.zeros_like(param)
        self.v = 0.0
        self.t = 0

    @torch.no_grad()
    def __call__(self) -> None:
        b1, b2 = self.betas
        g = self.p.grad * self.p.numel()
        self.t += 1
        self.m.mul_(b1).add_(g, alpha=1 - b1)
        self.v = b2 * self.v + (1 - b2) * float(g.pow(2).mean())
        scale = self.lr / (1 - b1 ** self.t) / ((self.v / (1 - b2 ** self.t)) ** 0.5 + self.eps)
        self.p.sub_(self.m, alpha=scale)


def _upsample(disp: torch.Tensor, spacing: int, pool: int, box: tuple[slice, ...],
              fine: torch.Tensor) -> torch.Tensor:
    """A (3, *C) coarse displacement at the fine coordinates ``fine`` ((*B, 3),
    the pooled voxels of ``box``). Unpooled, the coarse nodes fall on every
    ``spacing``-th fine voxel: linear interpolation between neighbouring nodes
    of the box's nodes only, axis by axis, gives the same values ~6x faster
    (forward + backward) than ``grid_sample`` and ~2x faster than
    ``F.interpolate`` of the whole grid."""
    if pool != 1:
        return sample(disp[None], (fine / spacing)[None], padding="border")[0]
    out = disp
    for ax, sl in enumerate(box, start=1):
        lo, hi = sl.start // spacing, -(-(sl.stop - 1) // spacing)      # nodes around the box
        out = _interleave(out.narrow(ax, lo, hi - lo + 1), ax, spacing)
        out = out.narrow(ax, sl.start - lo * spacing, sl.stop - sl.start)
    return out


def _interleave(x: torch.Tensor, ax: int, spacing: int) -> torch.Tensor:
    """Linear interpolation along axis ``ax`` onto ``spacing`` points per
    interval (node values kept): n nodes -> (n - 1) * spacing + 1 points."""
    n = x.shape[ax]
    if n == 1 or spacing == 1:
        return x
    a, b = x.narrow(ax, 0, n - 1), x.narrow(ax, 1, n - 1)
    steps = [a] + [torch.lerp(a, b, k / spacing) for k in range(1, spacing)]
    inner = torch.stack(steps, dim=ax + 1).flatten(ax, ax + 1)
    return torch.cat([inner, x.narrow(ax, n - 1, 1)], dim=ax)


def _box(mask: torch.Tensor) -> tuple[slice, ...]:
    """Bounding box of a non-empty (*S) mask."""
    nz = mask.nonzero()
    return tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(nz.min(0).values, nz.max(0).values))


def fit_svf(fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor, weight: float,
            levels: Sequence[tuple[int, int, int]] = LEVELS, lr: float = 0.3, steps: int = 4,
            window: int = 3) -> tuple[torch.Tensor, int]:
    """Velocity field aligning ``moving`` to ``fixed`` ((*S) intensities in
    [0, 1] on one grid) inside ``mask`` ((*S), > 0 where the fit counts).
    Returns the (3, *C) velocity in fine voxels and its spacing (fine voxels).

    ``weight`` (>= 0): smoothness weight (0: similarity alone; the map stays
    invertible). ``levels``: (velocity spacing, image pooling, Adam steps)
    per level, coarsest first. ``lr``: Adam step (fine voxels). ``steps``:
    squarings while fitting (4: v / 16 per step, enough for the velocities a
    fit reaches; the returned field is integrated with 7 by
    :func:`svf_displacement`; on the benchmark pairs 7 while fitting cost
    2.3 s a pair for +0.0002 GM/WM Dice, 5 instead of 4 0.45 s for +0.0003).
    ``window``: NCC cube edge (voxels of each level's grid; 3 instead of 5:
    -0.0006 Dice, -0.3 s, half the folding)."""
    shape = fixed.shape
    if not bool((mask > 0).any()):
        raise EmptyMaskError("no brain found in the fixed image (the deformable fit's mask is empty)")
    vel, spacing = None, None
    for space, pool, iters in levels:
        vel = (torch.zeros((3,) + _coarse_shape(shape, space)) if vel is None
               else _resample_velocity(vel, spacing, space, shape))
        spacing = space
        sel = _pool(mask[None].float(), pool)[0] > 0
        box = _box(sel)
        f = _pool(fixed[None].float(), pool)[(0,) + box][None, None]
        m = _pool(moving[None].float(), pool)[None]
        w = sel[box].float()[None, None]
        centre = (pool - 1) / 2                      # pooled voxel q sits at fine pool * q + centre
        start = torch.tensor([s.start for s in box], dtype=torch.float32)
        fine = (identity_grid([s.stop - s.start for s in box])[0] + start) * pool + centre
        vel = vel.clone().requires_grad_(True)
        step = _GlobalAdam(vel, lr)
        for _ in range(iters):
            u = _upsample(_integrate(vel, spacing, steps), spacing, pool, box, fine)
            moved = sample(m, ((fine + u.movedim(0, -1) - centre) / pool)[None])
            loss = -local_ncc2(f, moved, w, window) + weight * _gradient_penalty(vel, spacing)
            vel.grad = None
            loss.backward()
            step()
        vel = vel.detach()
    return vel, spacing


def svf_displacement(vel: torch.Tensor, spacing: int, shape: Sequence[int], steps: int = 7,
                     inverse: bool = False) -> torch.Tensor:
    """exp(v) (or exp(-v)) of a coarse velocity from :func:`fit_svf` as a
    (1, 3, *S) displacement in fine voxels on the fine grid."""
    with torch.no_grad():
        disp = _integrate(-vel if inverse else vel, spacing, steps)
        return sample(disp[None], identity_grid(shape) / spacing, padding="border")
