"""The generative model g(s, z) -> (x, s_x) of the paper, composed from the
steps in this package, in the paper's order:

  spatial (Phi = phi o A, one nearest-neighbour resampling of the labels)
  -> partial FOV mask -> GMM intensities -> bias -> blur -> noise -> gamma
  -> downsampling -> cropping -> slice clearing -> simulated skull-stripping.

Defaults are Table II's starter ranges in physical units (mm, fractions); the
voxel size of the grid converts them. Every sample is drawn from its own
``torch.Generator``: one seed, one sample, on any device.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .corrupt import BiasField, Blur, ClearSlices, Downsample, Gamma, Noise, RandomFOV, SkullStrip
from .intensity import RandomGMM
from .spatial import RandomAffine, RandomWarp, Transform, nearest, sample_transform


def generator(seed: int) -> torch.Generator:
    """A CPU random generator for one sample (CPU so results match across devices)."""
    g = torch.Generator()
    g.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return g


@dataclass
class SynthConfig:
    """All generator ranges. Build from a nested dict (a TOML table) with
    ``SynthConfig.from_dict``; ``maximal()`` and ``identity()`` give the two
    extremes used for previews and tests."""
    affine: RandomAffine = field(default_factory=RandomAffine)
    warp: RandomWarp = field(default_factory=RandomWarp)
    fov: RandomFOV = field(default_factory=RandomFOV)
    gmm: RandomGMM = field(default_factory=RandomGMM)
    bias: BiasField = field(default_factory=BiasField)
    blur: Blur = field(default_factory=Blur)
    noise: Noise = field(default_factory=Noise)
    gamma: Gamma = field(default_factory=Gamma)
    downsample: Downsample = field(default_factory=Downsample)
    clear: ClearSlices = field(default_factory=ClearSlices)
    strip: SkullStrip = field(default_factory=SkullStrip)
    crop_labels: bool = False  # return target labels multiplied by the FOV mask

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "SynthConfig":
        cfg = cls()
        for key, value in (d or {}).items():
            if key not in {f.name for f in dataclasses.fields(cls)}:
                raise ValueError(f"unknown generator section {key!r}")
            current = getattr(cfg, key)
            if dataclasses.is_dataclass(current):
                names = {f.name for f in dataclasses.fields(current)}
                bad = set(value) - names
                if bad:
                    raise ValueError(f"unknown option(s) {sorted(bad)} in generator section {key!r}")
                fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
                setattr(cfg, key, dataclasses.replace(current, **fixed))
            else:
                setattr(cfg, key, value)
        return cfg

    def with_label_values(self, values: Sequence[int]) -> "SynthConfig":
        """A copy whose GMM knows the label value of each index (for its
        CT-like draws, which single out bone and intracranial labels)."""
        return dataclasses.replace(self, gmm=dataclasses.replace(self.gmm, values=tuple(int(v) for v in values)))

    def maximal(self) -> "SynthConfig":
        """Every range at its upper bound and every step always applied: the
        strongest effect of each step (the paper's habit for previews)."""
        cfg = copy.deepcopy(self)
        for f in dataclasses.fields(cfg):
            step = getattr(cfg, f.name)
            if not dataclasses.is_dataclass(step):
                continue
            for g in dataclasses.fields(step):
                v = getattr(step, g.name)
                if isinstance(v, tuple) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v):
                    setattr(step, g.name, (v[1], v[1]))
                elif g.name == "prob":
                    setattr(step, g.name, 1.0)
        return cfg

    @classmethod
    def identity(cls) -> "SynthConfig":
        """No spatial change and no corruption: the output is the min-max
        normalised GMM image of the input labels."""
        return cls(affine=RandomAffine((0, 0), (0, 0), (1, 1), (0, 0)), warp=RandomWarp(strength=(0, 0)),
                   fov=RandomFOV((0, 0)), bias=BiasField((0, 0)), blur=Blur((0, 0)), noise=Noise((0, 0)),
                   gamma=Gamma((1, 1)), downsample=Downsample((0, 0)), clear=ClearSlices(prob=0),
                   strip=SkullStrip(prob=0))


@dataclass
class Sample:
    image: torch.Tensor        # (1, *S) float32 in [0, 1]
    labels: torch.Tensor       # (*S) uint8 index map (FOV-cropped if crop_labels)
    fov: torch.Tensor          # (*S) bool, False where the partial FOV removed content
    transform: Transform       # output grid -> input label-map grid


class Synthesizer:
    """Callable generator: ``Synthesizer(cfg)(index_map, voxsize, gen)``."""

    def __init__(self, config: SynthConfig | None = None, num_labels: int | None = None,
                 brain_lut: torch.Tensor | None = None):
        self.config = config or SynthConfig()
        self.num_labels = num_labels
        self.brain_lut = brain_lut  # index -> 1 for brain, for simulated skull-stripping

    def spatial(self, index_map: torch.Tensor, voxsize: Sequence[float], gen: torch.Generator,
                out_shape=None, out_voxsize=None, shift: Sequence[float] | None = None
                ) -> tuple[torch.Tensor, Transform]:
        """Warp the label map once (nearest neighbour) onto the output grid.
        ``shift`` (mm per input axis) moves the point the output grid's
        centre samples away from the input's centre (on top of the random
        translation): a thin output slab then cuts the anatomy where asked."""
        c = self.config
        t = sample_transform(index_map.shape, voxsize, gen, c.affine, c.warp, out_shape, out_voxsize,
                             index_map.device)
        if shift is not None:
            n = len(t.in_shape)
            t.matrix[:n, n] += torch.tensor([float(v) for v in shift], dtype=t.matrix.dtype)
        return nearest(index_map, t.coords(index_map.device)), t

    def image(self, labels: torch.Tensor, voxsize: Sequence[float], gen: torch.Generator,
              fov: torch.Tensor | None = None, channels: bool = False) -> torch.Tensor:
        """Synthesise a corrupted image (1, *S) from an (already warped) index
        map; with ``channels``, (C, *S) from C maps (C, *S) of one grid, all
        drawn with one contrast and one set of corruptions."""
        c = self.config
        num = self.num_labels or int(labels.max()) + 1
        x = c.gmm(labels, num, gen)
        x = x if channels else x[None]
        x = c.bias(x, gen)
        x = c.blur(x, voxsize, gen)
        x = c.noise(x, gen)
        x = c.gamma(x, gen)
        x = c.downsample(x, voxsize, gen)
        if fov is not None:
            x = x * fov
        x = c.clear(x, gen)
        brain = self.brain_lut.to(labels.device)[labels.long()] if self.brain_lut is not None else None
        return c.strip(x, brain, gen).clamp(0, 1)

    def stack(self, index_maps: torch.Tensor, voxsize: Sequence[float], gen: torch.Generator,
              out_shape=None, out_voxsize=None) -> Sample:
        """C parallel maps (C, *S) drawn as one picture of C channels: one
        transform of their shared grid, one contrast, one set of corruptions
        (neighbouring 2D slices of a scan). ``labels`` is (C, *S_out)."""
        c = self.config
        device = index_maps.device
        t = sample_transform(index_maps.shape[1:], voxsize, gen, c.affine, c.warp, out_shape, out_voxsize, device)
        coords = t.coords(device)
        labels = torch.stack([nearest(m, coords) for m in index_maps])
        fov = c.fov(labels.shape[1:], gen, device)
        image = self.image(labels, t.out_voxsize, gen, fov, channels=True)
        if c.crop_labels:
            labels = labels * fov
        return Sample(image, labels, fov, t)

    def __call__(self, index_map: torch.Tensor, voxsize: Sequence[float], gen: torch.Generator,
                 out_shape=None, out_voxsize=None, shift: Sequence[float] | None = None) -> Sample:
        labels, t = self.spatial(index_map, voxsize, gen, out_shape, out_voxsize, shift)
        vox = t.out_voxsize
        fov = self.config.fov(labels.shape, gen, labels.device)
        image = self.image(labels, vox, gen, fov)
        if self.config.crop_labels:
            labels = labels * fov
        return Sample(image, labels, fov, t)
