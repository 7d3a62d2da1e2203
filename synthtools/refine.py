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


def _normalise(intensity: torch.Tensor) -> torch.Tensor:
    """Map the 0.5th..99.5th percentiles (of a subsample) to [0, 1], clipped."""
    step = max(1, intensity.numel() // 1_000_000)
    lo, hi = np.percentile(intensity[::step].numpy(), [0.5, 99.5])
    return ((intensity - float(lo)) / max(float(hi - lo), 1e-6)).clamp_(0, 1)


def _histogram_density(x: torch.Tensor, weights: torch.Tensor, bins: int = HIST_BINS) -> torch.Tensor:
    """Density (per unit intensity) of ``x`` in [0, 1] weighted by ``weights``,
    smoothed over neighbouring bins; evaluated at every ``x``."""
    idx = (x * bins).long().clamp_(0, bins - 1)
    hist = torch.bincount(idx, weights=weights.double(), minlength=bins).float()
    taps = torch.arange(-4, 5, dtype=torch.float32)
    kernel = torch.exp(-0.5 * taps ** 2)   # Gaussian, SD one bin: histogram noise off, shape kept
    hist = torch.nn.functional.conv1d(hist[None, None], (kernel / kernel.sum())[None, None], padding=4)[0, 0]
    density = hist / (hist.sum() / bins).clamp_min(1e-12) + 1e-6
    return density[idx]


def refine_posteriors(prior: torch.Tensor, intensity: torch.Tensor, background: int = 0,
                      iters: int = 5) -> torch.Tensor:
    """Posteriors (N, C) float32 of N voxels given the network's ``prior``
    (N, C), summing to 1 per voxel, and the voxels' ``intensity`` (N,) in any
    unit. ``background``: the channel modelled by a histogram instead of a
    Gaussian. ``iters``: EM iterations (the fit settles in 3-5)."""
    if prior.ndim != 2 or intensity.shape != prior.shape[:1]:
        raise ValueError(f"prior (N, C) and intensity (N,) expected, got {tuple(prior.shape)} "
                         f"and {tuple(intensity.shape)}")
    x = _normalise(intensity.float())
    log_prior = prior.float().clamp_min(PRIOR_FLOOR).log_()
    post = torch.softmax(log_prior, dim=1)
    for _ in range(iters):
        # M step: each structure's intensity mean and variance under the current posteriors.
        w = post.sum(0).clamp_min(1e-3)
        mean = (x @ post) / w
        logl = (x[:, None] - mean).square_()
        # Two passes (not E[x^2] - mean^2): float32 sums over millions of voxels cancel badly.
        var = (logl * post).sum(0) / w + VAR_PRIOR
        # E step: log prior + log likelihood, normalised per voxel (log domain: no underflow).
        logl.mul_(-0.5 / var).sub_(0.5 * torch.log(2 * torch.pi * var))
        logl[:, background] = _histogram_density(x, post[:, background]).log()
        logl += log_prior
        logl -= logl.max(1, keepdim=True).values
        post = logl.exp_()
        post /= post.sum(1, keepdim=True)
    return post
