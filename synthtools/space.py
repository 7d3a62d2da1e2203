"""A network's input space: the grid every image is resampled onto before the
network sees it, as a model's metadata ``input`` block states it::

    "input": {"voxsize": 2.0, "orientation": "LIA", "multiple": 16,
              "normalization": "min to 0, 99.5th percentile to 1, clipped",
              "min_extent_mm": 50.0}                      # optional

The tools build a :class:`ModelSpace` from a loaded model
(:meth:`ModelSpace.of`) and call :meth:`ModelSpace.conform`; the training
recipes build one from their config and write it into the metadata they
export (:meth:`ModelSpace.to_meta`), so the grid a network is trained on and
the grid it is run on come from one object.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from .conform import MIN_EXTENT_MM, Conformed, conform, lr_axis, orientation_matrix
from .weights import ModelError

if TYPE_CHECKING:
    from .weights import Model

__all__ = ["ModelSpace", "NORMALIZATION"]

# How inference maps intensities (synthtools.infer.normalize_intensities);
# written into the metadata for the record, never read back.
NORMALIZATION = "min to 0, 99.5th percentile to 1, clipped"

# Keys of the metadata's input block: the three that define the grid, then
# the optional ones.
_REQUIRED = ("voxsize", "orientation", "multiple")
_OPTIONAL = ("min_extent_mm", "normalization")


def _number(value: Any) -> bool:
    """A real number (not a bool, which Python counts as an int)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class ModelSpace:
    """The grid a network works on.

    ``voxsize``: isotropic voxel size, mm (> 0; the shipped models use 2).
    ``orientation``: 3-letter axis code, each of L/R, A/P, S/I once (the
    world direction each array axis increases toward; stored upper case).
    ``multiple``: voxels; every conformed dimension is rounded up to a
    multiple of it so that the U-Net's poolings divide the grid (>= 1).
    ``min_extent_mm``: the smallest field of view, mm along every axis, the
    model accepts (>= 0; default :data:`synthtools.conform.MIN_EXTENT_MM`).
    Invalid values raise ``ValueError`` with a one-line message.
    """

    voxsize: float
    orientation: str
    multiple: int
    min_extent_mm: float = MIN_EXTENT_MM

    def __post_init__(self) -> None:
        if not _number(self.voxsize) or not math.isfinite(self.voxsize) or self.voxsize <= 0:
            raise ValueError(f"voxsize must be one positive number of mm (isotropic), got {self.voxsize!r}")
        if not isinstance(self.orientation, str):
            raise ValueError(f"orientation must be a 3-letter code such as 'LIA', got {self.orientation!r}")
        orientation_matrix(self.orientation)    # ValueError (one line) for a bad code
        if not _number(self.multiple) or self.multiple != int(self.multiple) or self.multiple < 1:
            raise ValueError(f"multiple must be a whole number of voxels >= 1, got {self.multiple!r}")
        if not _number(self.min_extent_mm) or not math.isfinite(self.min_extent_mm) or self.min_extent_mm < 0:
            raise ValueError(f"min_extent_mm must be a number of mm >= 0, got {self.min_extent_mm!r}")
        # Canonical types: the metadata may hold 16.0 or "lia".
        object.__setattr__(self, "voxsize", float(self.voxsize))
        object.__setattr__(self, "orientation", self.orientation.upper())
        object.__setattr__(self, "multiple", int(self.multiple))
        object.__setattr__(self, "min_extent_mm", float(self.min_extent_mm))

    # ------------------------------------------------------------ building --

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], where: str = "model metadata") -> ModelSpace:
        """The space of a model's metadata (the whole ``metadata.json`` dict;
        its ``input`` block is read). A missing block, a missing or unknown
        key, or a bad value raises :class:`synthtools.weights.ModelError`
        with one line naming ``where``."""
        block = meta.get("input") if isinstance(meta, Mapping) else None
        if not isinstance(block, Mapping):
            raise ModelError(f"{where}: no input space (an 'input' block with {', '.join(_REQUIRED)})")
        missing = [k for k in _REQUIRED if k not in block]
        if missing:
            raise ModelError(f"{where}: input space lacks {', '.join(missing)} "
                             f"(needs {', '.join(_REQUIRED)})")
        unknown = sorted(set(block) - set(_REQUIRED) - set(_OPTIONAL))
        if unknown:
            raise ModelError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} in the input space: "
                             f"{', '.join(unknown)}")
        kwargs = {k: block[k] for k in _REQUIRED}
        if "min_extent_mm" in block:
            kwargs["min_extent_mm"] = block["min_extent_mm"]
        try:
            return cls(**kwargs)
        except ValueError as exc:
            raise ModelError(f"{where}: input space: {exc}") from None

    @classmethod
    def of(cls, model: Model) -> ModelSpace:
        """The space of a loaded model (:class:`synthtools.weights.Model`)."""
        return cls.from_meta(model.meta, f"model {model.path}")

    def to_meta(self) -> dict[str, Any]:
        """The metadata ``input`` block that :meth:`from_meta` reads back
        (``min_extent_mm`` only where it differs from the default)."""
        block: dict[str, Any] = {"voxsize": self.voxsize, "orientation": self.orientation,
                                 "multiple": self.multiple, "normalization": NORMALIZATION}
        if self.min_extent_mm != MIN_EXTENT_MM:
            block["min_extent_mm"] = self.min_extent_mm
        return block

    # ------------------------------------------------------------- using --

    @property
    def lr_axis(self) -> int:
        """Array axis of the conformed grid that runs left-right (0 for LIA)."""
        return lr_axis(self.orientation)

    def conform(self, data: Any, affine: Any, *, round_up: bool = True, order: int = 1) -> Conformed:
        """``data`` (numpy or torch, (X, Y, Z) or (X, Y, Z, frames), on the
        voxel->world ``affine``, mm) resampled onto this space: voxel size
        :attr:`voxsize`, axes :attr:`orientation`, centred on the image and
        covering its whole field of view, each dimension rounded up to
        :attr:`multiple` voxels (``round_up=False``: the smallest grid that
        covers it, for training code that crops or pads by itself).
        ``order``: 1 trilinear, 0 nearest. See :func:`synthtools.conform.conform`."""
        return conform((data, affine), voxsize=self.voxsize, orientation=self.orientation,
                       multiple=self.multiple if round_up else None, order=order)
