"""Real validation cases from ``../shared/data/validation`` (never trained
on), and the metrics used to score models on them. Paths are relative to the
data root so runs work from any checkout beside ``shared/``."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from synthtools.io import Volume, load_volume


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


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / total) if total else 1.0


def surface_distance_95(a: np.ndarray, b: np.ndarray, voxsize) -> float:
    """95th-percentile symmetric surface distance (mm) between two binary
    masks on one grid of voxel size ``voxsize`` (mm per axis): the larger of
    the two directed 95th percentiles of the distances from one mask's
    boundary voxels to the other's (MONAI's convention). Thick-slice scans
    need it beside Dice: a 1-voxel shift across 4 mm slices costs little
    Dice but shows here. inf when exactly one mask is empty, 0 when both are."""
    from scipy import ndimage as ndi
    a, b = a.astype(bool), b.astype(bool)
    if not a.any() and not b.any():
        return 0.0
    if not a.any() or not b.any():
        return float("inf")
    edge = [m & ~ndi.binary_erosion(m, border_value=0) for m in (a, b)]
    sampling = [float(v) for v in voxsize]
    to_a, to_b = (ndi.distance_transform_edt(~e, sampling=sampling) for e in edge)
    return float(max(np.percentile(to_b[edge[0]], 95), np.percentile(to_a[edge[1]], 95)))


def neck_crop(mask: np.ndarray, affine: np.ndarray, min_area_mm2: float = 1000.0) -> np.ndarray:
    """Boolean region keeping voxels above the lowest axial (world z) level
    where the reference mask's cross-section reaches ``min_area_mm2``: below
    that the mask is spinal cord, which brain-extraction tools disagree on."""
    ijk = np.indices(mask.shape).reshape(3, -1)
    z = (affine[2, :3] @ ijk + affine[2, 3]).reshape(mask.shape)
    zs = np.round(z[mask > 0]).astype(int)
    levels, counts = np.unique(zs, return_counts=True)
    area = counts * float(np.prod(np.linalg.norm(affine[:3, :3], axis=0)))
    # area per ~1 mm level in mm^2 (voxel volume / 1 mm)
    ok = levels[area >= min_area_mm2]
    return z >= (ok.min() if len(ok) else -np.inf)


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

# SynthSeg labels merged into BrainWeb's tissue classes.
TISSUE = {
    "CSF": (4, 5, 14, 15, 24, 43, 44),
    "GM": (3, 42, 8, 47, 10, 49, 11, 50, 12, 51, 13, 52, 17, 53, 18, 54, 26, 58),
    "WM": (2, 41, 7, 46, 16, 28, 60),
}
BRAINWEB_CLASS = {"CSF": 1, "GM": 2, "WM": 3}
LARGE = (2, 41, 3, 42, 4, 43, 7, 46, 8, 47, 10, 49, 12, 51)  # WM, cortex, ventricles, cerebellum, thalamus, putamen


def seg_dice(pred: np.ndarray, ref: np.ndarray, labels) -> dict[int, float]:
    """Dice per label value present in the reference."""
    return {int(k): dice(pred == k, ref == k) for k in labels if (ref == k).any()}


def aseg_scores(pred: np.ndarray, ref: np.ndarray) -> tuple[dict[int, float], float, float]:
    """Against a FreeSurfer aseg: Dice per SynthSeg label present, their mean,
    and the mean over the large structures."""
    from .generator.labels import SYNTHSEG_LABELS
    d = seg_dice(pred, ref, SYNTHSEG_LABELS[1:])
    return d, float(np.mean(list(d.values()))), float(np.mean([d[k] for k in LARGE if k in d]))


# FreeSurfer aseg labels outside the SynthSeg 2.0 set that the training label maps draw as part
# of a SynthSeg structure (measured on the vxm scan: 75 % of our labels on the choroid plexus
# say lateral ventricle, 96 % on the corpus callosum say cerebral white matter).
ASEG_IN_VENTRICLE = {31: 4, 63: 43}               # choroid plexus, left/right
ASEG_IN_WHITE_MATTER = (77, 251, 252, 253, 254, 255)  # WM hypointensities, corpus callosum


def aseg_in_protocol(ref: np.ndarray) -> np.ndarray:
    """A FreeSurfer aseg relabelled into the SynthSeg training protocol:
    choroid plexus into its lateral ventricle, corpus callosum and WM
    hypointensities into the cerebral white matter of their hemisphere
    (the side of the plane halfway between the left and right white-matter
    centroids, perpendicular to the line joining them; voxel units). Every
    other label is unchanged."""
    out = np.asarray(ref).copy()
    for k, v in ASEG_IN_VENTRICLE.items():
        out[out == k] = v
    moved = np.isin(out, ASEG_IN_WHITE_MATTER)
    if moved.any() and (out == 2).any() and (out == 41).any():   # no hemispheres: left as they are
        left, right = (np.argwhere(out == k).mean(0) for k in (2, 41))
        normal = right - left
        side = (np.argwhere(moved) - (left + right) / 2) @ normal
        out[moved] = np.where(side < 0, 2, 41)
    return out


def tissue_classes(labels: np.ndarray) -> np.ndarray:
    """SynthSeg/aseg labels -> BrainWeb classes (0 other, 1 CSF, 2 GM, 3 WM)."""
    out = np.zeros(labels.shape, np.uint8)
    for cls, labs in TISSUE.items():
        out[np.isin(labels, labs)] = BRAINWEB_CLASS[cls]
    return out


def tissue_dice(pred: np.ndarray, ref_classes: np.ndarray) -> dict[str, float]:
    """Dice per tissue class (CSF, GM, WM) of SynthSeg labels vs BrainWeb classes."""
    pred_classes = tissue_classes(pred)
    return {cls: dice(pred_classes == k, ref_classes == k) for cls, k in BRAINWEB_CLASS.items()}


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


def tissue_consistency(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over CSF, GM and WM of the Dice between two SynthSeg label maps
    of one anatomy on one grid, merged into tissue classes (1 when they
    agree, lower the more they differ; a class neither map has counts 1)."""
    ca, cb = tissue_classes(a), tissue_classes(b)
    return float(np.mean([dice(ca == k, cb == k) for k in BRAINWEB_CLASS.values()]))


def _onto_reference(labels: np.ndarray, vol: Volume, ref: Volume, cset: ConsistencySet, scans) -> np.ndarray:
    """A label map of ``vol`` resampled (nearest) onto the reference's grid."""
    from synthtools.conform import resample
    affine = vol.affine
    if cset.grid == "lesjak":
        # common -> scan maps of both scans: scan RAS -> reference RAS is ref_c @ inv(scan_c).
        scan_name, ref_name = (Path(p).name.removesuffix(".nii.gz") for p in scans)
        to_ref = lesjak_common_to_scan(ref_name) @ np.linalg.inv(lesjak_common_to_scan(scan_name))
        affine = to_ref @ affine
    elif cset.grid != "same":
        raise ValueError(f"unknown grid kind {cset.grid!r}")
    return resample(labels.astype(np.int32), affine, ref.affine, ref.shape, order=0)


def score_consistency(predict_labels: Callable[[Volume], np.ndarray], sets=None,
                      root: Path | None = None) -> dict[str, float]:
    """``consistency_<set>_<contrast>``: tissue-class Dice between our labels
    on the reference T1 and on another contrast of the same anatomy
    (:func:`tissue_consistency`), on the reference's grid; plus
    ``consistency_mean`` over them all. No manual labels needed."""
    root = root or data_root()
    out: dict[str, float] = {}
    for cset in CONSISTENCY_SETS if sets is None else sets:
        if not cset.available(root):
            continue
        (_, ref_path), *others = cset.scans
        ref = load_volume(root / ref_path)
        ref_labels = predict_labels(ref)
        for contrast, path in others:
            vol = load_volume(root / path)
            moved = _onto_reference(predict_labels(vol), vol, ref, cset, (path, ref_path))
            out[f"consistency_{cset.name}_{contrast}"] = tissue_consistency(ref_labels, moved)
    if out:
        out["consistency_mean"] = float(np.mean(list(out.values())))
    return out


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
    from synthtools.morph.formats import read_transform
    root = root or data_root()
    study, contrast = scan.split("_")
    m = read_transform(root / f"{LJ}raw/{study}_FLAIR_to_common_space.txt").matrix
    if contrast != "FLAIR":
        m = read_transform(root / f"{LJ}raw/{scan}_intrastudy_to_FLAIR.txt").matrix @ m
    return m


def reference_transform(case: RegCase, root: Path | None = None):
    """The reference pull-back fixed RAS -> moving RAS: fixed -> common -> moving."""
    from synthtools.morph.transforms import Affine
    fixed_to_common = np.linalg.inv(lesjak_common_to_scan(case.fixed, root))
    return Affine(lesjak_common_to_scan(case.moving, root) @ fixed_to_common)


def displacement_error(t, ref, fixed_grid, mask: np.ndarray) -> float:
    """Mean distance (mm) between where ``t`` and ``ref`` (pull-backs:
    Affine, or Warp on ``fixed_grid``) send the fixed voxels inside ``mask``."""
    from synthtools.morph.transforms import Affine, as_geometry
    g = as_geometry(fixed_grid)

    def apply(m, pts):   # pts @ m[:3, :3].T + m[:3, 3], without BLAS (slow when cores are busy)
        return sum(pts[:, k:k + 1] * m[:3, k] for k in range(3)) + m[:3, 3]

    world = apply(g.affine, np.argwhere(mask).astype(np.float64))

    def moved(x):
        if isinstance(x, Affine):
            return apply(x.matrix, world)
        if not x.grid.same_grid(g):
            raise ValueError("displacement_error: the warp is not on the fixed grid")
        return world + x.disp[mask]
    return float(np.mean(np.linalg.norm(moved(t) - moved(ref), axis=1)))


def score_reg(register: Callable[[Volume, Volume], object], cases=None, root: Path | None = None) -> dict[str, float]:
    """Mean displacement error (mm) in the fixed brain per available case of
    a function (moving, fixed) -> pull-back transform (Affine or Warp)."""
    from synthtools.morph.transforms import as_geometry
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
