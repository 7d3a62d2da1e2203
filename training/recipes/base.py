"""What every recipe shares: the streaming dataset over the label maps, the
input-space metadata and the wrapping of a training network as an
inference ``Model`` (so validation runs the exact CLI code path)."""
from __future__ import annotations

from typing import Any

import torch

from synthtools.weights import Model

from ..generator.dataset import LabelMapDataset, label_map_files
from ..generator.labels import LabelSet
from ..validation import data_root

TRAINING_DATA = "20 whole-head label maps (SynthSeg repository, BBillot/SynthSeg, Apache-2.0)"


class Recipe:
    """Base class: subclasses set ``name`` and implement ``make_sample``,
    ``loss``, ``output_metadata`` and ``validate``."""
    name = "recipe"
    task = "recipe"

    def __init__(self, cfg: dict[str, Any]):
        self.cfg = cfg
        self.voxsize = float(cfg["recipe"].get("voxsize", 2.0))
        self.labels = LabelSet()

    def make_sample(self, index_map: torch.Tensor, voxsize, gen: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def dataset(self, start: int = 0, rank: int = 0, world: int = 1) -> LabelMapDataset:
        t = self.cfg["train"]
        files = label_map_files(t.get("label_maps") or str(data_root() / "label_maps"))
        if t.get("max_label_maps"):
            files = files[: int(t["max_label_maps"])]
        return LabelMapDataset(files, self.make_sample, self.labels, seed=int(t.get("seed", 0)),
                               start=start, rank=rank, world=world)

    def output_metadata(self) -> dict[str, Any]:
        raise NotImplementedError

    def metadata(self) -> dict[str, Any]:
        """What inference needs: input space, output type, provenance."""
        return {
            "task": self.task,
            "input": {"voxsize": self.voxsize, "orientation": "LIA", "multiple": 16,
                      "normalization": "min to 0, 99.5th percentile to 1, clipped"},
            "output": self.output_metadata(),
            "inference": {"bf16": False},
            "data": TRAINING_DATA,
        }

    def as_model(self, net: torch.nn.Module) -> Model:
        meta = self.metadata()
        meta["architecture"] = dict(type="unet", **net.config)
        return Model(net, meta, path=None)

    def validation_cases(self, all_cases: list) -> list:
        names = self.cfg.get("validation", {}).get("cases")
        return [c for c in all_cases if names is None or c.name in names]
