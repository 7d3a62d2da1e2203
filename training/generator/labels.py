"""Label maps: loading as zero-based index maps, mappings from generation
labels to training targets (SynthSeg 2.0, brain / non-brain, one-hot), left/
right swaps, and fully synthetic label maps for anatomy-agnostic training."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from .noise import smooth_noise

# The 54 FreeSurfer label values present in the bundled-recipe label maps
# (aseg structures 2..60, CSF 24, vessels 30/62, lesion-like 25/57, 72, 85,
# 136/137/163/164, extra-cerebral generation labels 502..530).
GENERATION_LABELS = (
    0, 14, 15, 16, 24, 72, 85, 502, 506, 507, 508, 509, 511, 512, 514, 515, 516, 530,
    2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 17, 18, 25, 26, 28, 30, 136, 137,
    41, 42, 43, 44, 46, 47, 49, 50, 51, 52, 53, 54, 57, 58, 60, 62, 163, 164,
)

# SynthSeg 2.0 targets: background + 32 structures, FreeSurfer numbering.
SYNTHSEG_LABELS = (0, 2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 26, 28,
                   41, 42, 43, 44, 46, 47, 49, 50, 51, 52, 53, 54, 58, 60)
# Generation labels folded into another target (lesions into white matter,
# extra ventricle labels into the ventricles); unlisted non-targets become 0.
SYNTHSEG_FOLD = {25: 2, 57: 41, 136: 4, 137: 5, 163: 43, 164: 44}

LEFT_RIGHT = ((2, 41), (3, 42), (4, 43), (5, 44), (7, 46), (8, 47), (10, 49), (11, 50), (12, 51),
              (13, 52), (17, 53), (18, 54), (25, 57), (26, 58), (28, 60), (30, 62), (136, 163), (137, 164))

CSF_LABELS = (24,)


def is_intracranial(label: int) -> bool:
    """FreeSurfer aseg-range labels are inside the skull; 5xx are head tissue."""
    return 0 < label < 500


class LabelSet:
    """A fixed list of label values, so every map shares one index space:
    index j <-> ``values[j]``. Values outside the list map to index 0."""

    def __init__(self, values: Sequence[int] = GENERATION_LABELS):
        self.values = np.asarray(values, dtype=np.int64)
        if self.values[0] != 0:
            raise ValueError("the first label value must be 0 (background)")
        self._lut = np.zeros(int(self.values.max()) + 1, dtype=np.uint8)
        self._lut[self.values] = np.arange(len(self.values), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.values)

    def to_index(self, labels: np.ndarray) -> np.ndarray:
        """Label values (any int/float array) -> uint8 index map."""
        lab = np.rint(np.asarray(labels)).astype(np.int64)
        inside = (lab >= 0) & (lab < len(self._lut))
        return np.where(inside, self._lut[np.clip(lab, 0, len(self._lut) - 1)], 0).astype(np.uint8)

    def lut(self, mapping: dict[int, int] | None = None, default: int = 0) -> torch.Tensor:
        """Lookup table index -> target value; ``mapping`` sends label values to
        targets, identity when None."""
        if mapping is None:
            return torch.as_tensor(self.values)
        return torch.tensor([mapping.get(int(v), default) for v in self.values], dtype=torch.int64)

    def synthseg_lut(self) -> torch.Tensor:
        """Index -> SynthSeg 2.0 label value."""
        mapping = {v: v for v in SYNTHSEG_LABELS}
        mapping.update(SYNTHSEG_FOLD)
        return self.lut(mapping)

    def brain_lut(self, csf: bool = True) -> torch.Tensor:
        """Index -> 1 for brain (intracranial, optionally without CSF), else 0."""
        return torch.tensor([int(is_intracranial(int(v)) and (csf or int(v) not in CSF_LABELS))
                             for v in self.values], dtype=torch.int64)

    def flip_lut(self) -> torch.Tensor:
        """Index -> index of the left/right twin (self for midline labels)."""
        twin = {a: b for a, b in LEFT_RIGHT}
        twin.update({b: a for a, b in LEFT_RIGHT})
        pos = {int(v): j for j, v in enumerate(self.values)}
        return torch.tensor([pos.get(twin.get(int(v), int(v)), j) for j, v in enumerate(self.values)])


def load_priors_mapping(gen_path: str | Path, seg_path: str | Path) -> dict[int, int]:
    """Read a SynthSeg ``generation_labels.npy`` / ``segmentation_labels.npy``
    pair into {generation value: target value}. The published 2.0 target list
    has one more extra-cerebral entry than our label list, so the two are
    aligned at both ends; the surplus entries must all be background."""
    gen = np.load(gen_path).astype(int)
    seg = np.load(seg_path).astype(int)
    if len(seg) == len(gen):
        return dict(zip(gen.tolist(), seg.tolist()))
    head = next(i for i, v in enumerate(gen) if v >= 500)
    tail = len(gen) - head
    extra = seg[head:len(seg) - tail]
    if len(seg) < len(gen) or np.any(extra != 0):
        raise ValueError(f"cannot align {gen_path} with {seg_path}")
    pairs = list(zip(gen[:head], seg[:head])) + list(zip(gen[head:], seg[len(seg) - tail:]))
    return {int(a): int(b) for a, b in pairs}


def one_hot(index_map: torch.Tensor, num: int) -> torch.Tensor:
    """(B, 1, *S) or (*S) integer map -> (B, num, *S) float one-hot."""
    x = index_map.long()
    if x.ndim >= 2 and x.shape[1] == 1:
        x = x[:, 0]
    return torch.nn.functional.one_hot(x, num).movedim(-1, 1).float()


def synthetic_label_map(shape: Sequence[int], gen: torch.Generator, num_labels: tuple[int, int] = (8, 32),
                        max_points: int = 16, kind: str = "perlin", device="cpu") -> torch.Tensor:
    """Anatomy-agnostic label map: argmax over J ~ U(num_labels) smooth noise
    channels (SynthMorph's shapes). Returns a uint8 index map of ``shape``;
    warp it with the spatial step like any other map."""
    from .rng import randint
    j = randint(gen, *num_labels)
    noise = smooth_noise(kind, shape, gen, channels=j, max_points=max_points, device=device)
    return noise[0].argmax(0).to(torch.uint8)


def unique_values(maps: Iterable[np.ndarray]) -> list[int]:
    """Sorted union of label values over several maps (to build a LabelSet)."""
    out: set[int] = set()
    for m in maps:
        out.update(np.unique(np.rint(m).astype(np.int64)).tolist())
    return sorted(out)
