"""FreeSurfer compatibility of our transform files, judged by surfa (FreeSurfer's
own Python I/O library, a test dependency only): our LTA and MGH warp files
read by surfa, surfa's read by us, to the precision of each format.

This is also the evidence for keeping our own writers (issue 31): both
directions agree to machine precision for LTA and exactly for the warp values,
while surfa 0.6 cannot read an MGH warp under numpy 2 at all (it calls
``np.fromstring`` in binary mode, removed in numpy 2; patched below).
"""
from __future__ import annotations

import numpy as np
import pytest
from conftest import rotation  # noqa: E402  (pytest puts tests/ on sys.path)

from synthtools.morph import Affine, Geometry, Warp, read_transform, write_transform
from helpers import affine_of  # noqa: E402

sf = pytest.importorskip("surfa")

FIXED_SHAPE = (20, 22, 18)
MOVING_SHAPE = (18, 16, 21)
# Oblique, anisotropic; the moving grid sheared too (FreeSurfer's fields keep a shear exactly).
FIXED_AFFINE = affine_of(rotation((8, -6, 11)) @ np.diag([2.0, 1.8, 2.2]), (3.0, -5.0, 8.0), FIXED_SHAPE)
SHEAR = np.array([[1.0, 0.1, 0.0], [0.0, 1.0, 0.05], [0.0, 0.0, 1.0]])
MOVING_AFFINE = affine_of(rotation((-20, 5, 30)) @ SHEAR @ np.diag([1.1, 0.9, 3.0]), (6.0, -2.0, 4.0),
                          MOVING_SHAPE)
LTA_TOL = 1e-6      # LTA: text, 16 significant digits
MGH_GEOM_TOL = 1e-5  # MGH: voxel sizes, directions and centre are float32 fields (mm)


def fixed_geom() -> Geometry:
    return Geometry(FIXED_SHAPE, FIXED_AFFINE, None)


def moving_geom() -> Geometry:
    return Geometry(MOVING_SHAPE, MOVING_AFFINE, None)


def pull_back(seed: int) -> np.ndarray:
    """Our convention: fixed RAS -> moving RAS (rotation, scale, shift in mm)."""
    rng = np.random.default_rng(seed)
    m = np.eye(4)
    m[:3, :3] = rotation(rng.uniform(-12, 12, 3)) @ np.diag(rng.uniform(0.9, 1.1, 3))
    m[:3, 3] = rng.uniform(-4, 4, 3)
    return m


def surfa_geometry(shape, affine):
    return sf.ImageGeometry(shape, vox2world=affine)


def same_geometry(theirs, shape, affine, tol) -> bool:
    return tuple(int(n) for n in theirs.shape) == tuple(shape) and np.allclose(theirs.vox2world.matrix, affine,
                                                                              atol=tol, rtol=0)


@pytest.fixture
def surfa_reads_mgh(monkeypatch):
    # surfa 0.6.3 reads MGH data with np.fromstring(bytes, dtype), whose binary
    # mode numpy 2 removed: without this, sf.load_warp raises ValueError.
    monkeypatch.setattr(np, "fromstring", lambda b, dtype=float: np.frombuffer(b, dtype=dtype).copy())


# --------------------------------------------------------------------- LTA --

@pytest.mark.parametrize("seed", [0, 1])
def test_our_lta_read_by_surfa(seed, tmp_path):
    m = pull_back(seed)
    path = write_transform(Affine(m, fixed_geom(), moving_geom()), tmp_path / "t.lta")
    theirs = sf.load_affine(str(path))
    assert theirs.space == "world"
    # FreeSurfer's matrix is the push-forward: moving (source) RAS -> fixed (target) RAS.
    assert np.allclose(theirs.matrix, np.linalg.inv(m), atol=LTA_TOL, rtol=0)
    assert same_geometry(theirs.source, MOVING_SHAPE, MOVING_AFFINE, LTA_TOL)
    assert same_geometry(theirs.target, FIXED_SHAPE, FIXED_AFFINE, LTA_TOL)


@pytest.mark.parametrize("seed", [0, 1])
def test_surfa_lta_read_by_us(seed, tmp_path):
    m = pull_back(seed)
    theirs = sf.Affine(np.linalg.inv(m), source=surfa_geometry(MOVING_SHAPE, MOVING_AFFINE),
                       target=surfa_geometry(FIXED_SHAPE, FIXED_AFFINE), space="world")
    theirs.save(str(tmp_path / "s.lta"))
    assert "LINEAR_RAS_TO_RAS" in (tmp_path / "s.lta").read_text()
    ours = read_transform(tmp_path / "s.lta")
    assert isinstance(ours, Affine)
    assert np.allclose(ours.matrix, m, atol=LTA_TOL, rtol=0)
    assert ours.moving.shape == MOVING_SHAPE and np.allclose(ours.moving.affine, MOVING_AFFINE, atol=LTA_TOL, rtol=0)
    assert ours.fixed.shape == FIXED_SHAPE and np.allclose(ours.fixed.affine, FIXED_AFFINE, atol=LTA_TOL, rtol=0)


def test_lta_files_of_both_writers_read_the_same_by_both_readers(tmp_path):
    m = pull_back(2)
    ours_path = write_transform(Affine(m, fixed_geom(), moving_geom()), tmp_path / "ours.lta")
    sf.Affine(np.linalg.inv(m), source=surfa_geometry(MOVING_SHAPE, MOVING_AFFINE),
              target=surfa_geometry(FIXED_SHAPE, FIXED_AFFINE), space="world").save(str(tmp_path / "theirs.lta"))
    a, b = read_transform(ours_path), read_transform(tmp_path / "theirs.lta")
    assert np.allclose(a.matrix, b.matrix, atol=1e-9, rtol=0)
    assert a.fixed.same_grid(b.fixed, tol=1e-9) and a.moving.same_grid(b.moving, tol=1e-9)
    x, y = sf.load_affine(str(ours_path)), sf.load_affine(str(tmp_path / "theirs.lta"))
    assert np.allclose(x.matrix, y.matrix, atol=1e-9, rtol=0)
    assert np.allclose(x.source.vox2world.matrix, y.source.vox2world.matrix, atol=1e-9, rtol=0)
    assert np.allclose(x.target.vox2world.matrix, y.target.vox2world.matrix, atol=1e-9, rtol=0)


# --------------------------------------------------------------- MGH warp --

def random_disp(seed: int) -> np.ndarray:
    """A displacement field in mm (RAS), float32 as both formats store it."""
    return np.random.default_rng(seed).normal(0.0, 3.0, FIXED_SHAPE + (3,)).astype(np.float32)


@pytest.mark.parametrize("ext", [".mgz", ".mgh"])
def test_our_mgh_warp_read_by_surfa(ext, tmp_path, surfa_reads_mgh):
    disp = random_disp(0)
    path = write_transform(Warp(disp, fixed_geom()), tmp_path / f"w{ext}", moving=moving_geom())
    theirs = sf.load_warp(str(path))
    assert theirs.format == sf.Warp.Format.disp_ras
    assert np.array_equal(np.asarray(theirs.data, dtype=np.float32), disp)
    assert same_geometry(theirs.geom, FIXED_SHAPE, FIXED_AFFINE, MGH_GEOM_TOL)
    assert same_geometry(theirs.source, MOVING_SHAPE, MOVING_AFFINE, MGH_GEOM_TOL)
    # Both readers decode the same float32 fields: the same geometry to double precision.
    ours = read_transform(path)
    assert np.allclose(theirs.geom.vox2world.matrix, ours.grid.affine, atol=1e-9, rtol=0)
    assert np.allclose(theirs.source.vox2world.matrix, ours.moving.affine, atol=1e-9, rtol=0)


@pytest.mark.parametrize("ext", [".mgz", ".mgh"])
def test_surfa_mgh_warp_read_by_us(ext, tmp_path, surfa_reads_mgh):
    disp = random_disp(1)
    theirs = sf.Warp(disp, source=surfa_geometry(MOVING_SHAPE, MOVING_AFFINE),
                     target=surfa_geometry(FIXED_SHAPE, FIXED_AFFINE), format=sf.Warp.Format.disp_ras)
    theirs.save(str(tmp_path / f"s{ext}"))
    ours = read_transform(tmp_path / f"s{ext}")
    assert isinstance(ours, Warp)
    assert np.array_equal(ours.disp, disp)
    assert ours.grid.shape == FIXED_SHAPE and np.allclose(ours.grid.affine, FIXED_AFFINE, atol=MGH_GEOM_TOL, rtol=0)
    assert ours.moving.shape == MOVING_SHAPE
    assert np.allclose(ours.moving.affine, MOVING_AFFINE, atol=MGH_GEOM_TOL, rtol=0)
    back = sf.load_warp(str(tmp_path / f"s{ext}"))
    assert np.allclose(back.geom.vox2world.matrix, ours.grid.affine, atol=1e-9, rtol=0)

