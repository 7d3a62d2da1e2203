"""The multi-atlas prior of synthseg (synthtools.seg.atlas) and the atlas
builder (training/atlases.py): soft labels, the prior's arithmetic, label
transfer through a registration, and the ``--atlases`` option."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import assert_same_geometry  # noqa: E402  (tests/ is on sys.path)
from synthtools.seg.atlas import AtlasPrior, MovedAtlas, apply_prior, atlas_files, atlas_image, move_atlases, soft_labels
from synthtools.morph.transforms import Warp
from synthtools.cli import seg as cli
from synthtools.conform import conform
from synthtools.io import Volume, load_volume
from synthtools.seg import segment
from synthtools.weights import load_model, models_dir
from synthtools.training.atlases import crop_to_brain, synthseg_labels
from synthtools.training.generator.labels import SYNTHSEG_LABELS

LABELS = np.array(SYNTHSEG_LABELS)
pytestmark = pytest.mark.usefixtures("one_thread")


def shipped_atlas() -> Path:
    meta = json.loads((models_dir() / "synthseg" / "metadata.json").read_text())
    return models_dir() / "synthseg" / meta["atlas"]["files"][0]


def dice(a, b) -> float:
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def test_soft_labels_sum_to_one_and_sit_at_block_centres():
    rng = np.random.default_rng(0)
    labels = rng.choice(LABELS, size=(7, 6, 5)).astype(np.int32)
    labels[0, 0, 0] = 99                                   # not a target label: counts as background
    affine = np.array([[0, 0, -1.0, 30], [1.0, 0, 0, -20], [0, 1.0, 0, 5], [0, 0, 0, 1]])
    frac, out_affine = soft_labels(labels, affine, LABELS)
    assert frac.shape == (4, 3, 3, len(LABELS))            # odd sizes padded with background
    np.testing.assert_allclose(frac.sum(-1), 1.0, atol=1e-6)
    # Block (1, 1, 1) = voxels 2..3 on each axis: its fractions and its centre in world space.
    block = labels[2:4, 2:4, 2:4]
    for c, v in enumerate(LABELS):
        assert frac[1, 1, 1, c] == pytest.approx(np.mean(block == v))
    assert frac[0, 0, 0, 0] >= 1 / 8                       # the unknown value 99
    np.testing.assert_allclose(out_affine @ [1, 1, 1, 1], affine @ [2.5, 2.5, 2.5, 1])


def test_apply_prior_renormalises_and_alpha_bounds_it():
    rng = np.random.default_rng(1)
    prob = torch.softmax(torch.from_numpy(rng.normal(size=(5, 4, 3, 2))).float(), 0)
    frac = np.zeros((5, 4, 3, 2), np.float32)
    same = apply_prior(prob.clone(), frac, 0.05)           # no atlas anywhere: unchanged
    torch.testing.assert_close(same, prob)
    frac[2] = 1.0                                          # every atlas says channel 2
    out = apply_prior(prob.clone(), frac, 0.05)
    torch.testing.assert_close(out.sum(0), torch.ones(4, 3, 2))
    assert bool((out[2] > prob[2]).all())
    # A large alpha leaves the network's posteriors nearly alone.
    assert float((apply_prior(prob.clone(), frac, 1e6) - prob).abs().max()) < 1e-5
    with pytest.raises(ValueError):
        apply_prior(prob.clone(), frac, 0.0)


def test_native_fractions_count_atlases_at_world_points():
    """Two atlases on a 1 x 2 x 2 grid, identity warps: the fractions per
    region voxel; a shifted target grid reads the atlas one voxel over and
    falls outside it (background) past its edge."""
    grid = np.diag([1.0, 1.0, 1.0, 1.0])
    zero = Warp(np.zeros((1, 2, 2, 3), np.float32), ((1, 2, 2), grid))
    a = MovedAtlas(zero, np.array([[[0, 1], [2, 2]]], np.uint8), grid)
    b = MovedAtlas(zero, np.array([[[0, 2], [2, 1]]], np.uint8), grid)
    prior = AtlasPrior(np.zeros((3, 1, 2, 2), np.float32), [a, b], background=0)
    region = np.array([[[False, True], [True, True]]])
    np.testing.assert_allclose(prior.native_fractions(region, grid), [[0, 0.5, 0.5], [0, 0, 1], [0, 0.5, 0.5]])
    shifted = grid.copy()
    shifted[2, 3] = 1.0                   # target voxel (0, j, k) sits at atlas voxel (0, j, k + 1)
    np.testing.assert_allclose(prior.native_fractions(np.ones((1, 2, 1), bool), shifted),
                               [[0, 0.5, 0.5], [0, 0.5, 0.5]])
    edge = np.array([[[False, True], [False, False]]])    # reads atlas voxel (0, 0, 2): outside
    np.testing.assert_allclose(prior.native_fractions(edge, shifted), [[1, 0, 0]])


def test_atlas_image_is_t1_like_and_brain_only():
    labels = np.zeros((20, 20, 20), np.int32)
    labels[4:16, 4:16, 4:16] = 3           # cortex
    labels[7:13, 7:13, 7:13] = 2           # white matter inside
    img = atlas_image(labels)
    assert img[labels == 0].max() == 0
    assert img[10, 10, 10] > img[5, 5, 5] > 0


def test_builder_keeps_world_positions_and_folds_labels():
    labels = np.zeros((30, 32, 28), np.int32)
    labels[10:20, 8:22, 6:15] = 25         # lesion: folds into left white matter
    labels[12:14, 10:12, 8:10] = 17
    labels[2, 2, 2] = 516                  # extra-cerebral generation label: dropped
    affine = np.diag([1.0, -1.0, 1.0, 1.0])
    affine[:3, 3] = [-10, 40, 3]
    seg = synthseg_labels(labels)
    assert set(np.unique(seg)) == {0, 2, 17}
    crop, crop_affine = crop_to_brain(seg, affine, margin=2)
    assert crop.shape == (14, 18, 13)
    # The voxel of label 17 at (12, 10, 8) keeps its world position.
    ijk = np.argwhere(crop == 17).min(0)
    np.testing.assert_allclose(crop_affine @ [*ijk, 1], affine @ [12, 10, 8, 1])


@pytest.mark.slow
@pytest.mark.skipif(not (models_dir() / "synthseg" / "metadata.json").is_file(), reason="no shipped synthseg")
def test_atlas_registered_to_its_own_image_gives_back_its_labels():
    """An atlas moved onto its own synthetic image (2 mm network grid, as
    synthseg does) returns its labels on the native grid: the registration
    path, the soft and the nearest label transfer agree with the truth."""
    vol = load_volume(shipped_atlas(), dtype=None)
    labels = np.rint(vol.data).astype(np.int32)
    native = Volume(atlas_image(labels), vol.affine)
    conf = conform(native, voxsize=2.0, orientation="LIA", multiple=16)
    target = Volume((conf.data / conf.data.max()).numpy(), conf.affine)
    prior = move_atlases(target, LABELS, [shipped_atlas()])
    assert prior.fractions.shape == (len(LABELS),) + conf.shape
    total = prior.fractions.sum(0)
    assert total.max() <= 1 + 1e-4
    moved = LABELS[prior.native_fractions(np.ones(labels.shape, bool), vol.affine).argmax(1)].reshape(labels.shape)
    assert set(np.unique(moved)) <= set(LABELS)
    for v in (2, 3, 4, 10, 17, 41, 42, 16):
        assert dice(moved == v, labels == v) > 0.85, v
    soft = conf.to_native(torch.from_numpy(prior.fractions[list(LABELS).index(2)]))
    assert dice(soft > 0.5, labels == 2) > 0.8


@pytest.fixture(scope="module")
def seg_model_with_atlas(random_seg_model, tmp_path_factory) -> Path:
    """The tiny random (uninformative) model plus one shipped atlas."""
    folder = tmp_path_factory.mktemp("models") / "seg_atlas"
    shutil.copytree(random_seg_model, folder)
    shutil.copy(shipped_atlas(), folder / "atlas_01.nii.gz")
    meta = json.loads((folder / "metadata.json").read_text())
    meta["atlas"] = {"files": ["atlas_01.nii.gz"], "registration": "synthmorph-affine", "alpha": 0.05, "default": 1}
    (folder / "metadata.json").write_text(json.dumps(meta))
    return folder


@pytest.mark.slow
@pytest.mark.skipif(not (models_dir() / "synthseg" / "metadata.json").is_file(), reason="no shipped synthseg")
def test_segment_with_atlas_keeps_labels_and_geometry(seg_model_with_atlas, tmp_path, capsys):
    model = load_model(seg_model_with_atlas)
    assert len(atlas_files(model)) == 1
    vol = load_volume(shipped_atlas(), dtype=None)
    labels = np.rint(vol.data).astype(np.int32)[::2, ::2, ::2]        # a 2 mm scan: a faster test
    affine = vol.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    img = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(atlas_image(labels), affine), str(img))
    out = tmp_path / "seg.nii.gz"
    with pytest.raises(SystemExit) as exc:
        cli.main([str(img), str(out), "--model", str(seg_model_with_atlas), "--atlases", "1", "-t", "1"])
    assert exc.value.code in (0, None), capsys.readouterr().err
    result = load_volume(out, dtype=None)
    assert_same_geometry(out, img)
    assert set(np.unique(result.data)) <= set(LABELS)
    # The random network knows no anatomy: with the atlas the labels follow the anatomy.
    plain = segment(model, load_volume(img), refine=True).labels
    for v in (2, 3, 41, 42):
        assert dice(result.data == v, labels == v) > dice(plain == v, labels == v) + 0.3, v


def test_atlases_option_out_of_range_is_one_line_error(tiny_seg_model, tmp_path, make_head, capsys):
    head = make_head()
    with pytest.raises(SystemExit) as exc:
        cli.main([str(head), str(tmp_path / "s.nii.gz"), "--model", str(tiny_seg_model), "--atlases", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "--atlases 2" in err[0] and "0 atlases" in err[0]
    assert not (tmp_path / "s.nii.gz").exists()


@pytest.mark.slow
@pytest.mark.skipif(not (models_dir() / "synthseg" / "metadata.json").is_file(), reason="no shipped synthseg")
def test_no_brain_for_the_atlases_falls_back_with_a_warning(tmp_path, capsys):
    """An image the registration finds no brain in (uniform noise) is still
    segmented, without the atlases, and the CLI says so on one line."""
    noise = np.random.default_rng(0).random((64, 64, 64)).astype(np.float32)
    img = tmp_path / "noise.nii.gz"
    nib.save(nib.Nifti1Image(noise, np.eye(4)), str(img))
    result = segment(load_model("synthseg"), load_volume(img), refine=True, atlases=1)
    assert result.atlases_used == 0 and result.labels.shape == noise.shape
    out = tmp_path / "seg.nii.gz"
    with pytest.raises(SystemExit) as exc:
        cli.main([str(img), str(out), "--atlases", "1", "-t", "1"])
    err = capsys.readouterr().err
    assert exc.value.code in (0, None), err
    assert "found no brain; segmented without atlases" in err and out.is_file()
    assert_same_geometry(out, img)
