"""Registration support: spatial transforms, their file formats and resampling
(:mod:`synthtools.morph.transforms`), and registration with the trained
networks (:mod:`synthtools.morph.register`, imported on demand)."""
from .transforms import (Affine, Geometry, Warp, apply_transform, as_geometry, compose, invert,
                         read_transform, to_dense, update_header, write_transform)

__all__ = ["Affine", "Geometry", "Warp", "apply_transform", "as_geometry", "compose", "invert",
           "read_transform", "to_dense", "update_header", "write_transform"]
