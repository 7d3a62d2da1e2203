"""Transform files and ``synthmorph apply``: LTA, ITK text, NIfTI and MGZ
displacement fields; conventions (pull-back, RAS/LPS, FreeSurfer's
push-forward LTA); resampling, -H, and one-line errors with no output.

Small grids (about 20^3) keep the whole file to a few seconds.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import rotation  # noqa: E402  (pytest puts tests/ on sys.path)

from synthtools.cli import morph as cli
from synthtools.conform import resample
from synthtools.io import InputError, load_volume
from synthtools.morph import (Affine, Geometry, Warp, apply_transform, compose, invert, read_transform,
                              to_dense, update_header, write_transform)
from conftest import files_under  # noqa: E402  (tests/ is on sys.path)
from helpers import affine_of, one_error_line, synthmorph  # noqa: E402

LABELS = (0, 3, 17, 41)


pytestmark = pytest.mark.usefixtures("one_thread")


FIXED_SHAPE = (20, 22, 18)
MOVING_SHAPE = (18, 16, 20)
FIXED_AFFINE = affine_of(rotation((8, -6, 11)) @ np.diag([2.0, 1.8, 2.2]), (3.0, -5.0, 8.0), FIXED_SHAPE)
MOVING_AFFINE = affine_of(np.array([[-1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]]) * 2.1, (6.0, -2.0, 4.0),
                          MOVING_SHAPE)


def random_affine(seed: int = 0) -> np.ndarray:
    """Rigid + scale pull-back matrix (fixed RAS -> moving RAS)."""
    rng = np.random.default_rng(seed)
    m = np.eye(4)
    m[:3, :3] = rotation(rng.uniform(-12, 12, 3)) @ np.diag(rng.uniform(0.9, 1.1, 3))
    m[:3, 3] = rng.uniform(-4, 4, 3)
    return m


def fixed_geom(path=None) -> Geometry:
    return Geometry(FIXED_SHAPE, FIXED_AFFINE, path)


def moving_geom(path=None) -> Geometry:
    return Geometry(MOVING_SHAPE, MOVING_AFFINE, path)


def blob(affine, shape) -> np.ndarray:
    """Smooth image of world position (a Gaussian blob plus a gradient)."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    w = idx @ affine[:3, :3].T + affine[:3, 3]
    return (100 * np.exp(-np.sum((w - [5.0, -3.0, 6.0]) ** 2, -1) / 150.0) + 0.5 * w[..., 0] + 30).astype(np.float32)


def save(path: Path, data, affine) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def data(path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def smooth_warp(grid: Geometry, amplitude=3.0) -> Warp:
    idx = np.stack(np.meshgrid(*[np.linspace(0, np.pi, n) for n in grid.shape], indexing="ij"), -1)
    disp = amplitude * np.stack([np.sin(idx[..., 1]), np.cos(idx[..., 2]), np.sin(idx[..., 0] + idx[..., 2])], -1)
    return Warp(disp.astype(np.float32), grid)



@pytest.fixture
def images(tmp_path):
    """Fixed and moving images (NIfTI, float32) on the two test grids."""
    fixed = save(tmp_path / "fixed.nii.gz", blob(FIXED_AFFINE, FIXED_SHAPE), FIXED_AFFINE)
    moving = save(tmp_path / "moving.nii.gz", blob(MOVING_AFFINE, MOVING_SHAPE), MOVING_AFFINE)
    return fixed, moving


# ------------------------------------------------------ round trips: LTA --

def test_lta_round_trip_and_freesurfer_convention(tmp_path):
    m = random_affine(1)
    t = Affine(m, fixed=fixed_geom("/data/fixed.nii.gz"), moving=moving_geom("/data/moving.mgz"))
    path = write_transform(t, tmp_path / "t.lta")
    back = read_transform(path)
    assert isinstance(back, Affine)
    assert np.allclose(back.matrix, m, atol=1e-5)
    assert back.fixed.same_grid(t.fixed, tol=1e-5) and back.moving.same_grid(t.moving, tol=1e-5)
    assert (back.fixed.path, back.moving.path) == ("/data/fixed.nii.gz", "/data/moving.mgz")

    text = Path(path).read_text()
    assert "type      = 1 # LINEAR_RAS_TO_RAS" in text
    for key in ("src volume info", "dst volume info", "valid = 1", "filename = /data/moving.mgz",
                "volume = 18 16 20", "voxelsize =", "xras   =", "yras   =", "zras   =", "cras   ="):
        assert key in text, key
    # FreeSurfer stores the push-forward: moving (src) RAS -> fixed (dst) RAS.
    lines = text.splitlines()
    k = lines.index("1 4 4")
    stored = np.array([[float(v) for v in lines[k + i].split()] for i in range(1, 5)])
    assert np.allclose(stored, np.linalg.inv(m), atol=1e-12)
    # src block = moving grid: cras is the world point of voxel shape/2 (FreeSurfer's centre).
    src = lines[lines.index("src volume info") + 1:lines.index("dst volume info")]
    cras = [float(v) for v in next(s for s in src if s.startswith("cras")).split()[2:]]
    assert np.allclose(cras, MOVING_AFFINE[:3, :3] @ (np.array(MOVING_SHAPE) / 2) + MOVING_AFFINE[:3, 3])


def test_lta_matches_surfa_and_reads_vox2vox_and_surf_types(tmp_path):
    sf = pytest.importorskip("surfa")
    m = random_affine(2)
    path = write_transform(Affine(m, fixed_geom(), moving_geom()), tmp_path / "t.lta")
    theirs = sf.load_affine(str(path))  # surfa's LTA reader (text only)
    assert theirs.space == "world"
    assert np.allclose(theirs.matrix, np.linalg.inv(m), atol=1e-9)
    assert np.allclose(theirs.source.vox2world.matrix, MOVING_AFFINE, atol=1e-9)
    assert np.allclose(theirs.target.vox2world.matrix, FIXED_AFFINE, atol=1e-9)
    # surfa writes LINEAR_VOX_TO_VOX and LINEAR_SURF_TO_SURF (tkregister) versions.
    for space, code in (("voxel", 0), ("surf", 3)):
        out = tmp_path / f"{space}.lta"
        theirs.convert(space=space).save(str(out))
        assert f"type      = {code}" in out.read_text()
        assert np.allclose(read_transform(out).matrix, m, atol=1e-6), space


def test_lta_vox2vox_without_volume_info_needs_the_images(tmp_path):
    vox2vox = np.linalg.inv(FIXED_AFFINE) @ np.linalg.inv(random_affine(3)) @ MOVING_AFFINE  # moving vox -> fixed vox
    text = Path(write_transform(Affine(np.eye(4)), tmp_path / "x.lta")).read_text()
    lines = text.replace("type      = 1 # LINEAR_RAS_TO_RAS", "type      = 0 # LINEAR_VOX_TO_VOX").splitlines()
    k = lines.index("1 4 4")
    lines[k + 1:k + 5] = [" ".join(f"{v:.15e}" for v in row) for row in vox2vox]
    (tmp_path / "v.lta").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match="volume info"):
        read_transform(tmp_path / "v.lta")
    t = read_transform(tmp_path / "v.lta", fixed=fixed_geom(), moving=moving_geom())
    assert np.allclose(t.matrix, random_affine(3), atol=1e-6)


# ------------------------------------------------------ round trips: ITK --

def test_itk_round_trip_lps_and_centre(tmp_path):
    m = random_affine(4)
    path = write_transform(Affine(m), tmp_path / "t.txt")
    text = Path(path).read_text()
    assert text.startswith("#Insight Transform File V1.0") and "AffineTransform_double_3_3" in text
    assert np.allclose(read_transform(path).matrix, m, atol=1e-12)
    assert np.allclose(read_transform(write_transform(Affine(m), tmp_path / "t.tfm")).matrix, m, atol=1e-12)

    # Hand-written: LPS pull-back x -> A (x - c) + t + c with a non-zero centre.
    a = rotation((5, 10, -7)) * 1.05
    tr, c = np.array([1.5, -2.0, 3.0]), np.array([10.0, -20.0, 30.0])
    for name in ("AffineTransform_double_3_3", "MatrixOffsetTransformBase_double_3_3"):
        (tmp_path / "c.txt").write_text(
            f"#Insight Transform File V1.0\n#Transform 0\nTransform: {name}\n"
            f"Parameters: {' '.join(map(str, [*a.ravel(), *tr]))}\nFixedParameters: {' '.join(map(str, c))}\n")
        t = read_transform(tmp_path / "c.txt")
        x_ras = np.array([7.0, 3.0, -4.0])
        x_lps = x_ras * [-1, -1, 1]
        y_lps = a @ (x_lps - c) + tr + c
        assert np.allclose(t.matrix[:3, :3] @ x_ras + t.matrix[:3, 3], y_lps * [-1, -1, 1]), name


# --------------------------------------------------- round trips: fields --

def test_nifti_displacement_field_round_trip_and_layout(tmp_path):
    w = smooth_warp(fixed_geom())
    path = write_transform(w, tmp_path / "w.nii.gz")
    img = nib.load(path)
    assert img.shape == FIXED_SHAPE + (1, 3)
    assert int(img.header["intent_code"]) == 1007
    assert np.allclose(img.affine, FIXED_AFFINE, atol=1e-5)
    stored = np.asarray(img.dataobj)[:, :, :, 0, :]
    assert np.allclose(stored, w.disp * [-1, -1, 1], atol=1e-6)  # LPS on disk
    back = read_transform(path)
    assert isinstance(back, Warp) and back.grid.same_grid(w.grid, tol=1e-5)
    assert np.allclose(back.disp, w.disp, atol=1e-5)

    # Intent 1006 (NIFTI_INTENT_DISPVECT, FreeSurfer/surfa): RAS vectors.
    ras = nib.Nifti1Image(w.disp[:, :, :, None, :], FIXED_AFFINE)
    ras.header.set_intent("displacement vector")
    nib.save(ras, str(tmp_path / "ras.nii.gz"))
    assert np.allclose(read_transform(tmp_path / "ras.nii.gz").disp, w.disp, atol=1e-6)


def test_mgz_warp_round_trip_and_freesurfer_layout(tmp_path, monkeypatch):
    w = smooth_warp(fixed_geom())
    path = write_transform(w, tmp_path / "w.mgz", moving=moving_geom())
    back = read_transform(path)
    assert np.allclose(back.disp, w.disp, atol=1e-5)
    assert back.grid.same_grid(w.grid, tol=1e-4) and back.moving.same_grid(moving_geom(), tol=1e-4)
    with gzip.open(path, "rb") as f:
        head = f.read(28)
    version, *shape = struct.unpack(">7i", head)[:5]
    assert version == (3 << 8) | 1 and shape == [*FIXED_SHAPE, 3]  # MGZ_WARPMAP intent, 3 frames

    sf = pytest.importorskip("surfa")
    # surfa 0.6 reads with np.fromstring's binary mode, gone from numpy 2.
    monkeypatch.setattr(np, "fromstring", lambda b, dtype=float: np.frombuffer(b, dtype=dtype).copy())
    theirs = sf.load_warp(str(path))
    assert theirs.format == sf.Warp.Format.disp_ras
    assert np.allclose(theirs.data, w.disp, atol=1e-6)
    assert np.allclose(theirs.geom.vox2world.matrix, FIXED_AFFINE, atol=1e-4)
    assert np.allclose(theirs.source.vox2world.matrix, MOVING_AFFINE, atol=1e-4)
    # The other FreeSurfer data formats, as surfa writes them, read the same.
    for fmt in (sf.Warp.Format.abs_crs, sf.Warp.Format.disp_crs, sf.Warp.Format.abs_ras):
        out = tmp_path / f"w{fmt}.mgz"
        theirs.convert(format=fmt).save(str(out))
        assert np.allclose(read_transform(out).disp, w.disp, atol=1e-3), fmt


def test_compose_invert_and_dense():
    m = random_affine(5)
    t = Affine(m, fixed_geom(), moving_geom())
    assert np.allclose(compose(t, invert(t)).matrix, np.eye(4), atol=1e-12)
    assert invert(t).fixed is t.moving
    dense = compose(t, grid=fixed_geom())  # an affine as a displacement field
    assert isinstance(dense, Warp)
    assert np.allclose(to_dense(dense, fixed_geom()), to_dense(t, fixed_geom()), atol=1e-4)
    # Warp after affine: x -> A(x + u(x)).
    w = smooth_warp(fixed_geom())
    both = compose(t, w)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in FIXED_SHAPE], indexing="ij"), -1)
    world = idx @ FIXED_AFFINE[:3, :3].T + FIXED_AFFINE[:3, 3]
    expect = (world + w.disp) @ m[:3, :3].T + m[:3, 3]
    assert np.allclose(np.moveaxis(to_dense(both, fixed_geom()), 0, -1), expect, atol=1e-3)
    with pytest.raises(TypeError):
        invert(w)


# --------------------------------------------------------------- applying --

def test_lta_and_itk_give_the_same_resampled_image(images, tmp_path, capsys):
    fixed, moving = images
    t = Affine(random_affine(6), fixed_geom(str(fixed)), moving_geom(str(moving)))
    write_transform(t, tmp_path / "t.lta")
    write_transform(t, tmp_path / "t.txt")
    assert synthmorph("apply", tmp_path / "t.lta", moving, tmp_path / "a.nii.gz", capsys=capsys)[0] == 0
    assert synthmorph("apply", tmp_path / "t.txt", moving, tmp_path / "b.nii.gz", "--fixed", fixed,
                      capsys=capsys)[0] == 0
    a, b = data(tmp_path / "a.nii.gz"), data(tmp_path / "b.nii.gz")
    assert a.shape == FIXED_SHAPE and np.allclose(nib.load(tmp_path / "a.nii.gz").affine, FIXED_AFFINE, atol=1e-5)
    assert np.allclose(a, b, atol=1e-4)
    # And both equal the moving image sampled at M x (independent check at voxel centres).
    vol = load_volume(moving)
    direct = apply_transform(t, vol, fixed_geom())
    assert np.allclose(a, direct, atol=1e-4) and np.ptp(a) > 10


@pytest.mark.parametrize("fmt", ["lta", "txt", "nii.gz", "mgz"])
def test_translation_of_5mm_along_x_moves_a_bright_voxel_5mm(tmp_path, fmt, capsys):
    aff = affine_of(np.eye(3), (1.0, 2.0, 3.0), (20, 16, 14))  # 1 mm RAS grid
    img = np.zeros((20, 16, 14), np.float32)
    img[6, 8, 7] = 100.0
    src = save(tmp_path / "dot.nii.gz", img, aff)
    push = np.eye(4)
    push[0, 3] = 5.0  # content moves +5 mm toward R: pull-back x -> x - 5 e_x
    t = Affine(np.linalg.inv(push), Geometry(img.shape, aff), Geometry(img.shape, aff))
    write_transform(t, tmp_path / f"t.{fmt}")
    extra = ["--fixed", src] if fmt == "txt" else []
    for method in ("nearest", "linear"):
        out = tmp_path / f"out_{method}.nii.gz"
        code, err = synthmorph("apply", tmp_path / f"t.{fmt}", src, out, "-m", method, *extra, capsys=capsys)
        assert code == 0, err
        moved = data(out)
        peak = np.unravel_index(np.argmax(moved), moved.shape)
        assert peak == (11, 8, 7) and moved[peak] == pytest.approx(100.0, abs=1e-3), (fmt, method)
        world_shift = (nib.load(out).affine @ [*peak, 1] - aff @ [6, 8, 7, 1])[:3]
        assert np.allclose(world_shift, [5, 0, 0])


def test_identity_reproduces_the_image(images, tmp_path, capsys):
    _, moving = images
    vol = load_volume(moving)
    g = Geometry(vol.shape, vol.affine)
    write_transform(Affine(np.eye(4), g, g), tmp_path / "id.lta")
    write_transform(Warp(np.zeros(g.shape + (3,), np.float32), g), tmp_path / "id.mgz")
    for trans in ("id.lta", "id.mgz"):
        for method, tol in (("nearest", 0.0), ("linear", 1e-4)):
            out = tmp_path / f"{method}_{trans}.nii.gz"
            assert synthmorph("apply", tmp_path / trans, moving, out, "-m", method, capsys=capsys)[0] == 0
            assert np.allclose(data(out), vol.data, rtol=0, atol=tol * np.abs(vol.data).max()), (trans, method)


def test_header_only_keeps_voxels_and_equals_resampling(images, tmp_path, capsys):
    fixed, moving = images
    m = random_affine(7)
    write_transform(Affine(m, fixed_geom(), moving_geom()), tmp_path / "t.lta")
    code, err = synthmorph("apply", "-H", tmp_path / "t.lta", moving, tmp_path / "h.nii.gz", capsys=capsys)
    assert code == 0, err
    src, out = nib.load(moving), nib.load(tmp_path / "h.nii.gz")
    assert np.array_equal(np.asarray(out.dataobj), np.asarray(src.dataobj))
    assert out.get_data_dtype() == src.get_data_dtype()
    assert np.allclose(out.affine, np.linalg.inv(m) @ MOVING_AFFINE, atol=1e-5)
    assert np.allclose(update_header(Affine(m), load_volume(moving)), np.linalg.inv(m) @ MOVING_AFFINE)
    # Resampling the -H output onto the fixed grid (identity) == apply without -H.
    assert synthmorph("apply", tmp_path / "t.lta", moving, tmp_path / "r.nii.gz", capsys=capsys)[0] == 0
    onto_fixed = resample(np.asarray(out.dataobj, np.float32), out.affine, FIXED_AFFINE, FIXED_SHAPE)
    assert np.allclose(onto_fixed, data(tmp_path / "r.nii.gz"), atol=1e-3)


def test_nearest_keeps_labels_and_type(tmp_path, capsys):
    rng = np.random.default_rng(0)
    labels = np.asarray(LABELS, np.int16)[rng.integers(0, len(LABELS), MOVING_SHAPE)]
    src = save(tmp_path / "lab.nii.gz", labels, MOVING_AFFINE)
    write_transform(Affine(random_affine(8), fixed_geom(), moving_geom()), tmp_path / "t.lta")
    out = tmp_path / "lab_moved.mgz"
    assert synthmorph("apply", tmp_path / "t.lta", src, out, "-m", "nearest", capsys=capsys)[0] == 0
    moved = data(out)
    assert moved.dtype.newbyteorder("=") == np.int16  # MGH is big-endian on disk
    assert set(np.unique(moved)) <= set(LABELS) and len(np.unique(moved)) == 4
    # -t and -f: float output, fill outside.
    out2 = tmp_path / "lab_f.nii.gz"
    assert synthmorph("apply", tmp_path / "t.lta", src, out2, "-m", "nearest", "-t", "float32", "-f", "-1",
                      capsys=capsys)[0] == 0
    assert data(out2).dtype == np.float32 and set(np.unique(data(out2))) <= set(LABELS) | {-1}


def test_warp_with_4d_image_resamples_each_frame(images, tmp_path, capsys):
    fixed, moving = images
    vol = load_volume(moving)
    frames = np.stack([vol.data, 2 * vol.data], -1)
    src = save(tmp_path / "m4.nii.gz", frames, MOVING_AFFINE)
    w = compose(Affine(random_affine(9)), smooth_warp(fixed_geom(), 1.5))
    write_transform(w, tmp_path / "w.nii.gz")
    code, err = synthmorph("apply", tmp_path / "w.nii.gz", src, tmp_path / "o4.nii.gz", moving,
                           tmp_path / "o3.nii.gz", capsys=capsys)
    assert code == 0, err
    o4, o3 = data(tmp_path / "o4.nii.gz"), data(tmp_path / "o3.nii.gz")
    assert o4.shape == FIXED_SHAPE + (2,) and o3.shape == FIXED_SHAPE
    assert np.allclose(o4[..., 0], o3, atol=1e-4) and np.allclose(o4[..., 1], 2 * o3, atol=1e-3)
    assert np.ptp(o3) > 10


# ---------------------------------------------------------------- errors --

def _write_lta(tmp_path) -> Path:
    return Path(write_transform(Affine(random_affine(10), fixed_geom(), moving_geom()), tmp_path / "t.lta"))


BAD_APPLY = {
    # name: (setup(tmp, fixed, moving) -> argv, exit code, text in the error)
    "unknown extension": (lambda t, f, m: [(t / "t.xfm").write_text("x") and t / "t.xfm", m, t / "o.nii.gz"],
                          2, "unknown transform file type '.xfm' (use .lta"),
    "missing transform": (lambda t, f, m: [t / "nope.lta", m, t / "o.nii.gz"], 1, "file not found"),
    "garbage LTA": (lambda t, f, m: [(t / "g.lta").write_text("hello\n") and t / "g.lta", m, t / "o.nii.gz"],
                    1, "not a FreeSurfer LTA"),
    "ITK without --fixed": (lambda t, f, m: [write_transform(Affine(np.eye(4)), t / "t.txt"), m, t / "o.nii.gz"],
                            2, "--fixed"),
    "field does not match --fixed": (
        lambda t, f, m: [write_transform(smooth_warp(moving_geom()), t / "w.nii.gz"), m, t / "o.nii.gz",
                         "--fixed", f], 1, "does not match"),
    "-H with a warp": (lambda t, f, m: ["-H", write_transform(smooth_warp(fixed_geom()), t / "w.mgz"), m,
                                        t / "o.nii.gz"], 2, "linear"),
    "unpaired output": (lambda t, f, m: [_write_lta(t), m, t / "o.nii.gz", f], 2, "pairs"),
    "output extension": (lambda t, f, m: [_write_lta(t), m, t / "o.png"], 2, "extension"),
    "output overwrites input": (lambda t, f, m: [_write_lta(t), m, m], 2, "overwrite an input"),
    "same output twice": (lambda t, f, m: [_write_lta(t), m, t / "o.nii.gz", f, t / "o.nii.gz"], 2, "same output"),
    "fill does not fit type": (lambda t, f, m: [_write_lta(t), m, t / "o.nii.gz", "-t", "uint8", "-f", "-1"],
                               2, "does not fit"),
    "missing image": (lambda t, f, m: [_write_lta(t), t / "nope.nii.gz", t / "o.nii.gz"], 1, "file not found"),
    "2D image": (lambda t, f, m: [_write_lta(t), save(t / "flat.nii.gz", np.ones((9, 9, 1), np.float32), np.eye(4)),
                                  t / "o.nii.gz"], 1, "2D"),
}


@pytest.mark.parametrize("case", BAD_APPLY, ids=list(BAD_APPLY))
def test_apply_bad_inputs_one_line_and_no_output(case, images, tmp_path, capsys):
    setup, expected_code, text = BAD_APPLY[case]
    fixed, moving = images
    argv = setup(tmp_path, fixed, moving)
    before = files_under(tmp_path)
    code, err = synthmorph("apply", *argv, capsys=capsys)
    assert code == expected_code, err
    assert text in one_error_line(err)
    assert files_under(tmp_path) == before


def test_read_transform_errors_are_one_line_input_errors(tmp_path):
    (tmp_path / "x.mgz").write_bytes(b"\x00" * 10)
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5, 2), np.float32), np.eye(4)), str(tmp_path / "v.nii.gz"))
    (tmp_path / "r.txt").write_text("#Insight Transform File V1.0\nTransform: Euler3DTransform_double_3_3\n"
                                    "Parameters: 0 0 0 0 0 0\nFixedParameters: 0 0 0\n")
    for name, text in (("x.mgz", "not an MGH"), ("v.nii.gz", "not a displacement field"),
                       ("r.txt", "unsupported ITK transform"), ("y.mat", "lta_convert")):
        with pytest.raises(InputError) as exc:
            read_transform(tmp_path / name)
        msg = str(exc.value)
        assert text in msg and "\n" not in msg and msg.startswith(str(tmp_path / name)), msg
    with pytest.raises(InputError, match="cannot be saved as a linear"):
        write_transform(smooth_warp(fixed_geom()), tmp_path / "w.lta")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.txt", "v.nii.gz", "x.mgz"]


# -------------------------------------------------------------- register --

def test_register_validates_then_reports_missing_model(images, tmp_path, monkeypatch, capsys):
    fixed, moving = images
    monkeypatch.setenv("SYNTHTOOLS_MODELS", str(tmp_path / "empty"))   # whatever ships
    code, err = synthmorph("register", "-m", "affine", moving, fixed, "-o", tmp_path / "moved.nii.gz",
                           "-t", tmp_path / "t.lta", "-j", "1", capsys=capsys)
    assert code == 1   # a missing model: a runtime failure, not a usage error
    assert one_error_line(err).startswith("synthmorph: error: model 'synthmorph-affine' not yet available")
    # mri_synthmorph style, no subcommand; default mode joint (affine, then deformable model).
    code, err = synthmorph(moving, fixed, "-t", tmp_path / "w.mgz", capsys=capsys)
    assert code == 1 and "model 'synthmorph-affine' not yet available" in one_error_line(err)
    assert files_under(tmp_path) == {"fixed.nii.gz", "moving.nii.gz"}


@pytest.mark.parametrize("argv, text", [
    (["-m", "deform", "{m}", "{f}", "-t", "{t}/w.lta"], ".nii.gz"),
    (["-m", "rigid", "{m}", "{f}", "-t", "{t}/w.nii.gz"], ".lta"),
    (["-m", "deform", "{m}", "{f}", "-o", "{t}/o.nii.gz", "-H"], "-H"),
    (["{m}", "{f}"], "no output"),
    (["{m}", "{f}", "-o", "{t}/o.nii.gz", "-r", "2"], "between 0 and 1"),
    (["{m}", "{f}", "-o", "{t}/o.nii.gz", "-t", "{t}/o.nii.gz"], "same output"),
    (["{m}", "{f}", "-o", "{t}/missing/o.nii.gz"], "does not exist"),
    (["{m}", "{f}", "-o", "{t}/o.nii.gz", "-i", "{t}/nope.lta"], "file not found"),
    (["{m}", "{f}", "-o", "{t}/o.nii.gz", "--frobnicate"], "unrecognized"),
])
def test_register_bad_arguments(argv, text, images, tmp_path, capsys):
    fixed, moving = images
    args = [a.format(m=moving, f=fixed, t=tmp_path) for a in argv]
    code, err = synthmorph("register", *args, capsys=capsys)
    # A missing file is bad input (1); everything else a bad command line (2).
    assert code == (1 if text == "file not found" else 2) and text in one_error_line(err)
    assert files_under(tmp_path) == {"fixed.nii.gz", "moving.nii.gz"}


def test_unknown_subcommand_and_help(capsys):
    code, err = synthmorph("aply", "x", capsys=capsys)
    assert code == 2 and "unknown subcommand 'aply'" in one_error_line(err)
    assert synthmorph("-h", capsys=None)[0] == 0
    with pytest.raises(SystemExit) as exc:
        cli.main(["apply", "-h"])
    assert exc.value.code == 0 and "--fixed" in capsys.readouterr().out
