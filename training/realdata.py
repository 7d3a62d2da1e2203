"""Real labelled scans next to the synthetic stream: CSV lists of
(image, labels[, domain, name]) pairs, the mixed real + synthetic dataset,
scoring of a user's own labelled sets, and the groups (contrast, site or
domain) their scores are averaged over (:func:`synthtools.metrics.with_group_means`).

CSV format: one pair per line, ``image,labels`` for training
(``[real] pairs``) and ``image,labels,domain[,name]`` for validation
(``[validation] real_pairs``). An optional header row whose first field is
``image`` is skipped, as are blank lines and lines starting with ``#``.
Relative paths are relative to the CSV file's folder. ``labels`` are label
maps in the generation-label space (FreeSurfer values, as the training label
maps) or, with ``target = "mask"`` (skull-stripping only), brain masks.
"""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .generator.dataset import LabelMapDataset, sample_seed
from .generator.rng import randint
from .generator.synth import generator

# Recipes of training runs started before the metrics moved import it from here.
from synthtools.metrics import with_group_means  # noqa: E402, F401


@dataclass(frozen=True)
class RealPair:
    image: str
    labels: str
    domain: str = "real"
    name: str = ""


def _stem(path: str) -> str:
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".mgz", ".mgh"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def read_pairs(csv_path: str | Path, need_domain: bool = False) -> list[RealPair]:
    """Pairs of a CSV list (see the module docstring)."""
    p = Path(csv_path)
    if not p.is_file():
        raise FileNotFoundError(f"{csv_path}: no such pair list")
    out = []
    with open(p, newline="") as f:
        for row in csv.reader(f):
            row = [c.strip() for c in row]
            if not row or not row[0] or row[0].startswith("#") or row[0].lower() == "image":
                continue
            if len(row) < (3 if need_domain else 2):
                cols = "image,labels,domain[,name]" if need_domain else "image,labels"
                raise ValueError(f"{csv_path}: expected {cols} per line, got {','.join(row)!r}")
            img, lab = ((c if Path(c).is_absolute() else str(p.parent / c)) for c in row[:2])
            domain = row[2] if len(row) > 2 and row[2] else "real"
            name = row[3] if len(row) > 3 and row[3] else _stem(row[0])
            out.append(RealPair(img, lab, domain, name))
    if not out:
        raise ValueError(f"{csv_path}: no pairs listed")
    return out


def load_pair(pair: RealPair):
    """(image Volume, labels Volume) of a pair; 4D images keep frame 0."""
    from synthtools.io import Volume, load_volume
    img = load_volume(pair.image, allow_4d=True)
    if img.data.ndim == 4:
        img = Volume(img.data[..., 0], img.affine, img.header, img.path)
    lab = load_volume(pair.labels, dtype=None)
    return img, lab


def is_real_step(i: int, ratio: float) -> bool:
    """Whether sample ``i`` of a stream is a real pair: an even interleaving
    with exactly ``floor(n * ratio)`` real samples among the first ``n``
    (ratio 0.25: samples 3, 7, 11, ...; 1.0: all)."""
    return math.floor((i + 1) * ratio + 1e-9) > math.floor(i * ratio + 1e-9)


class MixedDataset(LabelMapDataset):
    """The synthetic stream with a fraction ``ratio`` of its samples replaced
    by real pairs. Which samples are real is fixed by their index
    (:func:`is_real_step`); which pair and which crop come from the sample's
    own seed ``(seed, stream, index)``, so a run is reproducible and resumes
    exactly like the synthetic stream. ``prepare(image, labels)`` conforms a
    pair once (cached per process), ``make_real(prepared, gen)`` crops it and
    builds the recipe's sample dict."""

    def __init__(self, files, make, label_set, *, pairs: Sequence[RealPair], ratio: float,
                 prepare: Callable, make_real: Callable, **kw: Any):
        super().__init__(files, make, label_set, **kw)
        if not 0 < ratio <= 1:
            raise ValueError(f"real.ratio must be in (0, 1], got {ratio}")
        self.pairs, self.ratio = list(pairs), float(ratio)
        self.prepare, self.make_real = prepare, make_real
        self._prepared: dict[int, Any] = {}

    def prepared(self, k: int) -> Any:
        if k not in self._prepared:
            self._prepared[k] = self.prepare(*load_pair(self.pairs[k]))
        return self._prepared[k]

    def sample(self, stream: int, step: int) -> Any:
        if is_real_step(step, self.ratio):
            gen = generator(sample_seed(self.seed, stream, step))
            k = randint(gen, 0, len(self.pairs) - 1)
            return self.make_real(self.prepared(k), gen)
        return super().sample(stream, step)


# ------------------------------------------------------------- validation

def group_name(contrast: str) -> str:
    """One name per contrast across datasets: T1W -> T1, T2W -> T2, PDW -> PD."""
    m = re.fullmatch(r"(T1|T2|PD)W", contrast, flags=re.IGNORECASE)
    return m.group(1).upper() if m else contrast


def case_group(case, by: str = "contrast") -> str:
    """The group of a built-in validation case: its contrast, or its site
    (the dataset: the case name's first word)."""
    if by == "site":
        return case.name.split("_")[0]
    if by != "contrast":
        raise ValueError(f"validation.group_by must be 'contrast' or 'site', got {by!r}")
    return group_name(case.contrast)


def _reference_on(image, labels) -> np.ndarray:
    """Label data on the image's grid (nearest neighbour when grids differ)."""
    if labels.shape == image.shape and np.allclose(labels.affine, image.affine, atol=1e-3):
        return np.asarray(labels.data)
    from synthtools.conform import resample
    return resample(np.asarray(labels.data), labels.affine, image.affine, image.shape, order=0)


def score_strip_pairs(predict_mask: Callable, pairs: Sequence[RealPair], brain: Callable) -> dict[str, float]:
    """Dice per pair of a function Volume -> native brain mask; ``brain``
    turns the pair's label data into the reference mask."""
    from synthtools.metrics import dice
    out = {}
    for pair in pairs:
        img, lab = load_pair(pair)
        out[pair.name] = dice(predict_mask(img) > 0, brain(_reference_on(img, lab)))
    return out


def score_seg_pairs(predict_labels: Callable, pairs: Sequence[RealPair], to_synthseg: Callable) -> dict[str, float]:
    """Mean Dice (and over large structures) per pair; ``to_synthseg`` maps
    the pair's generation labels to SynthSeg 2.0 values."""
    from .generator.labels import SYNTHSEG_LABELS
    from synthtools.metrics import LARGE, seg_dice
    out = {}
    for pair in pairs:
        img, lab = load_pair(pair)
        ref = to_synthseg(_reference_on(img, lab))
        d = seg_dice(predict_labels(img), ref, SYNTHSEG_LABELS[1:])
        if d:
            out[f"{pair.name}_mean"] = float(np.mean(list(d.values())))
            large = [d[k] for k in LARGE if k in d]
            if large:
                out[f"{pair.name}_large"] = float(np.mean(large))
    return out
