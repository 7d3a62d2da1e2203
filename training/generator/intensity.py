"""Image synthesis from a label map: a Gaussian mixture with one random mean
per label (paper section "Image synthesis"), implemented as a lookup table
indexed by a zero-based label-index map."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .mr_contrast import mr_means
from .rng import uniform


@dataclass
class RandomGMM:
    """Per-label intensities mu_j ~ U(mean) (a.u.) and, optionally, a per-label
    SD ~ U(std) (fraction of the [0, 1] range) for voxel-wise Gaussian noise.
    ``classes[j]`` ties labels that share an intensity (e.g. left/right
    twins); None gives every label its own mean."""
    mean: tuple[float, float] = (0.0, 1.0)
    std: tuple[float, float] = (0.0, 0.0)
    classes: torch.Tensor | tuple[int, ...] | None = None
    background_zero_prob: float = 0.0  # label 0 forced dark part of the time (air)
    # CT-like draws: a fraction ``ct_prob`` of samples gets bone (label values
    # ``ct_bright``) brightest, U(0.8, 1), and every intracranial label within
    # a narrow band of width U(ct_contrast) around a level U(0.15, 0.5), as a
    # CT brain window shows them; other head tissue falls below the band's
    # top. Uniform draws alone almost never give this (one label far above
    # twenty near-equal ones). ``values`` (label value per index) is needed.
    ct_prob: float = 0.0
    ct_contrast: tuple[float, float] = (0.02, 0.15)
    ct_bright: tuple[int, ...] = (515,)
    # MR-physics draws: a fraction ``mr_prob`` of samples gets its means from
    # tissue parameters and a random sequence's signal equation
    # (``mr_contrast.mr_means``: T1w, MPRAGE, T2w, PD, FLAIR) instead of
    # uniform draws (of the samples not drawn CT-like). Needs ``values``.
    mr_prob: float = 0.0
    values: tuple[int, ...] | None = None

    def lookup(self, num_labels: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample (means, stds), each (num_labels,) float32."""
        classes = torch.as_tensor(self.classes if self.classes is not None else range(num_labels)).long()
        nclass = int(classes.max()) + 1
        mu = torch.tensor(uniform(gen, *self.mean, n=nclass), dtype=torch.float32)[classes]
        sd = torch.tensor(uniform(gen, *self.std, n=nclass), dtype=torch.float32)[classes]
        if self.background_zero_prob > 0 and uniform(gen, 0, 1) < self.background_zero_prob:
            mu[0] = 0.0
        if self.ct_prob > 0 and uniform(gen, 0, 1) < self.ct_prob:
            mu = self._ct_like(mu, gen)
        elif self.mr_prob > 0 and uniform(gen, 0, 1) < self.mr_prob:
            if self.values is None:
                raise ValueError("RandomGMM.mr_prob needs the label values (RandomGMM.values)")
            mu = mr_means(self.values[:len(mu)], gen)
        return mu, sd

    def _ct_like(self, mu: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Means re-mapped to a CT-like contrast (see ``ct_prob``), keeping
        each label's random rank inside its group."""
        if self.values is None:
            raise ValueError("RandomGMM.ct_prob needs the label values (RandomGMM.values)")
        values = torch.as_tensor(self.values[:len(mu)])
        level = uniform(gen, 0.15, 0.5)
        width = uniform(gen, *self.ct_contrast)
        brain = (values > 0) & (values < 500)
        bone = torch.isin(values, torch.as_tensor(self.ct_bright))
        out = mu * (level + width / 2)                      # other head tissue: below the band's top
        out[brain] = level + width * (mu[brain] - 0.5)      # the narrow brain window
        out[bone] = torch.tensor(uniform(gen, 0.8, 1.0, n=int(bone.sum())), dtype=torch.float32)
        out[0] = mu[0] * level                              # background: air or dark
        return out

    def __call__(self, index_map: torch.Tensor, num_labels: int, gen: torch.Generator) -> torch.Tensor:
        """Mean image x_mu = mu(s) (plus per-label noise when std > 0), float32
        of the index map's shape."""
        mu, sd = self.lookup(num_labels, gen)
        idx = index_map.long()
        image = mu.to(index_map.device)[idx]
        if self.std[1] > 0:
            noise = torch.randn(index_map.shape, generator=gen).to(index_map.device)
            image = image + sd.to(index_map.device)[idx] * noise
        return image
