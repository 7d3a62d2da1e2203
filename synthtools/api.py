"""Python API for pipelines and notebooks: the three tools as functions.

    import synthtools
    out = synthtools.strip("t1.nii.gz")                 # .mask, .stripped, .sdt: nibabel images
    seg = synthtools.segment(nib.load("t1.nii.gz"))     # .labels (image), .volumes (mm^3), .qc
    reg = synthtools.register("t2.nii.gz", "t1.nii.gz", mode="affine")
    reg.moved.to_filename("t2_in_t1.nii.gz"); reg.save("t2_to_t1.lta")

Inputs are paths or nibabel images (NIfTI-1/2, MGH). Output images lie on
the input's grid with the input's header: same shape (a 4D image with one
frame stays 4D), affine and qform/sform codes; only the data type, the
scaling (removed) and the display window change. Models are the shipped ones
by default (a folder or a loaded :class:`synthtools.weights.Model` may be
given), loaded once per process and device.

The functions run the same internals as the command-line tools
(:func:`synthtools.skullstrip.strip`, :func:`synthtools.seg.segment`,
:func:`synthtools.morph.register.register`). Errors: an unusable image
raises :class:`synthtools.io.InputError`, an unusable model
:class:`synthtools.weights.ModelError`, a bad argument ``ValueError``; each
message is one line.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import nibabel as nib
import numpy as np

from .io import MAX_VOXSIZE_MM, MIN_VOXSIZE_MM, InputError, Volume, load_volume
from .weights import Model, ModelError

__all__ = ["strip", "segment", "register", "StripOutput", "SegmentOutput", "RegisterOutput", "ImageInput",
           "load_image_model"]

ImageInput = Union[str, os.PathLike, nib.Nifti1Image, nib.Nifti2Image, nib.MGHImage]
ModelInput = Union[str, os.PathLike, Model, None]

TOTAL_INTRACRANIAL = "Total-Intracranial"
REGISTRATION_MODES = ("rigid", "affine", "deform", "joint")


# ------------------------------------------------------------------ images --

@dataclass
class _Source:
    """An input image: the volume the internals take (trailing singleton
    dimensions dropped), and the header and full shape outputs copy."""
    volume: Volume
    header: Any
    shape: tuple[int, ...]
    kind: type


def _source(image: ImageInput, what: str = "image", allow_4d: bool = True) -> _Source:
    if isinstance(image, (str, os.PathLike)):
        vol = load_volume(image, allow_4d=allow_4d, dtype=None)
        img = nib.load(os.fspath(image))   # header only: the data were read above
        return _Source(vol, vol.header, tuple(int(n) for n in img.shape), type(img))
    if isinstance(image, (nib.Nifti1Image, nib.Nifti2Image, nib.MGHImage)):
        return _Source(_check_image(image, what, allow_4d), image.header, tuple(int(n) for n in image.shape),
                       type(image))
    raise TypeError(f"{what}: expected a path or a nibabel NIfTI/MGH image, got {type(image).__name__}")


def _check_image(img: Any, what: str, allow_4d: bool) -> Volume:
    """An in-memory image as a Volume, with the checks load_volume makes on files."""
    shape = tuple(int(n) for n in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    dims = "x".join(str(n) for n in img.shape)
    if len(shape) < 3 or min(shape[:3]) <= 1:
        raise InputError(f"{what}: image is 2D (shape {dims}), a 3D image is required")
    if len(shape) > 4 or (len(shape) == 4 and not allow_4d):
        raise InputError(f"{what}: image has shape {dims}, a 3D image is required")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise InputError(f"{what}: header affine contains NaN or Inf")
    voxsize = np.sqrt(np.sum(affine[:3, :3] ** 2, axis=0))
    if np.any(voxsize < MIN_VOXSIZE_MM) or np.any(voxsize > MAX_VOXSIZE_MM):
        raise InputError(f"{what}: implausible voxel size {'x'.join(f'{v:.4g}' for v in voxsize)} mm "
                         f"(expected {MIN_VOXSIZE_MM}-{MAX_VOXSIZE_MM} mm), check the header")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-6 * np.prod(voxsize):
        raise InputError(f"{what}: header affine is singular (voxel axes are not independent)")
    data = np.asarray(np.asanyarray(img.dataobj)).reshape(shape)
    if data.dtype.kind in "fc" and not np.isfinite(data).all():
        raise InputError(f"{what}: image contains {int(data.size - np.isfinite(data).sum())} NaN or Inf voxels")
    if not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))
    if data.min() == data.max():
        raise InputError(f"{what}: image is empty (all voxels are {data.min().item():g})")
    return Volume(data=data, affine=affine, header=img.header)


def _image_like(src: _Source, data: np.ndarray, dtype: Any) -> nib.spatialimages.SpatialImage:
    """``data`` as an image of ``src``'s class, on its grid with its header
    (same qform/sform and codes), in ``dtype``; a 3D result of a 4D input
    with one frame gets its singleton dimensions back."""
    arr = np.asarray(data)
    if arr.shape[:3] != src.shape[:3]:
        raise ValueError(f"data shape {arr.shape} is not on the input's grid {src.shape}")
    if arr.ndim == 3 and len(src.shape) > 3 and math.prod(src.shape[3:]) == 1:
        arr = arr.reshape(src.shape)
    dtype = np.dtype(dtype)
    if dtype.kind in "iu" and arr.dtype.kind == "f":
        info = np.iinfo(dtype)
        arr = np.clip(np.rint(arr), info.min, info.max)
    arr = arr.astype(dtype, copy=False)
    header = src.header.copy()
    if issubclass(src.kind, nib.MGHImage):
        img = nib.MGHImage(arr, header.get_best_affine(), header)
        img.header.set_data_dtype(dtype)
        return img
    # The header's own affine: nibabel then keeps quatern/srow and both codes as they are.
    img = src.kind(arr, header.get_best_affine(), header)
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(None, None)
    img.header["cal_min"] = 0
    img.header["cal_max"] = 0
    return img


def _image_dtype(data: np.ndarray) -> np.dtype:
    """Data type for an image of the input's values: its own, float32 for floats
    (a scaled integer image reads as float64)."""
    return np.dtype(np.float32) if data.dtype.kind == "f" else np.dtype(data.dtype).newbyteorder("=")


# ------------------------------------------------------------------ models --

_MODELS: dict[tuple[str, str], Model] = {}


def load_image_model(model: ModelInput, default: str, task: str, device: str = "cpu") -> Model:
    """A loaded model for ``task`` ("skullstrip", "segment", "register"):
    ``model`` itself if already loaded, else the folder, metadata file or
    shipped name (``default`` if None), loaded once per process and device."""
    import torch

    from .weights import load_model, resolve

    if isinstance(model, Model):
        loaded = model
    else:
        torch.device(device)   # ValueError for a bad device string
        key = (str(resolve(default if model is None else model).resolve()), str(device))
        if key not in _MODELS:
            _MODELS[key] = load_model(key[0], device)
        loaded = _MODELS[key]
    if loaded.meta.get("task") != task:
        raise ModelError(f"model {loaded.path}: not a {task} model (task {loaded.meta.get('task')!r})")
    return loaded


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        import torch
        torch.set_num_threads(int(threads))


def _sha256(model: Model) -> str:
    return str(model.meta.get("sha256", ""))


# ------------------------------------------------------------------- strip --

@dataclass
class StripOutput:
    """Result of :func:`strip`, all on the input's grid with its header.

    ``mask``: uint8 brain mask (1 = brain); ``stripped``: the input with
    voxels outside the mask set to ``fill`` (the input's type; float32 for
    float or scaled inputs); ``sdt``: float32 signed distance to the brain
    boundary in mm, negative inside; ``model_sha256``: the weights used.
    """
    mask: nib.spatialimages.SpatialImage
    stripped: nib.spatialimages.SpatialImage
    sdt: nib.spatialimages.SpatialImage
    model_sha256: str

    @property
    def brain_volume_mm3(self) -> float:
        """Volume of the mask (first frame) in mm^3."""
        data = np.asanyarray(self.mask.dataobj)
        data = data.reshape(data.shape[:3] + (-1,))[..., 0]
        return float(np.count_nonzero(data) * abs(np.linalg.det(self.mask.affine[:3, :3])))


def strip(image: ImageInput, *, border: float = 1.0, no_csf: bool = False, flip: bool = True,
          fill: float = 0.0, model: ModelInput = None, device: str = "cpu",
          threads: int | None = None) -> StripOutput:
    """Skull-strip one image (3D, or 4D frame by frame), as ``synthstrip``.

    ``border``: mask threshold in mm on the signed distance (positive grows
    the mask); ``no_csf``: the brain without the surrounding CSF; ``flip``:
    left-right test-time augmentation (about 1.5x the time); ``fill``: value
    of removed voxels in ``stripped``; ``model``: default the shipped
    ``synthstrip``; ``device``: "cpu" or "cuda"; ``threads``: torch CPU
    threads (global setting; None leaves it).
    """
    from .skullstrip import channel_of, strip as strip_volume

    if not math.isfinite(border):
        raise ValueError(f"border must be a finite number of mm, got {border}")
    if not math.isfinite(fill):
        raise ValueError(f"fill must be a finite number, got {fill}")
    _set_threads(threads)
    src = _source(image)
    m = load_image_model(model, "synthstrip", "skullstrip", device)
    channel = channel_of(m, "nocsf" if no_csf else "csf")
    if channel is None:
        raise ModelError(f"model {m.path}: has no {'no-CSF' if no_csf else 'with-CSF'} output")
    data = src.volume.data
    dtype = _image_dtype(data)
    if dtype.kind in "iu" and (fill != round(fill) or not np.iinfo(dtype).min <= fill <= np.iinfo(dtype).max):
        raise ValueError(f"fill value {fill:g} does not fit the image's data type {dtype}")
    result = strip_volume(m, src.volume, border=border, channel=channel, flip=flip)
    stripped = np.where(result.mask.astype(bool), data, fill)
    return StripOutput(mask=_image_like(src, result.mask, np.uint8), stripped=_image_like(src, stripped, dtype),
                       sdt=_image_like(src, result.sdt, np.float32), model_sha256=_sha256(m))


# ----------------------------------------------------------------- segment --

@dataclass
class SegmentOutput:
    """Result of :func:`segment`.

    ``labels``: int32 FreeSurfer label values on the input's grid with its
    header; ``posteriors``: float32 (X, Y, Z, C) on that grid, one frame per
    label of ``label_names`` in order (None unless asked for);
    ``volumes``: structure name -> soft volume in mm^3 (sum of the
    posterior times the voxel volume), background left out, plus
    ``Total-Intracranial`` (all labels but background); ``qc``: structure
    group -> mean maximum posterior in [0, 1], plus ``mean``;
    ``label_names``: label value -> name, background included.
    """
    labels: nib.spatialimages.SpatialImage
    volumes: dict[str, float]
    qc: dict[str, float]
    label_names: dict[int, str]
    model_sha256: str
    posteriors: nib.spatialimages.SpatialImage | None = field(default=None, repr=False)
    atlases_used: int = 0


def segment(image: ImageInput, *, flip: bool = True, refine: bool = True, bias_field: bool = True,
            atlases: int | None = None, crop: int | Sequence[int] | None = None, posteriors: bool = False,
            model: ModelInput = None, device: str = "cpu", threads: int | None = None) -> SegmentOutput:
    """Segment one 3D image into the SynthSeg 2.0 structures, as ``synthseg``.

    ``flip``: left-right test-time augmentation (twice the network time);
    ``refine``: fit an intensity model per structure to this image (and a
    smooth multiplicative field, ``bias_field``); ``atlases``: how many of
    the model's bundled atlases to register as a second prior (None: the
    model's default, 3 for the shipped one, ~7 s each; 0: off); ``crop``:
    centre crop of the network's input in voxels of its grid (one size or
    three) to save memory; ``posteriors``: also return the (X, Y, Z, C)
    posteriors (C float32 volumes of the input's size); ``model``: default
    the shipped ``synthseg``; ``device``, ``threads``: as :func:`strip`.
    """
    from .seg.atlas import atlas_files, default_atlases
    from .seg import qc_scores, segment as segment_volume, total_intracranial

    _set_threads(threads)
    src = _source(image, allow_4d=False)
    m = load_image_model(model, "synthseg", "segment", device)
    available = len(atlas_files(m))
    n_atlases = default_atlases(m) if atlases is None else int(atlases)
    if not 0 <= n_atlases <= available:
        raise ValueError(f"atlases must be 0..{available} for model {m.path}, got {atlases}")
    if crop is not None:
        crop = tuple(int(c) for c in np.broadcast_to(np.asarray(crop), (3,)))
        if min(crop) < 1:
            raise ValueError(f"crop sizes must be positive voxels, got {crop}")
    result = segment_volume(m, src.volume, flip=flip, crop=crop, refine=refine, bias_field=bias_field,
                            posteriors=posteriors, atlases=n_atlases)
    values = [int(v) for v in result.label_values]
    soft = result.native.soft_volumes
    volumes = {name: float(v) for value, name, v in zip(values, result.names, soft) if value != 0}
    volumes[TOTAL_INTRACRANIAL] = total_intracranial(soft, values)
    post = _image_like(src, result.posteriors, np.float32) if posteriors else None
    return SegmentOutput(labels=_image_like(src, result.labels, np.int32), volumes=volumes,
                         qc=qc_scores(result.native, values), label_names=dict(zip(values, result.names)),
                         model_sha256=_sha256(m), posteriors=post, atlases_used=result.atlases_used)


# ---------------------------------------------------------------- register --

@dataclass
class RegisterOutput:
    """Result of :func:`register`.

    ``transform``: moving -> fixed (:class:`synthtools.morph.Affine` 4x4 for
    rigid/affine, :class:`synthtools.morph.Warp` displacement field on the
    fixed grid for deform/joint), in the pull-back convention (fixed RAS mm ->
    moving RAS mm); ``inverse``: fixed -> moving (None unless asked for);
    ``moved``: the moving image resampled (linear) onto the fixed grid, with
    the fixed image's header and the moving image's data type.
    """
    transform: Any
    inverse: Any
    moved: nib.spatialimages.SpatialImage
    fixed_geometry: Any = field(repr=False)
    moving_geometry: Any = field(repr=False)
    model_sha256: dict[str, str] = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> str:
        """Write the transform: .lta or ITK .txt/.tfm (rigid/affine), .nii.gz or .mgz warp (deform/joint)."""
        from .morph.formats import write_transform
        return write_transform(self.transform, path, fixed=self.fixed_geometry, moving=self.moving_geometry)

    def save_inverse(self, path: str | os.PathLike) -> str:
        """Write the inverse transform (fixed -> moving); needs ``inverse=True``."""
        from .morph.formats import write_transform
        if self.inverse is None:
            raise ValueError("no inverse transform: call register(..., inverse=True)")
        return write_transform(self.inverse, path, fixed=self.moving_geometry, moving=self.fixed_geometry)


_REGISTRATION_DEFAULTS = {"rigid": "synthmorph-rigid", "affine": "synthmorph-affine", "deform": "synthmorph-affine"}
_REGISTRATION_KINDS = {"rigid": ("rigid",), "affine": ("affine",), "deform": ("svf", "affine", "rigid")}


def _registration_model(model: ModelInput, kind: str, device: str) -> Model:
    from .morph.register import model_kind

    m = load_image_model(model, _REGISTRATION_DEFAULTS[kind], "register", device)
    if model_kind(m) not in _REGISTRATION_KINDS[kind]:
        raise ModelError(f"model {m.path}: a {model_kind(m) or 'unknown'} registration model, "
                         f"a {kind} model is needed")
    return m


def register(moving: ImageInput, fixed: ImageInput, mode: str = "joint", *, init: Any = None,
             regularization: float = 0.5, inverse: bool = False, model: ModelInput = None,
             affine_model: ModelInput = None, device: str = "cpu", threads: int | None = None) -> RegisterOutput:
    """Register ``moving`` to ``fixed``, as ``synthmorph register``.

    ``mode``: "rigid", "affine", "deform" (assumes prior affine alignment)
    or "joint" (affine then deformable); ``init``: a linear transform to
    start from (:class:`synthtools.morph.Affine` or a .lta/.txt/.tfm path);
    ``regularization``: deformable smoothness weight in [0, 1];
    ``inverse``: also compute the fixed -> moving transform; ``model``:
    the model of ``mode`` (joint: of the deformable step), default the
    shipped ones; ``affine_model``: joint only, the affine step's model;
    ``device``, ``threads``: as :func:`strip`. A 4D image is registered by
    its first frame.
    """
    from .morph.register import register as register_volumes
    from .morph.formats import read_transform
    from .morph.transforms import Affine, apply_transform, as_geometry

    if mode not in REGISTRATION_MODES:
        raise ValueError(f"mode must be one of {', '.join(REGISTRATION_MODES)}, got {mode!r}")
    if not math.isfinite(regularization) or not 0.0 <= regularization <= 1.0:
        raise ValueError(f"regularization must be between 0 and 1, got {regularization}")
    if affine_model is not None and mode != "joint":
        raise ValueError("affine_model is only used with mode='joint'")
    if isinstance(init, (str, os.PathLike)):
        init = read_transform(os.fspath(init))
    if init is not None and not isinstance(init, Affine):
        raise ValueError("init must be a linear transform (Affine, or a .lta/.txt/.tfm path)")
    _set_threads(threads)
    mov, fix = _source(moving, "moving"), _source(fixed, "fixed")
    if mode in ("rigid", "affine"):
        models = {"linear": _registration_model(model, mode, device)}
    elif mode == "deform":
        models = {"deform": _registration_model(model, "deform", device)}
    else:
        linear = _registration_model(affine_model, "affine", device)
        models = {"linear": linear, "deform": linear if model is None else _registration_model(model, "deform", device)}
    reg = register_volumes(mov.volume, fix.volume, mode, models, init=init, regularization=regularization,
                           inverse=inverse)
    fixed_g, moving_g = as_geometry(fix.volume), as_geometry(mov.volume)
    moved = apply_transform(reg.transform, mov.volume, fixed_g)
    return RegisterOutput(transform=reg.transform, inverse=reg.inverse,
                          moved=_image_like(fix, moved, _image_dtype(mov.volume.data)),
                          fixed_geometry=fixed_g, moving_geometry=moving_g,
                          model_sha256={k: _sha256(v) for k, v in models.items()})
