"""Build the segmentation model's atlases (:mod:`synthtools.seg.atlas`) from
training label maps: SynthSeg 2.0 labels (lesions folded into white matter,
extra-cerebral labels dropped), cropped to the brain's bounding box plus a
margin, uint8, the affine shifted to the crop (world positions unchanged)::

    python -m synthtools.training.atlases --maps ../shared/data/label_maps --n 6 --dest models/synthseg

prints the metadata entry to merge into the model's ``metadata.json``.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from .generator.labels import LabelSet


def synthseg_labels(labels: np.ndarray) -> np.ndarray:
    """Generation labels -> SynthSeg 2.0 segmentation labels (uint8), by the
    training targets' own mapping (:meth:`LabelSet.synthseg_lut`)."""
    labelset = LabelSet()
    return labelset.synthseg_lut().numpy().astype(np.uint8)[labelset.to_index(labels)]


def crop_to_brain(labels: np.ndarray, affine: np.ndarray, margin: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """The bounding box of the non-zero labels plus ``margin`` voxels, and its affine."""
    nz = np.argwhere(labels > 0)
    lo = np.maximum(nz.min(0) - margin, 0)
    hi = np.minimum(nz.max(0) + margin + 1, labels.shape)
    crop = labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    out = np.asarray(affine, np.float64).copy()
    out[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    return crop, out


def build(maps: Path, n: int, dest: Path) -> list[str]:
    """Write ``atlas_01.nii.gz`` .. from ``training_seg_01`` ..; returns the file names."""
    names = []
    for k in range(1, n + 1):
        img = nib.load(str(maps / f"training_seg_{k:02d}.nii.gz"))
        labels = synthseg_labels(np.rint(np.asanyarray(img.dataobj)).astype(np.int32))
        crop, affine = crop_to_brain(labels, img.affine)
        out = nib.Nifti1Image(crop, affine)
        out.set_qform(affine, code=1)
        out.set_sform(affine, code=1)
        name = f"atlas_{k:02d}.nii.gz"
        nib.save(out, str(dest / name))
        names.append(name)
    return names


def copy_atlases(source: str | Path, dest: Path, labels) -> dict:
    """Copy a model's atlases (files + its metadata ``atlas`` block) into the
    model folder ``dest``, for a model whose output ``labels`` (FreeSurfer
    values) cover every atlas label: the atlases depend on the label
    protocol, not on the network, so a retrained network keeps them. Returns
    the ``atlas`` block for ``dest``'s metadata; ValueError (one line) if the
    source has no atlases or uses labels the model lacks."""
    from synthtools.weights import read_metadata, resolve
    folder = resolve(source)
    spec = read_metadata(folder).get("atlas")
    if not spec or not spec.get("files"):
        raise ValueError(f"{source}: model has no atlases to copy")
    known = {int(v) for v in labels}
    for name in spec["files"]:
        values = np.unique(np.asanyarray(nib.load(str(folder / name)).dataobj)).astype(int)
        extra = sorted(set(values.tolist()) - known)
        if extra:
            raise ValueError(f"{folder / name}: labels {extra} are not outputs of this model")
    dest.mkdir(parents=True, exist_ok=True)
    for name in spec["files"]:
        shutil.copyfile(folder / name, dest / name)
    return dict(spec, copied_from=str(source))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--maps", type=Path, required=True, help="folder of training_seg_XX.nii.gz")
    p.add_argument("--n", type=int, default=6, help="number of atlases (the first N maps)")
    p.add_argument("--dest", type=Path, required=True, help="model folder")
    args = p.parse_args(argv)
    names = build(args.maps, args.n, args.dest)
    print(json.dumps({"atlas": {"files": names, "registration": "synthmorph-affine",
                                "source": "SynthSeg training label maps (Apache 2.0), "
                                          "training_seg_01.. (training/atlases.py)"}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
