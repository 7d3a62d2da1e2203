"""The real evaluation cases (never trained on) under the data root, and the
scoring of a model on them: skull-stripping (Dice), segmentation (Dice per
label / tissue class), contrast consistency, registration (displacement
error, mm). One place for the case lists and the data root, used by the
training recipes' validation (:mod:`synthtools.training.recipes`) and by
``benchmarks/``. Paths are relative to the data root so runs work from any
checkout beside ``shared/``; the metrics themselves are in
:mod:`synthtools.metrics`."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .io import Volume, load_volume
from .metrics import aseg_scores, dice, displacement_error, neck_crop, tissue_consistency, tissue_dice


def data_root() -> Path:
    """``SYNTHTOOLS_DATA`` or ``../shared/data`` next to the repository."""
    env = os.environ.get("SYNTHTOOLS_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass(frozen=True)
class StripCase:
    name: str
    contrast: str
    image: str
    mask: str
    mask_threshold: float = 0.5
    crop_neck: bool = False   # drop slices below the foramen magnum (cord in the mask)
    # The reference's convention: "csf" = intracranial (brain + CSF up to the
    # skull), "nocsf" = brain tissue only (no extra-cerebral CSF, as the
    # Lesjak and ROBEX masks). Scored with the matching model output.
    brain: str = "csf"

    def available(self, root: Path | None = None) -> bool:
        root = root or data_root()
        return (root / self.image).is_file() and (root / self.mask).is_file()


V = "validation/"
LJ = V + "lesjak_longitudinal_ms_p01/"
STRIP_CASES = [
    *(StripCase(f"lesjak_{s}_{c}", c, f"{LJ}raw/{s}_{c}.nii.gz", f"{LJ}derived/{s}_{c}_brainmask_derived.nii.gz",
                brain="nocsf")
      for s in ("study1", "study2") for c in ("T1W", "T2W", "FLAIR")),
    *(StripCase(f"brainweb_{c}", c, f"{V}brainweb_subject04/{c}w_sim.nii.gz",
                f"{V}brainweb_subject04/mask_intracranial_csf_gm_wm_filled_1mm.nii.gz", crop_neck=True)
      for c in ("T1", "T2", "PD")),
    *(StripCase(f"brainweb_{c}_nocsf", c, f"{V}brainweb_subject04/{c}w_sim.nii.gz",
                f"{V}brainweb_subject04/mask_brain_gm_wm_filled_1mm.nii.gz", crop_neck=True, brain="nocsf")
      for c in ("T1", "T2", "PD")),
    StripCase("robex_T1", "T1", f"{V}robex_atlas_t1/atlas.nii.gz", f"{V}robex_atlas_t1/atlas_mask.nii.gz",
              brain="nocsf"),
    *(StripCase(f"spm_avg152{c}", c, f"{V}spm12_mni_templates/avg152{c}.nii.gz",
                f"{V}spm12_mni_templates/brainmask_prob_2mm.nii.gz")  # scaled uint8: probability 0..1
      for c in ("T1", "T2", "PD")),
    StripCase("ct_template", "CT", f"{V}ct_template_scct/scct_cormack_head.nii.gz",
              f"{V}ct_template_scct/brainmask_derived.nii.gz"),
]


def load_case(case: StripCase, root: Path | None = None) -> tuple[Volume, np.ndarray, np.ndarray]:
    """(image, reference mask, region to score) of one case, native grid."""
    root = root or data_root()
    img = load_volume(root / case.image, allow_4d=True)
    if img.data.ndim == 4:
        img = Volume(img.data[..., 0], img.affine, img.header, img.path)
    ref = load_volume(root / case.mask, allow_4d=True).data
    ref = (ref[..., 0] if ref.ndim == 4 else ref) > case.mask_threshold
    region = neck_crop(ref, img.affine) if case.crop_neck else np.ones(ref.shape, bool)
    return img, ref, region


def score_strip(predict_mask: Callable[..., np.ndarray], cases=None, root: Path | None = None,
                by_convention: bool = False) -> dict[str, float]:
    """Dice per available case of a function Volume -> native brain mask
    (``by_convention``: called as ``predict_mask(volume, case.brain)``)."""
    out = {}
    for case in cases or STRIP_CASES:
        if not case.available(root):
            continue
        img, ref, region = load_case(case, root)
        pred = (predict_mask(img, case.brain) if by_convention else predict_mask(img)) > 0
        out[case.name] = dice(pred & region, ref & region)
    return out


# ---------------------------------------------------------------- segmentation

@dataclass(frozen=True)
class SegCase:
    name: str
    contrast: str
    image: str
    labels: str
    kind: str  # "aseg": FreeSurfer labels; "tissue": BrainWeb classes (1 CSF, 2 GM, 3 WM)

    def available(self, root: Path | None = None) -> bool:
        root = root or data_root()
        return (root / self.image).is_file() and (root / self.labels).is_file()


SEG_CASES = [
    SegCase("vxm_T1", "T1", f"{V}voxelmorph_test_scan/vol.nii.gz", f"{V}voxelmorph_test_scan/seg.nii.gz", "aseg"),
    *(SegCase(f"brainweb_{c}", c, f"{V}brainweb_subject04/{c}w_sim.nii.gz",
              f"{V}brainweb_subject04/crisp_labels_1mm_majority.nii.gz", "tissue") for c in ("T1", "T2", "PD")),
]

def score_seg(predict_labels: Callable[[Volume], np.ndarray], cases=None, root: Path | None = None,
              detail: bool = False) -> dict[str, float]:
    """Mean Dice per case (``detail``: also per label / tissue class)."""
    out: dict[str, float] = {}
    for case in cases or SEG_CASES:
        if not case.available(root):
            continue
        root_ = root or data_root()
        img = load_volume(root_ / case.image)
        ref = np.rint(load_volume(root_ / case.labels, dtype=None).data).astype(np.int32)
        pred = predict_labels(img)
        if case.kind == "aseg":
            d, out[f"{case.name}_mean"], out[f"{case.name}_large"] = aseg_scores(pred, ref)
            if detail:
                out.update({f"{case.name}_{k}": v for k, v in d.items()})
        else:
            out.update({f"{case.name}_{cls}": v for cls, v in tissue_dice(pred, ref).items()})
    return out


# ---------------------------------------------------------------- contrast consistency

@dataclass(frozen=True)
class ConsistencySet:
    """Real scans of ONE anatomy in several contrasts, the first the
    reference (T1). ``grid``: how the others line up with it: ``"same"``
    (one voxel grid, as SPM's avg152 templates) or ``"lesjak"`` (the
    dataset's own intra-study transforms, so registration error does not
    count against the segmenter)."""
    name: str
    scans: tuple[tuple[str, str], ...]   # (contrast, path under the data root)
    grid: str = "same"

    def available(self, root: Path | None = None) -> bool:
        root = root or data_root()
        return all((root / path).is_file() for _, path in self.scans)


CONSISTENCY_SETS = [
    ConsistencySet("spm_avg152", tuple((c, f"{V}spm12_mni_templates/avg152{c}.nii.gz") for c in ("T1", "T2", "PD"))),
    *(ConsistencySet(f"lesjak_{s}", tuple((c, f"{LJ}raw/{s}_{c}.nii.gz") for c in ("T1W", "T2W", "FLAIR")),
                     grid="lesjak") for s in ("study1", "study2")),
]


def _onto_reference(labels: np.ndarray, vol: Volume, ref: Volume, to_ref: np.ndarray) -> np.ndarray:
    """A label map of ``vol`` resampled (nearest) onto the reference's grid
    (``to_ref``: ``vol``'s RAS -> the reference's, :func:`_to_reference`)."""
    from .conform import resample
    return resample(labels.astype(np.int32), to_ref @ vol.affine, ref.affine, ref.shape, order=0)


def _to_reference(cset: ConsistencySet, scans) -> np.ndarray:
    """4x4: a scan's RAS -> the set's reference scan's RAS (``scans``: the
    two paths, the scan's first)."""
    if cset.grid == "same":
        return np.eye(4)
    if cset.grid == "lesjak":
        # common -> scan maps of both scans: scan RAS -> reference RAS is ref_c @ inv(scan_c).
        scan_name, ref_name = (Path(p).name.removesuffix(".nii.gz") for p in scans)
        return lesjak_common_to_scan(ref_name) @ np.linalg.inv(lesjak_common_to_scan(scan_name))
    raise ValueError(f"unknown grid kind {cset.grid!r}")


def score_consistency(predict_labels: Callable[[Volume], np.ndarray], sets=None,
                      root: Path | None = None) -> dict[str, float]:
    """``consistency_<set>_<contrast>``: tissue-class Dice between our labels
    on the reference T1 and on another contrast of the same anatomy
    (:func:`tissue_consistency`), on the reference's grid; plus
    ``consistency_mean`` over them all. No manual labels needed."""
    return _score_sets(lambda vol, ref, to_ref: predict_labels(vol), sets, root)


def _score_sets(labels_of: Callable[[Volume, Volume, np.ndarray], np.ndarray], sets, root: Path | None
                ) -> dict[str, float]:
    """:func:`score_consistency` with ``labels_of(scan, reference scan,
    scan RAS -> reference RAS)`` giving each scan's labels."""
    root = root or data_root()
    out: dict[str, float] = {}
    for cset in CONSISTENCY_SETS if sets is None else sets:
        if not cset.available(root):
            continue
        (_, ref_path), *others = cset.scans
        ref = load_volume(root / ref_path)
        ref_labels = labels_of(ref, ref, np.eye(4))
        for contrast, path in others:
            vol = load_volume(root / path)
            to_ref = _to_reference(cset, (path, ref_path))
            moved = _onto_reference(labels_of(vol, ref, to_ref), vol, ref, to_ref)
            out[f"consistency_{cset.name}_{contrast}"] = tissue_consistency(ref_labels, moved)
    if out:
        out["consistency_mean"] = float(np.mean(list(out.values())))
    return out


# The anatomy behind consistency_ceiling: BrainWeb's 1 mm crisp classes (1 CSF, 2 GM, 3 WM),
# written as one SynthSeg label per class so that tissue_consistency reads them.
CEILING_ANATOMY = f"{V}brainweb_subject04/crisp_labels_1mm_majority.nii.gz"
_CLASS_LABEL = np.array([0, 24, 3, 2], dtype=np.int32)   # background, CSF, cortex, cerebral WM


def _perfect_labels(vol: Volume, to_anatomy: np.ndarray, anatomy: Volume, samples: int = 5) -> np.ndarray:
    """The labels a perfect segmenter gives on ``vol``'s grid: the majority
    class of the 1 mm ``anatomy`` over each voxel's extent along its thickest
    axis (``samples`` points; thin in-plane voxels need none). ``to_anatomy``:
    the scan's RAS -> the anatomy's RAS (mm)."""
    from scipy.ndimage import map_coordinates
    classes = np.rint(anatomy.data).astype(np.int32)
    classes[(classes < 0) | (classes > 3)] = 0          # fat, muscle, skull...: not brain tissue
    axis = int(np.argmax(np.linalg.norm(vol.affine[:3, :3], axis=0)))
    vox = np.indices(vol.shape[:3], dtype=np.float32).reshape(3, -1)
    to_vox = np.linalg.inv(anatomy.affine) @ to_anatomy @ vol.affine
    votes = np.zeros((4, vox.shape[1]), np.uint8)
    for offset in np.linspace(-0.4, 0.4, samples):
        shifted = vox.copy()
        shifted[axis] += offset
        at = to_vox[:3, :3].astype(np.float32) @ shifted + to_vox[:3, 3:].astype(np.float32)
        votes[map_coordinates(classes, at, order=0, mode="constant", cval=0), np.arange(vox.shape[1])] += 1
    return _CLASS_LABEL[votes.argmax(0)].reshape(vol.shape[:3])


def consistency_ceiling(sets=None, root: Path | None = None) -> dict[str, float]:
    """What :func:`score_consistency` gives a perfect segmenter: the same
    keys, scored on the labels of one 1 mm anatomy (:data:`CEILING_ANATOMY`,
    centred on each set's reference scan) drawn on each scan's own grid.
    Below 1 where the grids differ: a 4 mm slice and a 3 mm slice cannot
    agree on a thin cortex (the Lesjak pairs), whatever the segmenter. A
    proxy, as the anatomy is not the scans' own."""
    root = root or data_root()
    if not (root / CEILING_ANATOMY).is_file():
        return {}
    anatomy = load_volume(root / CEILING_ANATOMY, dtype=None)

    def centre(vol: Volume) -> np.ndarray:   # RAS (mm) of a grid's centre
        return (vol.affine @ np.r_[(np.array(vol.shape[:3]) - 1) / 2, 1])[:3]

    def perfect(vol: Volume, ref: Volume, to_ref: np.ndarray) -> np.ndarray:
        place = np.eye(4)   # reference RAS -> anatomy RAS: the two grids' centres together
        place[:3, 3] = centre(anatomy) - centre(ref)
        return _perfect_labels(vol, place @ to_ref, anatomy)
    return _score_sets(perfect, sets, root)


# ---------------------------------------------------------------- registration

@dataclass(frozen=True)
class RegCase:
    """A real pair: ``moving`` and ``fixed`` name Lesjak p01 scans
    (``study1_T1W``...). The reference comes from the dataset's ITK affines."""
    name: str
    moving: str
    fixed: str

    @property
    def contrast(self) -> str:
        """The moving image's contrast (for grouping cases like the others)."""
        return self.moving.split("_")[1]

    def files(self) -> list[str]:
        out = []
        for scan in (self.moving, self.fixed):
            study, contrast = scan.split("_")
            out += [f"{LJ}raw/{scan}.nii.gz", f"{LJ}raw/{study}_FLAIR_to_common_space.txt"]
            if contrast != "FLAIR":
                out.append(f"{LJ}raw/{scan}_intrastudy_to_FLAIR.txt")
        return out + [f"{LJ}derived/{self.fixed}_brainmask_derived.nii.gz"]

    def available(self, root: Path | None = None) -> bool:
        root = root or data_root()
        return all((root / f).is_file() for f in self.files())


REG_CASES = [
    RegCase("lesjak_study1_T2W_to_T1W", "study1_T2W", "study1_T1W"),
    RegCase("lesjak_study1_FLAIR_to_T1W", "study1_FLAIR", "study1_T1W"),
    *(RegCase(f"lesjak_{c}_study2_to_study1", f"study2_{c}", f"study1_{c}") for c in ("T1W", "T2W", "FLAIR")),
]


def lesjak_common_to_scan(scan: str, root: Path | None = None) -> np.ndarray:
    """4x4 map from the Lesjak common space (RAS mm) to a scan's RAS.

    The ITK files follow ITK's registration convention: ``X_to_Y.txt``
    registers moving X to fixed Y and stores the pull-back Y -> X (which
    :func:`synthtools.morph.formats.read_transform` returns as our
    fixed -> moving matrix). So ``studyN_FLAIR_to_common_space`` maps common
    -> FLAIR and ``studyN_C_intrastudy_to_FLAIR`` maps FLAIR -> C, and common
    -> C is their product. Checked against the data: the dataset's common-space
    brain mask pulled into every raw grid this way reproduces the
    ``derived/*_brainmask_derived`` masks exactly (Dice 1.0 for all six
    scans; the opposite direction gives 0.87-0.90, no transform 0.93-0.95)."""
    from .morph.formats import read_transform
    root = root or data_root()
    study, contrast = scan.split("_")
    m = read_transform(root / f"{LJ}raw/{study}_FLAIR_to_common_space.txt").matrix
    if contrast != "FLAIR":
        m = read_transform(root / f"{LJ}raw/{scan}_intrastudy_to_FLAIR.txt").matrix @ m
    return m


def reference_transform(case: RegCase, root: Path | None = None):
    """The reference pull-back fixed RAS -> moving RAS: fixed -> common -> moving."""
    from .morph.transforms import Affine
    fixed_to_common = np.linalg.inv(lesjak_common_to_scan(case.fixed, root))
    return Affine(lesjak_common_to_scan(case.moving, root) @ fixed_to_common)


def score_reg(register: Callable[[Volume, Volume], object], cases=None, root: Path | None = None) -> dict[str, float]:
    """Mean displacement error (mm) in the fixed brain per available case of
    a function (moving, fixed) -> pull-back transform (Affine or Warp)."""
    from .morph.transforms import as_geometry
    out = {}
    for case in REG_CASES if cases is None else cases:
        if not case.available(root):
            continue
        root_ = root or data_root()
        moving = load_volume(root_ / f"{LJ}raw/{case.moving}.nii.gz")
        fixed = load_volume(root_ / f"{LJ}raw/{case.fixed}.nii.gz")
        mask = load_volume(root_ / f"{LJ}derived/{case.fixed}_brainmask_derived.nii.gz").data > 0.5
        t = register(moving, fixed)
        out[case.name] = displacement_error(t, reference_transform(case, root), as_geometry(fixed), mask)
    return out
