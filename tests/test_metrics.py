"""synthtools.metrics on real arrays: overlaps of known size, surface
distances in mm on anisotropic grids, tissue merges, aseg relabelling;
and synthtools.evaluation's data root and the names training still reads."""
import numpy as np
import pytest

from synthtools import metrics as M


def _box(shape, lo, hi) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def _ball_mm(centre_mm, radius_mm: float, shape, voxsize) -> np.ndarray:
    """Voxels whose centre (mm, voxel (0,0,0) at the origin) lies in a ball."""
    x = np.indices(shape) * np.asarray(voxsize, float)[:, None, None, None]
    return np.linalg.norm(x - np.asarray(centre_mm, float)[:, None, None, None], axis=0) <= radius_mm


def test_dice_of_known_overlaps():
    a = _box((20, 20, 20), (0, 0, 0), (10, 10, 10))          # 1000 voxels
    half = _box((20, 20, 20), (5, 0, 0), (15, 10, 10))       # 1000 voxels, 500 shared
    assert M.dice(a, half) == pytest.approx(0.5)
    assert M.dice(a, a) == 1.0
    assert M.dice(a, ~a) == 0.0
    inside = _box((20, 20, 20), (0, 0, 0), (5, 10, 10))      # 500 voxels, all in a: 2*500/1500
    assert M.dice(a, inside) == pytest.approx(2 / 3)
    assert M.dice(np.zeros((4, 4, 4)), np.zeros((4, 4, 4))) == 1.0   # both empty: agree
    assert M.dice(a.astype(np.uint8) * 7, half.astype(np.float32)) == pytest.approx(0.5)  # any nonzero is in


def test_surface_distance_of_shifted_spheres_in_mm_on_anisotropic_voxels():
    vs, shape = (1.0, 1.0, 2.5), (40, 40, 20)
    c = np.array([20.0, 20.0, 25.0])
    a = _ball_mm(c, 12, shape, vs)
    through = _ball_mm(c + [0, 0, 5], 12, shape, vs)   # 2 slices of 2.5 mm
    in_plane = _ball_mm(c + [3, 0, 0], 12, shape, vs)  # 3 voxels of 1 mm
    # The poles move by the full shift, so the 95th percentile is the shift itself.
    assert M.surface_distance_95(a, through, vs) == pytest.approx(5.0)
    assert M.surface_distance_95(through, a, vs) == pytest.approx(5.0)   # symmetric
    assert M.surface_distance_95(a, in_plane, vs) == pytest.approx(3.0)
    # Voxel units would hide the slice thickness: 2 voxels, not 5 mm.
    assert M.surface_distance_95(a, through, (1, 1, 1)) == pytest.approx(2.0)
    # Dice of two equal balls d apart is their lens volume over one ball:
    # 1 - 3d/(4r) + d^3/(16r^3) = 0.692 for d = 5, r = 12 mm (voxels approximate it).
    assert M.dice(a, through) == pytest.approx(1 - 3 * 5 / 48 + 125 / (16 * 12 ** 3), abs=0.02)


def _cube(half: int, n: int = 40) -> np.ndarray:
    m = np.zeros((n, n, n), bool)
    c = n // 2
    m[c - half:c + half + 1, c - half:c + half + 1, c - half:c + half + 1] = True
    return m


def _ball(radius: float, n: int = 48) -> np.ndarray:
    r = np.linalg.norm(np.indices((n, n, n)) - (n - 1) / 2, axis=0)
    return r <= radius


def test_surface_distance_95_measures_the_gap_between_boundaries_in_mm():
    inner, outer = _ball(12), _ball(15)
    # Concentric spheres 3 voxels apart: 3 voxels, plus the voxel staircase.
    gap = M.surface_distance_95(inner, outer, (1, 1, 1))
    assert 3.0 <= gap <= 4.0
    assert M.surface_distance_95(outer, inner, (2, 2, 2)) == pytest.approx(2 * gap)  # mm, not voxels
    assert M.surface_distance_95(inner, inner, (1, 1, 1)) == 0.0
    # A one-slice shift across 4 mm slices: the faces across them move 4 mm.
    cube = _cube(10)
    assert M.surface_distance_95(cube, np.roll(cube, 1, axis=2), (1, 1, 4)) == pytest.approx(4.0)
    assert M.surface_distance_95(cube, np.zeros_like(cube), (1, 1, 1)) == float("inf")
    assert M.surface_distance_95(np.zeros((3, 3, 3)), np.zeros((3, 3, 3)), (1, 1, 1)) == 0.0


def test_mask_scores_only_count_the_region():
    vs = (1.0, 1.0, 2.0)
    ref = _box((30, 30, 30), (5, 5, 5), (25, 25, 25))
    pred = ref.copy()
    pred[:, :, :5] = True          # a slab of "cord" below the brain, outside the region
    region = np.zeros(ref.shape, bool)
    region[:, :, 5:] = True
    s = M.mask_scores(pred, ref, region, vs)
    assert s == {"dice": 1.0, "sd95_mm": 0.0, "mask_voxels": 20 ** 3, "reference_voxels": 20 ** 3}
    everywhere = M.mask_scores(pred, ref, np.ones(ref.shape, bool), vs)
    assert everywhere["dice"] < 1.0 and everywhere["mask_voxels"] == 20 ** 3 + 30 * 30 * 5


def test_neck_crop_keeps_the_brain_and_drops_the_cord():
    # 2 mm voxels, world z = 2 * k: a 20x20-voxel brain (1600 mm^2 per level)
    # above a 3x3-voxel cord (36 mm^2), which the 1000 mm^2 threshold drops.
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    mask = _box((30, 30, 40), (5, 5, 20), (25, 25, 35)) | _box((30, 30, 40), (13, 13, 0), (16, 16, 20))
    region = M.neck_crop(mask, affine)
    assert region.shape == mask.shape
    assert not region[..., :20].any() and region[..., 20:].all()


def test_tissue_merges_and_dice():
    labels = np.array([[[2, 41, 3, 42, 4, 17, 0, 99]]])    # WM WM GM GM CSF GM(hippocampus) other unknown
    assert M.tissue_classes(labels).tolist() == [[[3, 3, 2, 2, 1, 2, 0, 0]]]
    ref_classes = np.array([[[3, 3, 2, 2, 1, 1, 0, 0]]])   # the reference calls the hippocampus CSF
    d = M.tissue_dice(labels, ref_classes)
    assert d["WM"] == 1.0
    assert d["GM"] == pytest.approx(2 * 2 / (3 + 2))
    assert d["CSF"] == pytest.approx(2 * 1 / (1 + 2))
    assert M.tissue_consistency(labels, labels) == 1.0


def test_label_dice_and_aseg_scores():
    ref = np.zeros((10, 10, 10), np.int32)
    ref[:5] = 2      # left cerebral WM (large)
    ref[5:] = 41     # right cerebral WM (large)
    ref[0, 0, 0] = 17    # left hippocampus, one voxel
    pred = ref.copy()
    pred[pred == 17] = 2            # hippocampus missed
    d = M.seg_dice(pred, ref, (2, 41, 17, 53))
    assert set(d) == {2, 41, 17}    # 53 is absent from the reference: not scored
    assert d[17] == 0.0 and d[41] == 1.0
    assert d[2] == pytest.approx(2 * 499 / (500 + 499))
    per, mean, large = M.aseg_scores(pred, ref)
    assert per == d and mean == pytest.approx(np.mean(list(d.values())))
    assert large == pytest.approx((d[2] + d[41]) / 2)   # the hippocampus is not a large structure


def test_group_means_of_cases_scored():
    m = M.with_group_means({"a": 0.8, "b": 0.6, "c_mean": 0.5, "d_GM": 0.2, "d_WM": 0.4},
                           {"a": "T1", "b": "T1", "c": "T2", "d": "PD", "e": "CT"})
    assert m["mean_T1"] == pytest.approx(0.7) and m["mean_T2"] == 0.5
    assert m["mean_PD"] == pytest.approx(0.3) and "mean_CT" not in m     # e was not scored
    assert M.case_score(m, "zzz") is None


def test_data_root_follows_the_environment(monkeypatch, tmp_path):
    from synthtools.evaluation import STRIP_CASES, data_root
    monkeypatch.setenv("SYNTHTOOLS_DATA", str(tmp_path))
    assert data_root() == tmp_path
    assert not any(c.available() for c in STRIP_CASES)     # an empty root has no case
    monkeypatch.delenv("SYNTHTOOLS_DATA")
    assert data_root().parts[-2:] == ("shared", "data")


def test_training_validation_reads_the_one_evaluation_layer():
    """Recipes of runs started before the move look these names up here."""
    import synthtools.evaluation as E
    from synthtools.training import validation as V
    for name in ("score_seg", "score_consistency", "SEG_CASES", "CONSISTENCY_SETS", "score_strip",
                 "STRIP_CASES", "score_reg", "REG_CASES", "data_root"):
        assert getattr(V, name) is getattr(E, name)
