"""Registration support: spatial transforms and resampling
(:mod:`synthtools.morph.transforms`), their file formats
(:mod:`synthtools.morph.formats`), and registration with the trained
networks (:mod:`synthtools.morph.register`, imported on demand)."""
from .formats import read_transform, write_transform
from .transforms import Affine, Geometry, Warp, apply_transform, as_geometry, compose, invert, to_dense, update_header

__all__ = ["Affine", "Geometry", "Warp", "apply_transform", "as_geometry", "compose", "invert",
           "read_transform", "to_dense", "update_header", "write_transform"]
