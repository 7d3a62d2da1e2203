"""Skull-stripping: image in, signed distance to the brain boundary and brain
mask out, both on the input's native grid. The tools' internals; the Python
API is :func:`synthtools.api.strip` (``synthtools.strip(img)``)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .infer import normalize_intensities, predict
from .io import Volume
from .space import ModelSpace
from .weights import Model


@dataclass
class StripResult:
    sdt: np.ndarray    # signed distance (mm), negative inside the brain, native grid
    mask: np.ndarray   # uint8 brain mask, native grid


def boundaries(model: Model) -> list[str]:
    """The brain definitions a model's output channels give, in order:
    ``csf`` (brain + CSF, up to the skull) and/or ``nocsf`` (no CSF outside
    the brain). Models from before multi-output training carry one."""
    out = model.meta.get("output", {})
    if "channels" in out:
        return list(out["channels"])
    return ["csf" if out.get("csf", True) else "nocsf"]


def channel_of(model: Model, brain: str) -> int | None:
    """Output channel of ``brain`` ("csf" or "nocsf"), None if the model lacks it."""
    names = boundaries(model)
    return names.index(brain) if brain in names else None


def brain_sdt(model: Model, volume: Volume, frame: int | None = None, channel: int = 0,
              flip: bool = False) -> np.ndarray:
    """Signed distance (mm) to the brain boundary on the native grid of
    ``volume`` (3D, or one ``frame`` of a 4D image), from output ``channel``.
    ``flip``: average with the prediction on the left-right mirrored image
    (mirrored back); the brain boundary has no left/right labels to swap."""
    data = volume.data if frame is None else volume.data[..., frame]
    space = ModelSpace.of(model)
    conf = space.conform(data, volume.affine)
    x = normalize_intensities(conf.data)
    sdt = predict(model, x[None])[channel]
    if flip:
        axis = space.lr_axis
        sdt = 0.5 * (sdt + predict(model, x.flip(axis)[None])[channel].flip(axis))
    band = float(model.meta["output"].get("band_mm", 5.0))
    # Outside the conformed FOV the brain is absent: fill with the far value.
    return conf.to_native(sdt, order=1, fill=band).astype(np.float32)


def mask_from_sdt(sdt: np.ndarray, border: float = 1.0) -> np.ndarray:
    """Brain mask = {sdt < border mm}, largest connected component, holes
    filled. Positive ``border`` grows the mask, negative shrinks it."""
    mask = sdt < border
    lab, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        mask = lab == sizes.argmax()
    return ndimage.binary_fill_holes(mask).astype(np.uint8)


def strip(model: Model, volume: Volume, border: float = 1.0, channel: int = 0,
          flip: bool = False) -> StripResult:
    """Skull-strip a 3D volume; 4D volumes are processed frame by frame.
    ``channel``: which brain definition (see ``boundaries``); ``flip``: see
    :func:`brain_sdt`."""
    if volume.data.ndim == 4:
        sdts = [brain_sdt(model, volume, t, channel, flip) for t in range(volume.data.shape[3])]
        sdt = np.stack(sdts, axis=-1)
        mask = np.stack([mask_from_sdt(s, border) for s in sdts], axis=-1)
        return StripResult(sdt, mask)
    sdt = brain_sdt(model, volume, channel=channel, flip=flip)
    return StripResult(sdt, mask_from_sdt(sdt, border))
