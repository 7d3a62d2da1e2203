"""Registration networks.

:class:`BarycenterAffine` -- rigid or affine registration from learned
feature maps (SynthMorph-affine / KeyMorph style). One U-Net (shared weights)
turns each image into K non-negative feature maps (ReLU; no softmax). Channel
k of an image has a barycentre c_k (its feature-weighted mean voxel position,
in mm of a given frame) and a mass m_k (its integral, mm^3). Fixed and moving
barycentres are matched channel by channel, weighted by w_k ~ m_k^fix m_k^mov,
and the transform follows in closed form, so the images may have different
grids and the output is exact and differentiable:

* affine: weighted least squares. Symmetric by construction: both point
  sets are fitted to their weighted midpoint set h_k = (c_k^fix + c_k^mov)/2,
  giving H_fix (h -> fixed) and H_mov (h -> moving), and the pull-back is
  ``T = H_mov @ inv(H_fix)``. Swapping the images gives exactly ``inv(T)``,
  and if c^mov = A c^fix exactly then h = (I + A)/2 c^fix and T = A exactly
  (a halfway-space fit, cheaper and better behaved than the matrix square
  root of A_fm @ inv(A_mf), which it equals for exact correspondences).
* rigid: weighted Kabsch (Procrustes with det +1): rotation and translation
  only; swapping the images gives the exact inverse by construction.

:class:`SVFNet` -- deformable registration: a U-Net on the concatenated
(moving, fixed) pair predicts a stationary velocity field (voxels), integrated
by scaling and squaring into a diffeomorphic displacement. The regularisation
weight lambda in [0, 1] is an input: a small MLP maps it to FiLM scales and
shifts of the bottleneck and decoder features, so one network serves every
smoothness level (``synthmorph register -r``).

Transforms are pull-backs: a 4x4 matrix maps FIXED points to MOVING points
(the frames given by the ``vox2mm`` matrices of each image), a displacement u
on the fixed grid moves the moving image by ``moved(x) = moving(x + u(x))``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .unet import UNet, _conv, levels, run_levels
from ..warp import centered_vox2mm, integrate_svf

__all__ = ["barycenters", "fit_affine", "fit_rigid", "fit_symmetric_affine", "BarycenterAffine", "SVFNet"]


# ------------------------------------------------------------- closed-form fits

def barycenters(weights: torch.Tensor, vox2mm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Barycentres (B, K, N) in mm and masses (B, K) in mm^3 of non-negative
    feature maps (B, K, *S); ``vox2mm`` (B or 1, N+1, N+1) maps voxel indices
    to the frame. Computed in float32 (or float64 if given)."""
    dtype = torch.float64 if weights.dtype == torch.float64 else torch.float32
    w = weights.to(dtype)
    b, k = w.shape[:2]
    shape = w.shape[2:]
    n = len(shape)
    aff = vox2mm.to(device=w.device, dtype=dtype).expand(b, n + 1, n + 1)
    # Mean voxel index per axis from the marginals: no (K, *S, N) tensor.
    mass = w.flatten(2).sum(-1)                                     # (B, K) in voxels
    idx = []
    for ax, s in enumerate(shape):
        dims = [2 + d for d in range(n) if d != ax]
        marginal = w.sum(dims) if dims else w                        # (B, K, s)
        idx.append((marginal * torch.arange(s, device=w.device, dtype=dtype)).sum(-1))
    vox = torch.stack(idx, -1) / mass.clamp_min(1e-12)[..., None]    # (B, K, N)
    mm = vox @ aff[:, :n, :n].transpose(1, 2) + aff[:, None, :n, n]
    volume = torch.linalg.det(aff[:, :n, :n]).abs()                  # mm^3 per voxel
    return mm, mass * volume[:, None]


def _weighted_mean(points: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (w[..., None] * points).sum(1) / w.sum(1, keepdim=True).clamp_min(1e-12)


def fit_affine(src: torch.Tensor, dst: torch.Tensor, w: torch.Tensor, ridge: float = 1e-7) -> torch.Tensor:
    """Weighted least-squares affine (B, N+1, N+1) mapping points ``src`` to
    ``dst`` (B, K, N) with weights ``w`` (B, K); exact when an affine maps
    them exactly (K >= N+1 points in general position). ``ridge`` (relative
    to the spread of ``src``) keeps degenerate point sets finite."""
    b, k, n = src.shape
    mu_s, mu_d = _weighted_mean(src, w), _weighted_mean(dst, w)
    ds, dd = src - mu_s[:, None], dst - mu_d[:, None]
    ww = w[..., None]
    css = (ww * ds).transpose(1, 2) @ ds                             # (B, N, N)
    cds = (ww * dd).transpose(1, 2) @ ds                             # (B, N, N)
    eye = torch.eye(n, dtype=src.dtype, device=src.device)
    scale = css.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None] / n
    css = css + (ridge * scale + 1e-12) * eye
    # lin = cds @ inv(css), via a solve: lin^T = css^-1 cds^T (css symmetric)
    lin = torch.linalg.solve(css, cds.transpose(1, 2)).transpose(1, 2)
    out = torch.zeros(b, n + 1, n + 1, dtype=src.dtype, device=src.device)
    out[:, :n, :n] = lin
    out[:, :n, n] = mu_d - (lin @ mu_s[..., None])[..., 0]
    out[:, n, n] = 1
    return out


def fit_rigid(src: torch.Tensor, dst: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted Kabsch: the rotation (det +1) and translation (B, N+1, N+1)
    that best map ``src`` to ``dst`` in the weighted least-squares sense."""
    b, k, n = src.shape
    mu_s, mu_d = _weighted_mean(src, w), _weighted_mean(dst, w)
    ds, dd = src - mu_s[:, None], dst - mu_d[:, None]
    h = (w[..., None] * ds).transpose(1, 2) @ dd                     # (B, N, N) = sum w ds dd^T
    u, _, vh = torch.linalg.svd(h)
    v = vh.transpose(1, 2)
    d = torch.sign(torch.linalg.det(v @ u.transpose(1, 2)))
    d = torch.where(d == 0, torch.ones_like(d), d)
    fix = torch.ones(b, n, dtype=src.dtype, device=src.device)
    fix[:, -1] = d
    rot = v @ torch.diag_embed(fix) @ u.transpose(1, 2)
    out = torch.zeros(b, n + 1, n + 1, dtype=src.dtype, device=src.device)
    out[:, :n, :n] = rot
    out[:, :n, n] = mu_d - (rot @ mu_s[..., None])[..., 0]
    out[:, n, n] = 1
    return out


def fit_symmetric_affine(fixed: torch.Tensor, moving: torch.Tensor, w: torch.Tensor,
                         ridge: float = 1e-6) -> torch.Tensor:
    """Halfway-space affine fit (see the module doc): the pull-back
    fixed -> moving, exactly the inverse of the fit with the roles swapped."""
    half = (fixed + moving) / 2
    to_fixed = fit_affine(half, fixed, w, ridge)
    to_moving = fit_affine(half, moving, w, ridge)
    return to_moving @ torch.linalg.inv(to_fixed)


def channel_weights(mass_fixed: torch.Tensor, mass_moving: torch.Tensor) -> torch.Tensor:
    """w_k = m_k^fix m_k^mov, normalised to sum 1 per batch element."""
    w = mass_fixed * mass_moving
    return w / w.sum(1, keepdim=True).clamp_min(1e-30)


# ------------------------------------------------------------------ networks

class BarycenterAffine(nn.Module):
    """Rigid/affine registration by feature barycentres (module doc).

    ``forward(fixed, moving, fixed_vox2mm, moving_vox2mm)`` -> (B, N+1, N+1)
    pull-back from the fixed frame to the moving frame; the images (B, C, *S)
    may differ in shape. Without ``vox2mm`` matrices a frame is the centred
    grid in voxels."""
    arch_type = "barycenter_affine"

    def __init__(self, ndim: int = 3, in_channels: int = 1, keypoints: int = 32,
                 features: Sequence[int] = (16, 32, 64, 64), convs: int = 2, rigid: bool = False,
                 symmetric: bool = True, activation: str = "relu"):
        super().__init__()
        if activation not in ("relu", "softmax"):
            raise ValueError(f"activation must be 'relu' or 'softmax', got {activation!r}")
        self.ndim = ndim
        self.rigid, self.symmetric, self.activation = bool(rigid), bool(symmetric), activation
        self.config = dict(ndim=ndim, in_channels=in_channels, keypoints=keypoints, features=list(features),
                           convs=convs, rigid=self.rigid, symmetric=self.symmetric, activation=activation)
        # softmax: one extra "no keypoint" channel, so that the maps can be
        # spatially sparse (and a segmentation network's head fits as is).
        extra = 1 if activation == "softmax" else 0
        self.unet = UNet(ndim, in_channels, keypoints + extra, features, convs)

    @property
    def multiple(self) -> int:
        return self.unet.multiple

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Non-negative feature maps (B, K, *S): ReLU of the U-Net output, or
        its softmax over K+1 channels without channel 0."""
        y = self.unet(x)
        if self.activation == "relu":
            return F.relu(y)
        return torch.softmax(y.float(), dim=1)[:, 1:]

    def fit(self, feat_fixed: torch.Tensor, feat_moving: torch.Tensor, fixed_vox2mm: torch.Tensor,
            moving_vox2mm: torch.Tensor) -> torch.Tensor:
        """The transform from two sets of feature maps (float32 or float64)."""
        return self.fit_barycenters(*barycenters(feat_fixed, fixed_vox2mm), *barycenters(feat_moving, moving_vox2mm))

    def fit_barycenters(self, cf: torch.Tensor, mf: torch.Tensor, cm: torch.Tensor, mm: torch.Tensor) -> torch.Tensor:
        """The transform from :func:`barycenters` (points, masses) of the
        fixed and moving maps: :meth:`fit` without the pass over the maps
        (an image's barycentres serve every pair it is in)."""
        w = channel_weights(mf, mm)
        if self.rigid:
            return fit_rigid(cf, cm, w)
        if self.symmetric:
            return fit_symmetric_affine(cf, cm, w)
        return fit_affine(cf, cm, w)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor, fixed_vox2mm: torch.Tensor | None = None,
                moving_vox2mm: torch.Tensor | None = None) -> torch.Tensor:
        if fixed.shape == moving.shape:   # one pass through the U-Net for both
            feats = self.feature_maps(torch.cat([fixed, moving]))
            ff, fm = feats[:fixed.shape[0]], feats[fixed.shape[0]:]
        else:
            ff, fm = self.feature_maps(fixed), self.feature_maps(moving)
        if fixed_vox2mm is None:
            fixed_vox2mm = centered_vox2mm(fixed.shape[2:], 1.0, device=fixed.device)
        if moving_vox2mm is None:
            moving_vox2mm = centered_vox2mm(moving.shape[2:], 1.0, device=moving.device)
        with torch.autocast(fixed.device.type, enabled=False):   # the fit needs full precision
            return self.fit(ff.float(), fm.float(), fixed_vox2mm.float(), moving_vox2mm.float())


class FiLM(nn.Module):
    """lambda (B, 1) -> per-channel (1 + scale, shift) for one feature map."""

    def __init__(self, hidden: int, channels: int):
        super().__init__()
        self.out = nn.Linear(hidden, 2 * channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        scale, shift = self.out(h).chunk(2, dim=1)
        view = (x.shape[0], -1) + (1,) * (x.ndim - 2)
        return x * (1 + scale.view(view)) + shift.view(view)


class SVFNet(nn.Module):
    """Deformable registration U-Net: ``forward(moving, fixed, lam)`` ->
    stationary velocity field (B, N, *S) in voxels on the fixed grid;
    :meth:`displacement` integrates it (scaling and squaring, ``steps``).
    ``lam`` (B,) or (B, 1) in [0, 1] is the regularisation weight the network
    was trained with (FiLM conditioning of the bottleneck and decoder)."""
    arch_type = "svf_unet"

    def __init__(self, ndim: int = 3, in_channels: int = 1, features: Sequence[int] = (16, 32, 32, 32),
                 convs: int = 2, steps: int = 7, hidden: int = 32):
        super().__init__()
        self.ndim = ndim
        self.steps = int(steps)
        self.config = dict(ndim=ndim, in_channels=in_channels, features=list(features), convs=convs,
                           steps=self.steps, hidden=hidden)
        f = list(features)
        self.down, self.up = levels(ndim, 2 * in_channels, f, convs)
        self.mlp = nn.Sequential(nn.Linear(1, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden),
                                 nn.LeakyReLU(0.2))
        self.film = nn.ModuleList([FiLM(hidden, f[-1])] + [FiLM(hidden, f[k]) for k in range(len(f) - 2, -1, -1)])
        # PyTorch's default conv init shrinks activations ~0.4x per layer
        # without normalisation: the decoder output of this U-Net was 10x
        # smaller than its input, which slowed the head's learning. He
        # initialisation for LeakyReLU(0.2) keeps them at the input's scale.
        for m in list(self.down.modules()) + list(self.up.modules()):
            if isinstance(m, _conv(ndim)):
                nn.init.kaiming_normal_(m.weight, a=0.2)
                nn.init.zeros_(m.bias)
        self.head = _conv(ndim)(f[0], ndim, 3, padding=1)
        nn.init.normal_(self.head.weight, std=1e-5)   # start near the identity
        nn.init.zeros_(self.head.bias)

    @property
    def multiple(self) -> int:
        return 2 ** (len(self.down) - 1)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor, lam: torch.Tensor | float = 0.5) -> torch.Tensor:
        x = torch.cat([moving, fixed], dim=1)
        lam = torch.as_tensor(lam, dtype=x.dtype, device=x.device).reshape(-1, 1)
        h = self.mlp(lam.expand(x.shape[0], 1).to(self.mlp[0].weight.dtype))
        # Every decoder level (and the bottleneck) is scaled and shifted by lambda.
        modulate = [lambda y, film=film: film(y, h) for film in self.film]
        return self.head(run_levels(x, self.down, self.up, modulate)[-1])

    def displacement(self, velocity: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """exp(v) (or exp(-v), its exact inverse) as a displacement in voxels."""
        return integrate_svf(-velocity if inverse else velocity, self.steps)


class FeatureSVFNet(nn.Module):
    """:class:`SVFNet` on the feature maps of a frozen registration feature
    network (``encoder``: a :class:`BarycenterAffine` config, e.g. the
    shipped synthmorph-affine's) instead of on the raw images. Same interface
    as SVFNet: ``forward(moving, fixed, lam)`` takes images on the model's grid
    and returns the velocity (voxels) on it. Each image is upsampled ``scale``
    times (trilinear) to the encoder's grid, and its maps are average-pooled
    back: the encoder's features are tied to its training voxel size (at the
    coarser grid directly they carried nothing the U-Net could learn from).

    Why: from raw synthetic images of random contrasts the SVF U-Net did not
    start learning in CPU-sized runs; it must first learn contrast-invariant
    features. The encoder's anatomical maps are such features already (on
    them the same U-Net learns at the pace it does from the label maps
    themselves; runs/README.md)."""
    arch_type = "feature_svf"

    def __init__(self, encoder: dict, features: Sequence[int] = (16, 32, 32, 32), convs: int = 2,
                 steps: int = 7, hidden: int = 32, scale: int = 2):
        super().__init__()
        enc = {k: v for k, v in dict(encoder).items() if k != "type"}
        self.encoder = BarycenterAffine(**enc)
        ndim = self.encoder.config["ndim"]   # the encoder's, so the two cannot disagree
        self.encoder.requires_grad_(False)
        self.scale = int(scale)
        self.svf = SVFNet(ndim, int(enc.get("keypoints", 32)), features, convs, steps, hidden)
        self.steps = self.svf.steps
        self.config = dict(encoder=dict(type=BarycenterAffine.arch_type, **self.encoder.config),
                           features=list(features), convs=convs, steps=self.steps, hidden=hidden, scale=self.scale)

    @property
    def multiple(self) -> int:
        # The input size n must make both n (the SVF U-Net) and n * scale
        # (the encoder, after upsampling) divisible by their multiples.
        enc = self.encoder.multiple // math.gcd(self.encoder.multiple, self.scale)
        return math.lcm(enc, self.svf.multiple)

    def train(self, mode: bool = True) -> "FeatureSVFNet":
        super().train(mode)
        self.encoder.eval()   # frozen
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps (B, K, *S) of images (B, 1, *S) on the model's grid."""
        mode = {3: "trilinear", 2: "bilinear"}[x.ndim - 2]
        pool = {3: F.avg_pool3d, 2: F.avg_pool2d}[x.ndim - 2]
        with torch.no_grad():
            up = F.interpolate(x, scale_factor=self.scale, mode=mode, align_corners=False) if self.scale > 1 else x
            f = self.encoder.feature_maps(up)
            return pool(f, self.scale) if self.scale > 1 else f

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor, lam: torch.Tensor | float = 0.5) -> torch.Tensor:
        if moving.shape == fixed.shape:   # one encoder pass for both
            f = self.encode(torch.cat([moving, fixed]))
            fm, ff = f[:moving.shape[0]], f[moving.shape[0]:]
        else:
            fm, ff = self.encode(moving), self.encode(fixed)
        return self.svf(fm, ff, lam)

    def displacement(self, velocity: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        return self.svf.displacement(velocity, inverse)
