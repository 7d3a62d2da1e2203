"""Whole-brain segmentation.

Modules, one job each (imports run one way: ``segmenter`` -> ``atlas`` ->
``coords``; ``segmenter`` -> ``refine``, ``lut``):

- :mod:`.segmenter`: image in, FreeSurfer label map, posteriors and volumes out;
- :mod:`.atlas`: the multi-atlas spatial prior (atlases registered to the scan);
- :mod:`.refine`: intensity refinement of the posteriors (EM, bias field);
- :mod:`.lut`: FreeSurfer label names, colours and lookup-table files;
- :mod:`.coords`: world coordinates of a region's voxels.

``synthtools.seg.segment`` and the segmenter's other public names are
re-exported here, as the API and the ``synthseg`` CLI use them.
"""
from __future__ import annotations

from importlib import import_module as _import_module

__all__ = ["SegResult", "GridSummary", "segment", "volumes", "total_intracranial", "qc_scores",
           "QC_GROUPS", "flip_permutation", "crop_conformed", "label_values", "twin_groups",
           "intensity_groups", "CSF_LABELS", "PRIOR_POWER", "REFINE_BELOW", "CHUNK"]


def __getattr__(name: str):
    # Imported on first use, so that `synthtools.seg.lut` (names and colours only)
    # does not pull in torch and the network code.
    if name in __all__:
        return getattr(_import_module(".segmenter", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
