"""Skull-stripping recipe (SynthStrip): regress the signed distance (mm) to
the brain boundary of the deformed label map from a synthetic whole-head
image, with targets clipped to a band of +-``band`` mm around the boundary."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import ndimage

from synthtools.io import Volume
from synthtools.nets.unet import UNet
from synthtools.strip import brain_sdt, mask_from_sdt
from synthtools.weights import Model

from ..generator.dataset import LabelMapDataset, label_map_files
from ..generator.labels import LabelSet
from ..generator.synth import SynthConfig, Synthesizer
from ..validation import STRIP_CASES, data_root, score_strip


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


class SkullStripRecipe:
    name = "skullstrip"

    def __init__(self, cfg: dict[str, Any]):
        self.cfg = cfg
        r = cfg["recipe"]
        self.voxsize = float(r.get("voxsize", 2.0))
        self.shape = tuple(r.get("shape", (96, 96, 96)))
        self.band = float(r.get("band", 5.0))
        self.labels = LabelSet()
        self.brain_lut = self.labels.brain_lut(csf=bool(r.get("csf", True)))
        gen_cfg = SynthConfig.from_dict(cfg.get("generator"))
        self.synth = Synthesizer(gen_cfg, num_labels=len(self.labels), brain_lut=self.brain_lut)

    def build_model(self) -> UNet:
        m = self.cfg["model"]
        return UNet(3, 1, 1, features=m.get("features", (16, 32, 64, 64)), convs=int(m.get("convs", 2)))

    def make_sample(self, index_map: torch.Tensor, voxsize, gen: torch.Generator) -> dict[str, torch.Tensor]:
        s = self.synth(index_map, voxsize, gen, out_shape=self.shape, out_voxsize=(self.voxsize,) * 3)
        brain = (self.brain_lut.to(s.labels.device)[s.labels.long()] > 0) & s.fov
        sdt = signed_distance(brain.cpu().numpy(), self.voxsize, self.band)  # scipy EDT: CPU
        return {"image": s.image, "target": torch.from_numpy(sdt)[None].to(s.image.device)}

    def sample_problems(self, sample: dict[str, torch.Tensor]) -> list[str]:
        t = sample["target"]
        if not (t < 0).any():
            return ["no brain in the target (moved out of the FOV or cropped away)"]
        if not (t > 0).any():
            return ["target is all brain (no boundary to learn)"]
        return []

    def dataset(self, start: int = 0, rank: int = 0, world: int = 1) -> LabelMapDataset:
        t = self.cfg["train"]
        root = t.get("label_maps") or str(data_root() / "label_maps")
        files = label_map_files(root)
        if t.get("max_label_maps"):
            files = files[: int(t["max_label_maps"])]
        return LabelMapDataset(files, self.make_sample, self.labels, seed=int(t.get("seed", 0)),
                               start=start, rank=rank, world=world)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        pred = model(batch["image"]).float()
        return torch.mean((pred - batch["target"]) ** 2)

    def metadata(self) -> dict[str, Any]:
        return {
            "task": "skullstrip",
            "input": {"voxsize": self.voxsize, "orientation": "LIA", "multiple": 16,
                      "normalization": "min to 0, 99.5th percentile to 1, clipped"},
            "output": {"type": "signed_distance_mm", "band_mm": self.band, "sign": "negative inside",
                       "csf": bool(self.cfg["recipe"].get("csf", True))},
            "inference": {"bf16": False},
            "data": "20 whole-head label maps (SynthSeg repository, BBillot/SynthSeg, Apache-2.0)",
        }

    def as_model(self, net: torch.nn.Module) -> Model:
        meta = self.metadata()
        meta["architecture"] = dict(type="unet", **net.config)
        return Model(net, meta, path=None)

    def validate(self, net: torch.nn.Module) -> dict[str, float]:
        names = self.cfg.get("validation", {}).get("cases")
        cases = [c for c in STRIP_CASES if names is None or c.name in names]
        model = self.as_model(net)
        return score_strip(lambda v: mask_from_sdt(brain_sdt(model, v), 1.0), cases)
