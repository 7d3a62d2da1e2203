"""Intensity refinement of segmentation posteriors (Bayesian, SAMSEG-like).

Why: the network works on a 2 mm grid and, trained on heavily degraded
synthetic images, draws smooth boundaries that follow a mean anatomy more
than the edges of the image (on a clean 1 mm T1 its cortex is a smooth band).
The image itself says where the edges are. So we treat the network's
posteriors as a spatial prior and fit, by expectation-maximisation on this
one image, an intensity model per structure: a Gaussian for each
foreground structure and a smoothed histogram for the background, which
mixes air, skull, scalp and whatever else a scan holds. The posterior is
prior x likelihood, normalised. The model is fitted to the input itself, so
the step works for any contrast: it never assumes which tissue is bright.

Structures that look alike (left and right twins; thalamus and white
matter on some contrasts) get near-equal likelihoods, so the prior decides
between them, as it should; where the image separates two structures (grey
and white matter, CSF), the likelihood moves the boundary to the edge.
"""
from __future__ import annotations

import numpy as np
import torch

PRIOR_FLOOR = 1e-6   # a structure the network rules out can still win, if the image insists strongly
VAR_PRIOR = 1e-4     # (fraction of the intensity range)^2 added to every variance: no Gaussian is
                     # narrower than 1% of the range, and narrow ones widen (partial volume)
HIST_BINS = 64
FIT_VOXELS = 1_000_000   # voxels the intensity model is fitted on (a regular subsample beyond)
CHUNK_VOXELS = 262_144   # voxels per step of the final pass: bounds its temporaries to ~35 MB x C/33


def _normalise(intensity: torch.Tensor) -> torch.Tensor:
    """Map the 0.5th..99.5th percentiles (of a subsample) to [0, 1], clipped."""
    step = max(1, intensity.numel() // 1_000_000)
    lo, hi = np.percentile(intensity[::step].numpy(), [0.5, 99.5])
    return ((intensity - float(lo)) / max(float(hi - lo), 1e-6)).clamp_(0, 1)


def _log_posterior(x: torch.Tensor, log_prior: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                   background: int, bg_table: torch.Tensor) -> torch.Tensor:
    """Unnormalised log posterior (N, C): log prior + Gaussian log likelihood,
    the background channel's likelihood read from its density table."""
    logl = (x[:, None] - mean).square_()
    logl.mul_(-0.5 / var).sub_(0.5 * torch.log(2 * torch.pi * var))
    logl[:, background] = bg_table[(x * HIST_BINS).long().clamp_(0, HIST_BINS - 1)]
    return logl.add_(log_prior)


def _normalised_exp_(logp: torch.Tensor) -> torch.Tensor:
    logp -= logp.max(1, keepdim=True).values
    logp.exp_()
    return logp.div_(logp.sum(1, keepdim=True))


def _background_table(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """log density (per unit intensity) of the background on ``HIST_BINS``
    bins of [0, 1]: a weighted histogram smoothed by a Gaussian of one bin."""
    idx = (x * HIST_BINS).long().clamp_(0, HIST_BINS - 1)
    hist = torch.bincount(idx, weights=weights.double(), minlength=HIST_BINS).float()
    taps = torch.arange(-4, 5, dtype=torch.float32)
    kernel = torch.exp(-0.5 * taps ** 2)   # SD one bin: histogram noise off, shape kept
    hist = torch.nn.functional.conv1d(hist[None, None], (kernel / kernel.sum())[None, None], padding=4)[0, 0]
    return (hist / (hist.sum() / HIST_BINS).clamp_min(1e-12) + 1e-6).log()


def _tied(sums: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
    """Per-channel sums -> the sum over each channel's group, per channel."""
    if groups is None:
        return sums
    return torch.zeros_like(sums).index_add_(0, groups, sums)[groups]


def refine_posteriors(prior: torch.Tensor, intensity: torch.Tensor, background: int = 0, iters: int = 5,
                      inplace: bool = False, groups=None) -> torch.Tensor:
    """Posteriors (N, C) float32 of N voxels given the network's ``prior``
    (N, C), summing to 1 per voxel, and the voxels' ``intensity`` (N,) in any
    unit. ``background``: the channel modelled by a histogram instead of a
    Gaussian. ``iters``: EM iterations (the fit settles in 3-5).
    ``inplace``: write the result into ``prior`` (float32), which saves one
    (N, C) array (0.8 GB for a whole 1 mm head). ``groups`` (C,): channels
    with the same group id share one Gaussian (left/right twins): half the
    parameters, and a fit that cannot drift apart between hemispheres.

    The intensity model is fitted on at most ``FIT_VOXELS`` voxels (a regular
    subsample: ~20 parameters need no more); the posteriors of all voxels are
    then computed ``CHUNK_VOXELS`` at a time, so memory stays bounded."""
    if prior.ndim != 2 or intensity.shape != prior.shape[:1]:
        raise ValueError(f"prior (N, C) and intensity (N,) expected, got {tuple(prior.shape)} "
                         f"and {tuple(intensity.shape)}")
    if inplace and prior.dtype != torch.float32:
        raise ValueError("inplace refinement needs a float32 prior")
    x = _normalise(intensity.float())
    n = x.numel()
    step = -(-n // FIT_VOXELS)
    xs = x[::step].contiguous()
    log_prior = prior[::step].float().clamp_min(PRIOR_FLOOR).log_()
    post = torch.softmax(log_prior, dim=1)
    groups = None if groups is None else torch.as_tensor(groups, dtype=torch.long)
    for _ in range(iters):
        # M step: each structure's (group's) intensity mean and variance under the current posteriors.
        w = _tied(post.sum(0), groups).clamp_min(1e-3)
        mean = _tied(xs @ post, groups) / w
        # Two passes (not E[x^2] - mean^2): float32 sums over millions of voxels cancel badly.
        var = _tied((xs[:, None] - mean).square_().mul_(post).sum(0), groups) / w + VAR_PRIOR
        table = _background_table(xs, post[:, background])
        # E step (log domain: no underflow).
        post = _normalised_exp_(_log_posterior(xs, log_prior, mean, var, background, table))
    del log_prior, post
    out = prior if inplace else torch.empty(prior.shape, dtype=torch.float32)
    for a in range(0, n, CHUNK_VOXELS):
        lp = prior[a:a + CHUNK_VOXELS].float().clamp_min(PRIOR_FLOOR).log_()
        out[a:a + CHUNK_VOXELS] = _normalised_exp_(_log_posterior(x[a:a + CHUNK_VOXELS], lp, mean, var,
                                                                  background, table))
    return out
