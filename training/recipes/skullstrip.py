"""Skull-stripping recipe (SynthStrip): regress the signed distance (mm) to
the brain boundary of the deformed label map from a synthetic whole-head
image, with targets clipped to a band of +-``band`` mm around the boundary.

``recipe.boundaries`` lists the brain definitions the network learns, one
output channel each: ``csf`` (brain + CSF up to the skull, SynthStrip's
default) and ``nocsf`` (no CSF outside the brain, as many hand-made masks).
Both from one network cost one forward pass; the old ``recipe.csf`` flag
still selects a single one."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import ndimage

from synthtools.evaluation import STRIP_CASES, score_strip
from synthtools.nets.unet import UNet
from synthtools.skullstrip import brain_sdt, mask_from_sdt

from ..config import Config

from ..generator.synth import Synthesizer
from .base import Recipe


def signed_distance(mask: np.ndarray, voxsize: float, band: float) -> np.ndarray:
    """Signed distance (mm, negative inside) of a binary mask, clipped to
    +-band. Each side's first voxel sits at +-1 voxel, so linear
    interpolation crosses zero on the voxel boundary."""
    if not mask.any():
        return np.full(mask.shape, band, np.float32)
    if mask.all():
        return np.full(mask.shape, -band, np.float32)
    out = ndimage.distance_transform_edt(~mask, sampling=voxsize)
    inside = ndimage.distance_transform_edt(mask, sampling=voxsize)
    return np.clip(out - inside, -band, band).astype(np.float32)


class SkullStripRecipe(Recipe):
    name = task = "skullstrip"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        r = cfg.recipe
        self.shape = self.grid_shape((96, 96, 96))
        self.band = r.band
        self.boundaries = list(r.boundaries) if r.boundaries is not None else ["csf" if r.csf else "nocsf"]
        if not self.boundaries or set(self.boundaries) - {"csf", "nocsf"} or len(set(self.boundaries)) < len(self.boundaries):
            raise ValueError(f"recipe.boundaries must list 'csf' and/or 'nocsf' once, got {self.boundaries}")
        self.luts = [self.labels.brain_lut(csf=b == "csf") for b in self.boundaries]
        self.brain_lut = self.luts[0]
        gen_cfg = cfg.generator.with_label_values(self.labels.values)
        # Simulated skull-stripping keeps the widest brain (with CSF when learnt).
        widest = self.labels.brain_lut(csf="csf" in self.boundaries)
        self.synth = Synthesizer(gen_cfg, num_labels=len(self.labels), brain_lut=widest)

    def build_model(self) -> UNet:
        m = self.cfg.model
        return UNet(self.ndim, self.in_channels, len(self.boundaries), features=m.features or (16, 32, 64, 64), convs=m.convs)

    def targets(self, image: torch.Tensor, labels: torch.Tensor, fov: torch.Tensor, gen: torch.Generator,
                lr_axis: int | None = 0) -> dict[str, torch.Tensor]:
        """Synthetic and real samples alike: signed distance (mm) to the
        boundary of the brain labels inside the field of view, one channel
        per brain definition."""
        sdts = []
        for lut in self.luts:
            brain = (lut.to(labels.device)[labels.long()] > 0) & fov
            sdts.append(signed_distance(brain.cpu().numpy(), self.voxsize, self.band))  # scipy EDT: CPU
        return {"image": image, "target": torch.from_numpy(np.stack(sdts)).to(image.device)}

    def sample_problems(self, sample: dict[str, torch.Tensor]) -> list[str]:
        t = sample["target"]
        if not (t < 0).any():
            return ["no brain in the target (moved out of the FOV or cropped away)"]
        if not (t > 0).any():
            return ["target is all brain (no boundary to learn)"]
        return []

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        pred = model(batch["image"]).float()
        return torch.mean((pred - batch["target"]) ** 2)

    def output_metadata(self) -> dict[str, Any]:
        return {"type": "signed_distance_mm", "band_mm": self.band, "sign": "negative inside",
                "channels": self.boundaries, "csf": self.boundaries[0] == "csf"}

    def validate(self, net: torch.nn.Module) -> dict[str, float]:
        """Dice per built-in case and per ``[validation] real_pairs`` pair,
        plus ``mean_<group>`` per contrast/site/domain."""
        from synthtools.metrics import with_group_means

        from ..realdata import score_strip_pairs
        model = self.as_model(net)

        def by_case(volume, brain):   # the output matching the reference's convention, if learnt
            channel = self.boundaries.index(brain) if brain in self.boundaries else 0
            return mask_from_sdt(brain_sdt(model, volume, channel=channel), 1.0)
        predict = lambda v: by_case(v, self.boundaries[0])  # noqa: E731  (real pairs: output 0)
        cases, pairs = self.validation_cases(STRIP_CASES), self.validation_pairs()
        metrics = score_strip(by_case, cases, by_convention=True) if cases else {}
        if pairs:
            if self.validation_target() == "mask":
                ref = lambda lab: np.asarray(lab) > 0.5  # noqa: E731
            else:
                lut = self.brain_lut.numpy().astype(bool)
                ref = lambda lab: lut[self.labels.to_index(lab)]  # noqa: E731
            metrics.update(score_strip_pairs(predict, pairs, ref))
        return with_group_means(metrics, self.validation_groups(cases, pairs))
