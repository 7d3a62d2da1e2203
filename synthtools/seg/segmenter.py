"""Whole-brain segmentation: image in, FreeSurfer label map, posteriors and
volumes out, on the input's native grid (or on the network's grid).

Native-resolution labels come from the posteriors, never from a label map:
the network's softmax on its ~1 mm grid is mapped to the native grid with
trilinear interpolation, then the argmax is taken there. The mapping runs a
few channels at a time while keeping a running maximum and argmax, so no
native (X, Y, Z, C) array exists unless the posteriors are asked for (33
float32 channels of a 256^3 grid are 2.2 GB).

Model metadata (written by the training recipe)::

    {"task": "segment",
     "input": {"voxsize": 1.0, "orientation": "LIA", "multiple": 16},
     "output": {"type": "softmax", "labels": [0, 2, 3, ...], "names": [...]},
     "inference": {"bf16": false},
     "atlas": {"files": ["atlas_01.nii.gz", ...], "default": 3, "alpha": 0.05,
               "registration": "synthmorph-affine"}}       # optional (synthtools.seg.atlas)

``output.labels`` gives the FreeSurfer value of each output channel.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from ..conform import Conformed
from ..infer import normalize_intensities, predict
from ..io import Volume
from ..space import ModelSpace
from ..weights import Model, ModelError
from .coords import world_coords
from .lut import names_for, twin
from .refine import refine_posteriors

__all__ = ["SegResult", "GridSummary", "segment", "volumes", "total_intracranial", "qc_scores",
           "QC_GROUPS", "flip_permutation", "crop_conformed", "label_values", "twin_groups",
           "intensity_groups", "CSF_LABELS"]

# Voxels whose background posterior is below this get the intensity refinement;
# the rest (far outside the head or brain) keep the network's posteriors.
REFINE_BELOW = 0.999

# The refinement's prior enters as prior^PRIOR_POWER: the network x atlas prior is surer than it
# is right, and the image should move its boundaries more. Measured with 3 atlases (session 18,
# runs/README.md; chosen on the benchmark cases, there is no other labelled set): 1.0 / 0.75 /
# 0.6 / 0.5 / 0.4 gave vxm mean Dice 0.7652 / 0.7677 / 0.7679 / 0.7665 / 0.7615, BrainWeb tissue
# mean T1 0.909 / 0.914 / 0.917 / 0.919 / 0.920 (T2, PD alike); without atlases 0.6 changes the
# vxm mean by -0.0002 and lifts its large structures +0.005 and BrainWeb +0.002-0.003.
PRIOR_POWER = 0.6

# Which voxels the refinement's background histogram is fitted on (a model's
# metadata "inference.refine_background"): "region", the refined voxels only,
# weighted by their background posterior (the shipped network's setting);
# "all", also every voxel outside the region, where the background wins
# anyway. A sharp network leaves few background voxels in the region, mostly
# at the brain's edge, and their histogram then reaches into CSF/grey matter
# intensities; the outside voxels restore the background's real distribution.
# Measured in runs/README.md (session 24).
REFINE_BACKGROUND = ("region", "all")

# Labels that hold cerebrospinal fluid: the refinement fits them one shared
# Gaussian. On its own a small compartment's Gaussian drifts to the mean of the
# partial-volume voxels its soft prior covers, and its fluid voxels go to a
# neighbouring compartment: with separate Gaussians the inferior lateral
# ventricles scored Dice 0.02 / 0.02 on voxelmorph T1 without atlases (the
# network alone 0.08 / 0.36); shared, 0.39 / 0.73, the vxm mean 0.711 -> 0.748
# (shipped network 0.734 -> 0.755; with 3 atlases 0.768 -> 0.788), BrainWeb
# tissue Dice within +-0.002 (runs/README.md, session 25).
CSF_LABELS = frozenset({4, 5, 14, 15, 24, 43, 44})

# Channels resampled to the native grid per step: bounds the temporary
# native array to CHUNK * X * Y * Z float32 (268 MB for 256^3).
CHUNK = 4

# Structure groups of the QC score (FreeSurfer values; groups whose labels a
# model lacks are left out).
QC_GROUPS: dict[str, tuple[int, ...]] = {
    "white-matter": (2, 41),
    "cortex": (3, 42),
    "ventricles-csf": (4, 5, 14, 15, 24, 43, 44),
    "cerebellum": (7, 8, 46, 47),
    "brain-stem": (16,),
    "thalamus": (10, 49),
    "basal-ganglia": (11, 12, 13, 26, 50, 51, 52, 58),
    "hippocampus-amygdala": (17, 18, 53, 54),
    "ventral-dc": (28, 60),
}


@dataclass
class GridSummary:
    """Per-channel totals over one voxel grid, gathered while labelling it.

    ``posterior_sums``: sum of each channel's posterior over the grid (in
    voxels); ``counts``: voxels whose hard label is the channel;
    ``confidence_sums``: sum of the maximum posterior over those voxels;
    ``voxel_volume``: mm^3 per voxel.
    """

    posterior_sums: np.ndarray
    counts: np.ndarray
    confidence_sums: np.ndarray
    voxel_volume: float

    @property
    def soft_volumes(self) -> np.ndarray:
        """(C,) soft volumes in mm^3: sum of posteriors times voxel volume."""
        return volumes(self.posterior_sums, self.voxel_volume)


@dataclass
class SegResult:
    """Segmentation of one image.

    ``labels``: (X, Y, Z) int32 FreeSurfer values on the native grid;
    ``native``: its :class:`GridSummary` (soft volumes, QC);
    ``conformed``: the network's grid (``conformed.data`` is the normalised
    image it saw, ``conformed.affine`` its voxel->world matrix in mm);
    ``conformed_posteriors``: (C, X', Y', Z') float32 softmax on that grid.
    ``posteriors`` (native, channel-last) is computed on first use unless
    :func:`segment` was asked for it. After ``refine``, both grids hold the
    refined posteriors, each refined with its own grid's image;
    ``network_posteriors`` keeps the network's softmax.
    """

    label_values: np.ndarray
    names: list[str]
    labels: np.ndarray
    native: GridSummary
    conformed: Conformed
    _conformed_posteriors: torch.Tensor | None = field(default=None, repr=False)
    _posteriors: np.ndarray | None = field(default=None, repr=False)
    _conformed_summary: GridSummary | None = field(default=None, repr=False)
    network_posteriors: torch.Tensor | None = field(default=None, repr=False)
    _native_image: np.ndarray | None = field(default=None, repr=False)
    _bias_field: bool = field(default=True, repr=False)
    _prior: torch.Tensor | None = field(default=None, repr=False)   # conformed prior to refine lazily
    _atlas: Any = field(default=None, repr=False)                   # synthtools.seg.atlas.AtlasPrior
    _background: str = field(default="region", repr=False)          # see REFINE_BACKGROUND

    @property
    def atlases_used(self) -> int:
        """Atlases in the prior: 0 when none were asked for, or the registration found no brain."""
        return 0 if self._atlas is None else len(self._atlas.atlases)

    @property
    def conformed_posteriors(self) -> torch.Tensor:
        """(C, X', Y', Z') float32 posteriors on the network's grid (after
        ``refine``: refined with the conformed image on first use, which
        only --keep-conformed needs)."""
        if self._conformed_posteriors is None:
            with torch.inference_mode():   # as in segment(): its tensors are inference tensors
                self._conformed_posteriors = _refine_conformed(self.conformed, self._prior, self.label_values,
                                                               self._bias_field, self._background)
            self._prior = None
        return self._conformed_posteriors

    @property
    def volumes(self) -> np.ndarray:
        """(C,) soft volumes (mm^3) on the native grid, in channel order."""
        return self.native.soft_volumes

    @property
    def posteriors(self) -> np.ndarray:
        """(X, Y, Z, C) float32 posteriors on the native grid (linear interpolation)."""
        if self._posteriors is None and self._native_image is not None:
            self._posteriors = _refine_native(self.conformed, self.network_posteriors, self.label_values,
                                              keep=True, image=self._native_image,
                                              bias_field=self._bias_field, atlas=self._atlas,
                                              background=self._background)[2]
        elif self._posteriors is None:
            self._posteriors = _map_to_native(self.conformed, self.conformed_posteriors,
                                              self.label_values, keep=True)[2]
        return self._posteriors

    @property
    def affine(self) -> np.ndarray:
        """Voxel->world matrix (mm) of the network's grid."""
        return self.conformed.affine

    @property
    def image(self) -> np.ndarray:
        """(X', Y', Z') float32 normalised image that the network saw."""
        return self.conformed.data.numpy()

    @property
    def conformed_labels(self) -> np.ndarray:
        """(X', Y', Z') int32 FreeSurfer values on the network's grid."""
        return self.label_values[self.conformed_posteriors.argmax(0).numpy()]

    @property
    def conformed_summary(self) -> GridSummary:
        """:class:`GridSummary` of the network's grid (for --keep-conformed)."""
        if self._conformed_summary is None:
            p = self.conformed_posteriors
            best, arg = p.max(0)
            self._conformed_summary = _summary(p.sum(dim=(1, 2, 3), dtype=torch.float64).numpy(),
                                               arg.numpy(), best.numpy(), len(self.label_values),
                                               _voxel_volume(self.conformed.affine))
        return self._conformed_summary


# ------------------------------------------------------------- helpers --

def label_values(model: Model) -> np.ndarray:
    """(C,) int32 FreeSurfer value of each output channel, from the metadata."""
    return np.asarray(model.meta["output"]["labels"], dtype=np.int32)


def flip_permutation(values: Sequence[int]) -> np.ndarray:
    """Channel index of each channel's left/right twin (itself on the midline):
    ``posteriors[perm]`` swaps the hemispheres' labels."""
    pos = {int(v): k for k, v in enumerate(values)}
    return np.array([pos.get(twin(int(v)), k) for k, v in enumerate(values)], dtype=np.int64)


def twin_groups(values: Sequence[int]) -> np.ndarray:
    """Channel -> group id shared by left/right twins (the lower channel index)."""
    return np.minimum(np.arange(len(values)), flip_permutation(values))


def intensity_groups(values: Sequence[int]) -> np.ndarray:
    """Channel -> group id of the refinement's shared Gaussians (the lowest
    channel index of the group): left/right twins, and every compartment of
    :data:`CSF_LABELS` together (one fluid, one intensity, as SAMSEG ties them)."""
    groups = twin_groups(values)
    csf = [k for k, v in enumerate(values) if int(v) in CSF_LABELS]
    if csf:
        groups[csf] = min(csf)
    return groups


def _voxel_volume(affine: np.ndarray) -> float:
    return float(abs(np.linalg.det(np.asarray(affine, np.float64)[:3, :3])))


def crop_conformed(conf: Conformed, size: int | Sequence[int], multiple: int | None = None) -> Conformed:
    """Centre crop of a conformed image to ``size`` voxels (one size or three),
    each rounded up to ``multiple`` and never beyond the image. The affine
    follows, so results still map back to the native grid."""
    want = np.broadcast_to(np.asarray(size, dtype=np.int64), (3,))
    if np.any(want < 1):
        raise ValueError(f"crop size must be positive, got {size}")
    m = int(multiple) if multiple else 1
    full = np.array(conf.shape)
    n = np.minimum(-(-want // m) * m, full)
    start = (full - n) // 2
    sl = tuple(slice(int(s), int(s + k)) for s, k in zip(start, n))
    shift = np.eye(4)
    shift[:3, 3] = start
    return Conformed(data=conf.data[(...,) + sl].contiguous(), affine=conf.affine @ shift,
                     native_affine=conf.native_affine, native_shape=conf.native_shape)


def _softmax_(logits: torch.Tensor, step: int = 4) -> torch.Tensor:
    """In-place softmax over channels (dim 0), ``step`` slices of dim 1 at a
    time: no second full-size array (2.2 GB at 256^3), and each block stays
    in cache (3x faster than max, exp and sum over the whole array)."""
    for i in range(0, logits.shape[1], step):
        block = logits[:, i:i + step]
        block.copy_(torch.softmax(block, dim=0))
    return logits


def _channel_runs(n: int, fills: np.ndarray, chunk: int) -> Iterator[tuple[int, int]]:
    """Consecutive channel ranges of at most ``chunk`` channels sharing one fill value."""
    c0 = 0
    while c0 < n:
        c1 = c0 + 1
        while c1 < n and c1 - c0 < chunk and fills[c1] == fills[c0]:
            c1 += 1
        yield c0, c1
        c0 = c1


def _summary(post_sums: np.ndarray, arg: np.ndarray, best: np.ndarray, n: int,
             voxel_volume: float) -> GridSummary:
    flat = arg.ravel()
    return GridSummary(posterior_sums=np.asarray(post_sums, np.float64),
                       counts=np.bincount(flat, minlength=n).astype(np.int64),
                       confidence_sums=np.bincount(flat, weights=best.ravel(), minlength=n),
                       voxel_volume=voxel_volume)


def _native_channels(conf: Conformed, prob: torch.Tensor, values: np.ndarray, chunk: int = CHUNK,
                     skip: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(channel, its posterior on the native grid) for every channel, a few
    channels resampled at a time. Native voxels outside the conformed grid
    are background: posterior 1 for label 0, 0 for the others. ``skip``: a
    channel the caller has already resampled (left out when it forms a run
    of its own, as the background does)."""
    fills = (values == 0).astype(np.float32)
    for c0, c1 in _channel_runs(prob.shape[0], fills, chunk):
        if skip is not None and (c0, c1) == (skip, skip + 1):
            continue
        nat = conf.to_native(prob[c0:c1], order=1, fill=float(fills[c0]))
        # The background fill is applied as a shift (p - 1, then + 1): undo its rounding below 0.
        np.clip(nat, 0.0, 1.0, out=nat)
        for k in range(c1 - c0):
            yield c0 + k, nat[k]
        del nat


def _background_channel(values: np.ndarray) -> int:
    return int(np.flatnonzero(values == 0)[0]) if np.any(values == 0) else 0


def _map_to_native(conf: Conformed, prob: torch.Tensor, values: np.ndarray, keep: bool,
                   chunk: int = CHUNK) -> tuple[np.ndarray, GridSummary, np.ndarray | None]:
    """Posteriors to the native grid, a few channels at a time.

    Returns the native channel index of the maximum posterior, the grid's
    :class:`GridSummary`, and (if ``keep``) the (X, Y, Z, C) posteriors.
    Native voxels outside the conformed grid (possible after a crop) are
    background: posterior 1 for label 0, 0 for the others.
    """
    n = prob.shape[0]
    shape = tuple(conf.native_shape)
    best = np.full(shape, -np.inf, dtype=np.float32)
    arg = np.zeros(shape, dtype=np.uint8 if n <= 256 else np.int32)
    better = np.empty(shape, dtype=bool)
    sums = np.zeros(n, dtype=np.float64)
    post = np.empty(shape + (n,), dtype=np.float32) if keep else None
    for c, p in _native_channels(conf, prob, values, chunk):
        # Strict '>': ties keep the lower channel, as np.argmax does.
        np.greater(p, best, out=better)
        np.copyto(best, p, where=better)
        np.copyto(arg, c, where=better)
        sums[c] = p.sum(dtype=np.float64)
        if post is not None:
            post[..., c] = p
    summary = _summary(sums, arg, best, n, _voxel_volume(conf.native_affine))
    return arg, summary, post


def _refine_native(conf: Conformed, prob: torch.Tensor, values: np.ndarray, keep: bool, image: np.ndarray,
                   bias_field: bool = True, chunk: int = CHUNK, atlas=None,
                   background: str = "region") -> tuple[np.ndarray, GridSummary, np.ndarray | None]:
    """:func:`_map_to_native`, then :func:`refine_posteriors` with the native
    ``image`` on the voxels whose background posterior is below
    ``REFINE_BELOW`` (outside them the background wins anyway), with a bias
    field unless ``bias_field`` is False. ``atlas``: a
    :class:`synthtools.seg.atlas.AtlasPrior` whose atlases' labels at the native
    voxels multiply the prior there first (``prob`` is then the network's
    alone). ``background``: see :data:`REFINE_BACKGROUND`."""
    n = prob.shape[0]
    shape = tuple(conf.native_shape)
    bg = _background_channel(values)
    # Outside the region the background wins, so its posterior is the maximum there.
    best = np.clip(conf.to_native(prob[bg:bg + 1], order=1, fill=1.0)[0], 0.0, 1.0)
    region = best < REFINE_BELOW
    outside = ~region
    prior = np.empty((int(region.sum()), n), dtype=np.float32)
    sums = np.zeros(n, dtype=np.float64)
    post = np.empty(shape + (n,), dtype=np.float32) if keep else None
    for c, p in itertools.chain([(bg, best)], _native_channels(conf, prob, values, chunk, skip=bg)):
        prior[:, c] = p[region]
        sums[c] = p[outside].sum(dtype=np.float64)
        if post is not None:
            post[..., c] = p
    if atlas is not None:   # (N, C) rows: apply_prior works on (C, ...), so on the transposed views
        from .atlas import apply_prior
        apply_prior(torch.from_numpy(prior).T, atlas.native_fractions(region, conf.native_affine).T, atlas.alpha)
    coords = world_coords(region, conf.native_affine) if bias_field else None
    known = torch.from_numpy(image[outside].astype(np.float32)) if background == "all" else None
    refined = refine_posteriors(torch.from_numpy(prior), torch.from_numpy(image[region].astype(np.float32)),
                                background=bg, inplace=True, groups=intensity_groups(values), coords=coords,
                                prior_power=PRIOR_POWER, background_sample=known).numpy()
    del known
    del coords
    sums += refined.sum(0, dtype=np.float64)
    arg = np.full(shape, bg, dtype=np.uint8 if n <= 256 else np.int32)
    arg[region] = refined.argmax(1)
    best[region] = refined.max(1)
    if post is not None:
        post[region] = refined
    summary = _summary(sums, arg, best, n, _voxel_volume(conf.native_affine))
    return arg, summary, post


def _refine_conformed(conf: Conformed, prob: torch.Tensor, values: np.ndarray,
                      bias_field: bool = True, background: str = "region") -> torch.Tensor:
    """The network-grid posteriors refined with the conformed image (a copy)."""
    bg = _background_channel(values)
    out = prob.clone()
    region = prob[bg] < REFINE_BELOW
    coords = world_coords(region.numpy(), conf.affine) if bias_field else None
    known = conf.data[~region] if background == "all" else None
    out[:, region] = refine_posteriors(prob[:, region].T.contiguous(), conf.data[region], background=bg,
                                       groups=intensity_groups(values), coords=coords, prior_power=PRIOR_POWER,
                                       background_sample=known).T
    return out


# ---------------------------------------------------------------- main --

@torch.inference_mode()  # predict() returns inference tensors; the softmax updates them in place
def segment(model: Model, volume: Volume, frame: int | None = None, *, flip: bool = False,
            crop: int | Sequence[int] | None = None, posteriors: bool = False,
            refine: bool = False, bias_field: bool = True, atlases: int = 0,
            atlas_alpha: float | None = None, progress: Callable[[str], None] | None = None) -> SegResult:
    """Segment a 3D image (or one ``frame`` of a 4D image).

    Steps: conform (trilinear) to the model's space, optional centre ``crop``
    (voxels of that space, rounded up to its multiple), normalise
    intensities, predict, softmax on the network grid, map the posteriors to
    the native grid (trilinear) and take the argmax there. ``flip``: also
    predict on the left-right mirrored image and average the two softmaxes,
    the mirrored one mirrored back with its left/right channels swapped.
    ``posteriors``: build the native (X, Y, Z, C) posteriors in the same pass
    (otherwise :attr:`SegResult.posteriors` computes them on first use).
    ``refine``: take the network's posteriors as a spatial prior (raised to
    ``PRIOR_POWER``) and refine them with an intensity model fitted to this
    image (:mod:`.refine`), on
    the native grid with the native image and on the network's grid with
    the image it saw; ``bias_field`` (with ``refine``): fit a smooth
    multiplicative intensity field along with it. ``atlases``: multiply
    the posteriors by the label fractions of the model's first ``atlases``
    atlases registered to the image (:mod:`.atlas`; weight ``atlas_alpha``,
    default the model's) before the refinement; where the registration
    finds no brain they are skipped (``SegResult.atlases_used`` is 0).
    ``progress(stage)``, if given, is called as each stage ends (the CLI
    prints its time).
    """
    progress = progress or (lambda stage: None)
    data = volume.data if frame is None else volume.data[..., frame]
    if data.ndim != 3:
        raise ValueError(f"a 3D image (or frame) is required, got shape {tuple(data.shape)}")
    space = ModelSpace.of(model)
    values = label_values(model)
    conf = space.conform(data, volume.affine)
    if crop is not None:
        conf = crop_conformed(conf, crop, space.multiple)
    conf.data = normalize_intensities(conf.data)
    progress("conformed to the model's space")

    prob = _softmax_(predict(model, conf.data[None]))
    if prob.shape[0] != len(values):
        raise ValueError(f"model outputs {prob.shape[0]} channels but its metadata lists "
                         f"{len(values)} labels")
    if flip:
        axis = space.lr_axis
        mirrored = _softmax_(predict(model, conf.data.flip(axis)[None]))
        # Channel j at x is "label j": in the mirrored run that is its twin at
        # the mirror voxel. Channel by channel: flipping or permuting the
        # whole array would copy it (2.2 GB at 256^3).
        for j, k in enumerate(flip_permutation(values)):
            prob[j] += mirrored[int(k)].flip(axis)
        prob *= 0.5
        del mirrored
    progress("network" + (" (with the mirrored image)" if flip else ""))
    network, atlas = prob, None
    if atlases:
        from .atlas import apply_prior
        from ..morph.svf_fit import EmptyMaskError
        try:
            atlas = _atlas_prior(model, conf, values, atlases, atlas_alpha)
            prob = apply_prior(prob.clone(), atlas.fractions, atlas.alpha)
        except EmptyMaskError:   # nothing brain-like to register to: the network's prior alone
            atlas = None
        progress(f"registered {atlases} atlas{'es' if atlases != 1 else ''}")

    names = [str(n) for n in model.meta["output"].get("names") or names_for(values)]
    if not refine:
        arg, summary, post = _map_to_native(conf, prob, values, keep=posteriors)
        progress("labels on the native grid")
        return SegResult(label_values=values, names=names, labels=values[arg], native=summary,
                         conformed=conf, _conformed_posteriors=prob, _posteriors=post, network_posteriors=network,
                         _atlas=atlas)
    image = np.asarray(data, dtype=np.float32)
    background = refine_background(model)
    arg, summary, post = _refine_native(conf, network, values, keep=posteriors, image=image, bias_field=bias_field,
                                        atlas=atlas, background=background)
    progress("intensity refinement on the native grid")
    return SegResult(label_values=values, names=names, labels=values[arg], native=summary, conformed=conf,
                     _posteriors=post, network_posteriors=network, _native_image=image, _bias_field=bias_field,
                     _prior=prob, _atlas=atlas, _background=background)


def refine_background(model: Model) -> str:
    """The model's :data:`REFINE_BACKGROUND` choice (metadata
    ``inference.refine_background``; "region" when absent)."""
    choice = (model.meta.get("inference") or {}).get("refine_background") or "region"
    if choice not in REFINE_BACKGROUND:
        raise ModelError(f"{model.path}: inference.refine_background must be one of "
                         f"{', '.join(REFINE_BACKGROUND)}, got {choice!r}")
    return choice


def _atlas_prior(model: Model, conf: Conformed, values: np.ndarray, n: int, alpha: float | None):
    """The model's first ``n`` atlases moved onto ``conf``'s image
    (:func:`synthtools.seg.atlas.move_atlases`)."""
    from .atlas import DEFAULT_ALPHA, atlas_files, move_atlases
    files = atlas_files(model)
    if n < 0 or n > len(files):
        raise ValueError(f"atlases must be 0..{len(files)} for this model, got {n}")
    spec = model.meta.get("atlas") or {}
    alpha = float(spec.get("alpha", DEFAULT_ALPHA) if alpha is None else alpha)
    with torch.inference_mode(False):   # segment() runs in inference mode; the fit needs gradients
        return move_atlases(Volume(conf.data.numpy().copy(), conf.affine), values, files[:n],
                            registration=spec.get("registration", "synthmorph-affine"), alpha=alpha)


# ------------------------------------------------------------- volumes --

def volumes(posteriors_or_sums: np.ndarray, voxel_volume: float) -> np.ndarray:
    """Soft volume of each structure in mm^3: the sum of its posterior over
    the grid times the voxel volume (mm^3). Takes (X, Y, Z, C) posteriors or
    the (C,) per-channel sums gathered during the native mapping."""
    a = np.asarray(posteriors_or_sums)
    sums = a.astype(np.float64) if a.ndim == 1 else a.reshape(-1, a.shape[-1]).sum(0, dtype=np.float64)
    return sums * float(voxel_volume)


def total_intracranial(soft_volumes: np.ndarray, values: Sequence[int]) -> float:
    """Total intracranial volume (mm^3): the soft volumes of all non-background
    labels summed. With the SynthSeg labels this is brain tissue, ventricles
    and the CSF label (which covers the extra-cerebral CSF), i.e. everything
    inside the skull; parts cut by the field of view or ``crop`` are missing."""
    v = np.asarray(soft_volumes, np.float64)
    return float(v[np.asarray(values) != 0].sum())


def qc_scores(summary: GridSummary, values: Sequence[int]) -> dict[str, float]:
    """Quality-control scores in [0, 1], one per structure group of
    :data:`QC_GROUPS` the model has, plus ``mean`` over the groups.

    A group's score is the mean maximum posterior over the voxels labelled
    as one of its structures: near 1 when the network is confident there,
    low on unusual images; 0 when no voxel got the group's labels at all (a
    missing structure is a failure).
    """
    vals = np.asarray(values)
    out: dict[str, float] = {}
    for group, members in QC_GROUPS.items():
        sel = np.isin(vals, members)
        if not sel.any():
            continue
        count = summary.counts[sel].sum()
        out[group] = float(summary.confidence_sums[sel].sum() / count) if count else 0.0
    out["mean"] = float(np.mean(list(out.values()))) if out else 0.0
    return out
