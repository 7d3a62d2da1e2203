"""What every recipe shares: the streaming dataset over the label maps (mixed
with real pairs when ``[real]`` lists some), the input-space metadata, the
wrapping of a training network as an inference ``Model`` (so validation runs
the exact CLI code path), real-pair samples built by the same target code as
synthetic ones, and the 2D (single-slice) pilot path."""
from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import torch

from synthtools.evaluation import data_root
from synthtools.space import ModelSpace
from synthtools.weights import Model

from ..config import Config

from ..generator.dataset import LabelMapDataset, label_map_files
from ..generator.labels import LabelSet
from ..generator.rng import randint

TRAINING_DATA = "20 whole-head label maps (SynthSeg repository, BBillot/SynthSeg, Apache-2.0)"

# Axis order of the label maps (shared/data README): synthetic images are drawn
# on their grid, so a network learns these axes (the recipes mirror axis 0 as
# left-right), and inference must conform to the same code.
LABEL_MAP_ORIENTATION = "LIA"
# Conformed dimensions are rounded up to this many voxels, which U-Nets of up
# to 5 levels (4 poolings; the recipes' default has 4 levels) divide; the
# registration recipes write their network's own multiple instead.
UNET_MULTIPLE = 16


def crop_or_pad(arrays: list[torch.Tensor], shape, gen: torch.Generator) -> list[torch.Tensor]:
    """Random crop (axes longer than ``shape``) or zero pad (shorter axes, at
    a random offset) of arrays sharing their last ``len(shape)`` dims."""
    n = len(shape)
    src, dst = [], []
    for size, want in zip(arrays[0].shape[-n:], shape):
        off = randint(gen, 0, abs(size - want))
        if size >= want:
            src.append(slice(off, off + want))
            dst.append(slice(0, want))
        else:
            src.append(slice(0, size))
            dst.append(slice(off, off + size))
    out = []
    for a in arrays:
        o = torch.zeros((*a.shape[:-n], *shape), dtype=a.dtype, device=a.device)
        o[(..., *dst)] = a[(..., *src)]
        out.append(o)
    return out


class Recipe:
    """Base class: subclasses set ``name`` and implement ``make_sample``,
    ``loss``, ``output_metadata`` and ``validate``. Recipes that implement
    ``targets(image, labels, fov, gen, lr_axis)`` (the sample dict from an
    image and an index label map) also train on real pairs
    (``make_real_sample``) and in 2D (``recipe.ndim = 2``)."""
    name = "recipe"
    task = "recipe"
    atlases_from: str | None = None   # model whose atlases an export copies (synthgen export)
    higher_is_better = True   # of the validation score (best.pt keeps the best)

    def __init__(self, cfg: Config):
        self.cfg = cfg
        # The model space, built once: real training pairs are conformed with it
        # and the exported metadata's input block is written from it.
        self.space = ModelSpace(voxsize=float(cfg.recipe.voxsize), orientation=LABEL_MAP_ORIENTATION,
                                multiple=UNET_MULTIPLE)
        self.voxsize = self.space.voxsize
        self.ndim = cfg.recipe.ndim
        if self.ndim not in (2, 3):
            raise ValueError(f"recipe.ndim must be 2 or 3, got {self.ndim}")
        self.slab = cfg.recipe.slab
        if self.slab < 0 or (self.slab and self.ndim != 2):
            raise ValueError(f"recipe.slab must be 0, or a number of slices >= 1 with recipe.ndim = 2; "
                             f"got {self.slab} with ndim {self.ndim}")
        self.in_channels = 2 * self.slab + 1   # the image channels the network reads
        self.slab_draw = cfg.recipe.slab_draw
        if self.slab_draw not in ("2d", "3d"):
            raise ValueError(f"recipe.slab_draw must be '2d' or '3d', got {self.slab_draw!r}")
        self.labels = LabelSet()
        self.real_target = cfg.real.target
        if self.real_target not in ("labels", "mask"):
            raise ValueError(f"real.target must be 'labels' or 'mask', got {self.real_target!r}")
        self._slices: dict[int, tuple] = {}

    def grid_shape(self, default) -> tuple[int, ...]:
        """``recipe.shape``; a 2D recipe takes the first two entries."""
        shape = tuple(self.cfg.recipe.shape if self.cfg.recipe.shape is not None else default)
        if self.ndim == 2:
            shape = shape[:2]
        if len(shape) != self.ndim:
            raise ValueError(f"recipe.shape {list(shape)} does not match recipe.ndim = {self.ndim}")
        return shape

    def make_sample(self, index_map: torch.Tensor, voxsize, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """One synthetic training sample: (a random slice for 2D recipes,)
        a synthetic image on the training grid, then the recipe's
        ``targets``. Recipes with another kind of sample override this."""
        if self.slab:
            return self.make_slab_sample(index_map, voxsize, gen)
        index_map, voxsize, lr_axis = self.slice_2d(index_map, voxsize, gen)
        s = self.synth(index_map, voxsize, gen, out_shape=self.shape, out_voxsize=(self.voxsize,) * self.ndim)
        return self.targets(s.image, s.labels, s.fov, gen, lr_axis)

    def make_slab_sample(self, index_map: torch.Tensor, voxsize, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """A 2.5D sample: a slab of ``2 slab + 1`` slices (the training voxel
        size apart) across a random axis, centred on a random slice that
        shows brain. The slices become the input channels (in increasing
        order along the axis) and the centre slice's labels the target.

        ``recipe.slab_draw = "3d"``: the 3D generator draws the slab, so the
        slices share one 3D deformation, one contrast and one through-plane
        blur, and the slab may lie oblique (the 3D rotations); ~45 ms per slab
        on one thread (its 3D warp). ``"2d"``: the label map's own slices,
        drawn by the 2D generator as one picture (one in-plane transform,
        contrast and corruption for all): the single-slice recipe's
        distribution plus the neighbours, ~3x its cost."""
        axis, k = self.random_slice(index_map, gen)
        if self.slab_draw == "2d":
            return self._stacked_slab_sample(index_map, voxsize, gen, axis, k)
        shape = list(self.shape)
        shape.insert(axis, 2 * self.slab + 1)
        shift = [0.0] * index_map.ndim
        shift[axis] = (k - (index_map.shape[axis] - 1) / 2) * float(voxsize[axis])
        s = self.synth(index_map, voxsize, gen, out_shape=tuple(shape), out_voxsize=(self.voxsize,) * 3,
                       shift=shift)
        image = s.image[0].movedim(axis, 0)
        labels, fov = s.labels.select(axis, self.slab), s.fov.select(axis, self.slab)
        return self.targets(image, labels, fov, gen, self.lr_axis_of_slice(axis))

    def _stacked_slab_sample(self, index_map: torch.Tensor, voxsize, gen: torch.Generator,
                             axis: int, k: int) -> dict[str, torch.Tensor]:
        step = self.voxsize / float(voxsize[axis])   # label-map slices between two neighbours
        depth = index_map.shape[axis]
        empty = torch.zeros_like(index_map.select(axis, k))
        maps = torch.stack([index_map.select(axis, i) if 0 <= i < depth else empty
                            for i in (int(round(k + j * step)) for j in range(-self.slab, self.slab + 1))])
        vox = tuple(v for a, v in enumerate(voxsize) if a != axis)
        s = self.synth.stack(maps, vox, gen, out_shape=self.shape, out_voxsize=(self.voxsize,) * 2)
        return self.targets(s.image, s.labels[self.slab], s.fov, gen, self.lr_axis_of_slice(axis))

    def dataset(self, start: int = 0, rank: int = 0, world: int = 1) -> LabelMapDataset:
        t, real = self.cfg.train, self.cfg.real
        ratio = real.ratio if real.pairs else 0.0
        if ratio and not hasattr(self, "targets"):
            raise NotImplementedError(f"recipe {self.name!r} cannot train on [real] pairs")
        if ratio >= 1:
            files = []   # real-data-only baseline: no label maps needed
        else:
            files = label_map_files(t.label_maps or str(data_root() / "label_maps"))
            if t.max_label_maps:
                files = files[: t.max_label_maps]
        kw = dict(seed=t.seed, start=start, rank=rank, world=world)
        if not ratio:
            return LabelMapDataset(files, self.make_sample, self.labels, **kw)
        from ..realdata import MixedDataset, read_pairs
        return MixedDataset(files, self.make_sample, self.labels, pairs=read_pairs(real.pairs), ratio=ratio,
                            prepare=self.prepare_real, make_real=self.real_sample, **kw)

    # ---------------------------------------------------------------- real pairs

    def prepare_real(self, image, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """Conform a real pair (``synthtools.io.Volume`` each) to the training
        voxel size (LIA, whole field of view), normalise the image like
        inference and turn the labels into an index map of the generation
        labels (``real.target = "mask"``: brain mask -> a brain label; a
        mask has one brain definition, so a skull-stripper learns it on
        every output channel)."""
        from synthtools.conform import resample
        from synthtools.infer import normalize_intensities
        if not hasattr(self, "targets"):
            raise NotImplementedError(f"recipe {self.name!r} cannot train on real pairs")
        conf = self.space.conform(image.data, image.affine, round_up=False)   # crop_or_pad fits it later
        lab = resample(np.asarray(labels.data), labels.affine, conf.affine, conf.shape, order=0)
        if self.real_target == "mask":
            brain = int(np.flatnonzero(self.labels.values == 2)[0])  # white matter: brain, not CSF
            index = np.where(lab > 0.5, brain, 0).astype(np.uint8)
        else:
            index = self.labels.to_index(lab)
        return normalize_intensities(conf.data), torch.from_numpy(index)

    def real_sample(self, prepared: tuple[torch.Tensor, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
        """A training sample from a prepared real pair: a random slice (2D;
        with its ``slab`` neighbours each side as channels, zeros past the
        grid's end as at inference), a random crop/pad to ``shape``, then
        the recipe's own targets."""
        image, index = prepared
        lr_axis = self.space.lr_axis
        if self.ndim == 2:
            axis, k = self.random_slice(index, gen)
            # Only the slab is copied (not the volume); zeros past the grid, as inference.
            lo, hi = max(k - self.slab, 0), min(k + self.slab + 1, index.shape[axis])
            pad = [0, 0] * (image.ndim - 1 - axis) + [lo - (k - self.slab), k + self.slab + 1 - hi]
            image = torch.nn.functional.pad(image.narrow(axis, lo, hi - lo), pad).movedim(axis, 0)
            index = index.select(axis, k)
            lr_axis = self.lr_axis_of_slice(axis)
        else:
            image = image[None]
        image, index = crop_or_pad([image, index], self.shape, gen)
        fov = torch.ones(index.shape, dtype=torch.bool)
        return self.targets(image, index, fov, gen, lr_axis)

    def make_real_sample(self, image, labels, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """The same dict as ``make_sample``, from a real (image, labels) pair."""
        return self.real_sample(self.prepare_real(image, labels), gen)

    # ---------------------------------------------------------------- 2D path

    def random_slice(self, index_map: torch.Tensor, gen: torch.Generator) -> tuple[int, int]:
        """A random axis and a random slice along it that shows brain."""
        ref = self._slices.get(id(index_map))
        if ref is None or ref[0]() is not index_map:
            lut = self.labels.brain_lut(csf=True).numpy().astype(bool)
            brain = lut[index_map.cpu().numpy()]
            axes = []
            for ax in range(3):
                others = tuple(a for a in range(3) if a != ax)
                hit = np.flatnonzero(brain.any(axis=others))
                axes.append(hit if len(hit) else np.arange(index_map.shape[ax]))
            ref = (weakref.ref(index_map), axes)
            self._slices[id(index_map)] = ref
        axis = randint(gen, 0, 2)
        hit = ref[1][axis]
        return axis, int(hit[randint(gen, 0, len(hit) - 1)])

    def slice_2d(self, index_map: torch.Tensor, voxsize, gen: torch.Generator):
        """(map, voxsize, lr_axis) to synthesise from: the 3D map unchanged
        for 3D recipes; a random slice (random axis, showing brain) for 2D
        ones. ``lr_axis``: the sample axis that runs left-right (None for
        sagittal slices). 3D recipes draw no random numbers here."""
        if self.ndim == 3:
            return index_map, tuple(voxsize), self.space.lr_axis
        axis, k = self.random_slice(index_map, gen)
        vox = tuple(v for a, v in enumerate(voxsize) if a != axis)
        return index_map.select(axis, k).contiguous(), vox, self.lr_axis_of_slice(axis)

    def lr_axis_of_slice(self, axis: int) -> int | None:
        """The left-right axis of a 2D slice cut across ``axis`` of the
        model space's grid (None: a sagittal slice has no left and right)."""
        lr = self.space.lr_axis
        return None if axis == lr else lr - (lr > axis)

    # ---------------------------------------------------------------- validation

    def output_metadata(self) -> dict[str, Any]:
        raise NotImplementedError

    def model_space(self) -> ModelSpace:
        """The space the exported model declares (and is run in)."""
        return self.space

    def metadata(self) -> dict[str, Any]:
        """What inference needs: input space, output type, provenance."""
        return {
            "task": self.task,
            "input": self.model_space().to_meta(),
            "output": self.output_metadata(),
            "inference": self.inference_metadata(),
            "data": TRAINING_DATA,
        }

    def inference_metadata(self) -> dict[str, Any]:
        """How inference runs the network: a 2D network slice by slice along
        all three axes, fused (``slice_axes``); a 3D network with instance
        normalisation on windows of its training crop (``patch``, voxels),
        so its statistics match training; ``[inference]`` in the config
        overrides either. A 2D network runs in bf16 where the CPU has it: on
        a 128^3 head its three-axis fusion took 20.2 s in fp32 and 9.4 s in
        bf16 on one thread, with 99.97 % of the voxels' labels unchanged
        (the 3D networks stay fp32: 99.76 %)."""
        out: dict[str, Any] = {"bf16": self.ndim == 2}
        if self.ndim == 2:
            out["slice_axes"] = [0, 1, 2]
            if self.slab:
                out["slab"] = self.slab
        elif self.cfg.model.norm == "instance":
            out["patch"] = list(self.grid_shape((64, 64, 64)))
        opts = self.cfg.inference   # the registration options are the linear recipe's (register.py)
        out.update({k: list(v) if isinstance(v, tuple) else v
                    for k, v in (("bf16", opts.bf16), ("slice_axes", opts.slice_axes), ("patch", opts.patch),
                                 ("refine_background", opts.refine_background))
                    if v is not None})
        return out

    def as_model(self, net: torch.nn.Module) -> Model:
        meta = self.metadata()
        meta["architecture"] = dict(type="unet", **net.config)
        return Model(net, meta, path=None)

    def validation_cases(self, all_cases: list) -> list:
        names = self.cfg.validation.cases
        return [c for c in all_cases if names is None or c.name in names]

    def validation_pairs(self) -> list:
        """The user's labelled sets of ``[validation] real_pairs`` (CSV:
        image,labels,domain[,name])."""
        path = self.cfg.validation.real_pairs
        if not path:
            return []
        from ..realdata import read_pairs
        return read_pairs(path, need_domain=True)

    def validation_target(self) -> str:
        target = self.cfg.validation.target
        return target if target is not None else self.real_target

    def validation_groups(self, cases: list, pairs: list) -> dict[str, str]:
        """Case name -> group (``[validation] group_by``: contrast or site;
        real pairs: their domain)."""
        from ..realdata import case_group
        by = self.cfg.validation.group_by
        groups = {c.name: case_group(c, by) for c in cases}
        groups.update({p.name: p.domain for p in pairs})
        return groups
