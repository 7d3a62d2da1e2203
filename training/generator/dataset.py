"""Streaming training data: an IterableDataset over a folder of label maps
that synthesises a new sample at every step.

Seeding: sample ``i`` of distributed rank ``r`` is drawn from the seed
``(seed, r, i)``. A rank's samples are numbered in the order training
consumes them (``i = (step * per_step + micro) * batch + j``), and DataLoader
worker ``w`` of ``n`` synthesises exactly the batches ``w, w + n, ...``, the
ones the DataLoader hands out in its round-robin order. So ranks never share
a seed, workers never duplicate each other, a resumed run (``start`` = the
resume step) continues exactly where the checkpoint left off instead of
repeating samples, and the stream does not depend on the number of workers."""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .labels import LabelSet
from .rng import randint
from .synth import generator


def label_map_files(folder_or_files: str | Sequence[str]) -> list[str]:
    """Sorted label-map files (NIfTI/MGZ) of a folder, or a given list."""
    if isinstance(folder_or_files, (str, os.PathLike)):
        p = Path(folder_or_files)
        if p.is_dir():
            files = sorted(glob.glob(str(p / "*.nii*")) + glob.glob(str(p / "*.mgz")))
        else:
            files = sorted(glob.glob(str(p)))
    else:
        files = list(folder_or_files)
    if not files:
        raise FileNotFoundError(f"no label maps found in {folder_or_files}")
    return files


def load_index_map(path: str, label_set: LabelSet) -> tuple[torch.Tensor, tuple[float, ...]]:
    """Label map file -> (uint8 index map, voxel size in mm). Maps stored as
    float are rounded to integers first."""
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
    if data.ndim != 3:
        raise ValueError(f"{path}: label map must be 3D, got shape {data.shape}")
    vox = tuple(float(v) for v in img.header.get_zooms()[:3])
    # C order: NIfTI data come Fortran-ordered, and a non-contiguous map makes
    # every nearest-neighbour lookup copy the whole map (reshape(-1)).
    return torch.from_numpy(np.ascontiguousarray(label_set.to_index(data))), vox


def sample_seed(seed: int, stream: int, step: int) -> int:
    """A 64-bit seed unique to (base seed, stream, step)."""
    return int(np.random.SeedSequence([seed, stream, step]).generate_state(1, np.uint64)[0])


class LabelMapDataset(IterableDataset):
    """Endless stream of ``make(index_map, voxsize, gen) -> dict`` samples.

    ``rank``/``world`` split the stream across distributed processes, DataLoader
    workers split it further; ``start`` (the resume step) shifts it. The
    training loop sets ``batch`` (the DataLoader batch size) and ``per_step``
    (DataLoader batches per optimizer step: gradient accumulation) so that
    the numbering follows training steps exactly (see the module docstring)."""

    def __init__(self, files: Sequence[str], make: Callable[[torch.Tensor, tuple, torch.Generator], Any],
                 label_set: LabelSet | None = None, seed: int = 0, start: int = 0, rank: int = 0,
                 world: int = 1, cache: bool = True):
        self.files = list(files)
        self.make = make
        self.label_set = label_set or LabelSet()
        self.seed, self.start, self.rank, self.world = seed, start, rank, world
        self.batch, self.per_step = 1, 1
        self.cache = cache
        self.device = torch.device("cpu")  # where label maps live and synthesis runs
        self._maps: dict[str, tuple[torch.Tensor, tuple]] = {}

    def label_map(self, path: str) -> tuple[torch.Tensor, tuple]:
        if path in self._maps:
            return self._maps[path]
        index_map, vox = load_index_map(path, self.label_set)
        item = (index_map.to(self.device), vox)
        if self.cache:
            self._maps[path] = item
        return item

    def sample(self, stream: int, step: int) -> Any:
        """The sample with seed ``(seed, stream, step)``: in training ``stream``
        is the rank and ``step`` the sample's index in that rank's stream."""
        gen = generator(sample_seed(self.seed, stream, step))
        path = self.files[randint(gen, 0, len(self.files) - 1)]
        index_map, vox = self.label_map(path)
        return self.make(index_map, vox, gen)

    def indices(self, worker: int = 0, workers: int = 1) -> Iterator[int]:
        """Sample indices this DataLoader worker synthesises, in order."""
        b = self.start * self.per_step + worker   # first DataLoader batch of this worker
        while True:
            yield from range(b * self.batch, (b + 1) * self.batch)
            b += workers

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        for i in self.indices(wid, nworkers):
            yield self.sample(self.rank, i)
