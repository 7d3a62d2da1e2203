"""ModelSpace: a model's input space read from its metadata, the conform call
every tool makes with it, and the metadata block the recipes write from it."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from synthtools.conform import MIN_EXTENT_MM, conform
from synthtools.evaluation import data_root
from synthtools.space import NORMALIZATION, ModelSpace
from synthtools.weights import ModelError, load_model, models_dir, read_metadata

from conftest import oblique_affine

SHIPPED = sorted(p.parent.name for p in models_dir().glob("*/metadata.json"))
REAL_SCAN = data_root() / "validation" / "lesjak_longitudinal_ms_p01" / "raw" / "study1_T1W.nii.gz"


def test_the_four_shipped_models_are_found():
    assert {"synthstrip", "synthseg", "synthmorph-rigid", "synthmorph-affine"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_space_of_each_shipped_model(name):
    meta = read_metadata(models_dir() / name)
    space = ModelSpace.from_meta(meta)
    block = meta["input"]
    assert (space.voxsize, space.orientation, space.multiple) == (2.0, "LIA", 16)
    assert (space.voxsize, space.orientation, space.multiple) == \
        (block["voxsize"], block["orientation"], block["multiple"])
    assert space.min_extent_mm == MIN_EXTENT_MM and space.lr_axis == 0
    # What a recipe writes from the space is exactly what the shipped model holds.
    assert space.to_meta() == block
    assert ModelSpace.from_meta({"input": space.to_meta()}) == space


def _oblique_image(shape=(37, 41, 29), seed=0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(100, 30, shape).astype(np.float32), oblique_affine((1.1, 0.9, 1.7), shape)


@pytest.mark.parametrize("orientation,voxsize,multiple", [("LIA", 2.0, 16), ("RAS", 1.5, 8), ("ILA", 3.0, 1)])
def test_conform_is_the_conform_function(orientation, voxsize, multiple):
    data, affine = _oblique_image()
    space = ModelSpace(voxsize, orientation, multiple)
    got = space.conform(data, affine)
    ref = conform((data, affine), voxsize=voxsize, orientation=orientation, multiple=multiple)
    assert torch.equal(got.data, ref.data) and np.array_equal(got.affine, ref.affine)
    assert got.native_shape == data.shape and np.array_equal(got.native_affine, affine)
    assert all(n % multiple == 0 for n in got.shape)
    assert np.allclose(got.voxsize, voxsize)
    # The left-right axis of the conformed grid moves along world x (RAS).
    assert abs(got.affine[0, space.lr_axis]) == pytest.approx(voxsize)
    # round_up=False: the smallest covering grid, as conform(multiple=None) gives.
    small = space.conform(data, affine, round_up=False)
    ref = conform((data, affine), voxsize=voxsize, orientation=orientation, multiple=None)
    assert torch.equal(small.data, ref.data) and np.array_equal(small.affine, ref.affine)
    assert all(a <= b for a, b in zip(small.shape, got.shape))


def test_conform_of_a_4d_tensor_and_nearest():
    data, affine = _oblique_image((20, 22, 18))
    labels = np.rint(data / 40).astype(np.int16)
    space = ModelSpace(2.0, "LIA", 16)
    got = space.conform(labels, affine, order=0)
    ref = conform((labels, affine), voxsize=2.0, orientation="LIA", multiple=16, order=0)
    assert torch.equal(got.data, ref.data)
    assert set(np.unique(got.data.numpy())) <= set(np.unique(labels)) | {0}
    frames = torch.from_numpy(np.stack([data, 2 * data], axis=-1))
    four = space.conform(frames, affine)
    assert four.data.shape == (2,) + got.shape and torch.equal(four.data[0], space.conform(data, affine).data)


@pytest.mark.skipif(not REAL_SCAN.is_file(), reason="needs ../shared/data (real scans)")
@pytest.mark.parametrize("name", ["synthstrip", "synthseg", "synthmorph-rigid"])
def test_conform_of_a_real_scan_matches_the_call_the_tools_made(name):
    """The call strip.py, seg and morph/register.py made before ModelSpace,
    on a real 3D scan: the same grid and the same voxels, bit for bit."""
    from synthtools.io import load_volume

    vol = load_volume(REAL_SCAN)
    model = load_model(name)
    block = model.meta["input"]
    ref = conform((vol.data, vol.affine), voxsize=block["voxsize"], orientation=block["orientation"],
                  multiple=block["multiple"])
    got = ModelSpace.of(model).conform(vol.data, vol.affine)
    assert got.shape == ref.shape and all(n % 16 == 0 for n in got.shape)
    assert np.array_equal(got.affine, ref.affine) and torch.equal(got.data, ref.data)
    back = got.to_native(got.data)
    assert back.shape == vol.data.shape


def test_canonical_values():
    space = ModelSpace(np.float64(1), "lia", np.int64(32), 40)
    assert space == ModelSpace(1.0, "LIA", 32, 40.0)
    assert type(space.voxsize) is float and type(space.multiple) is int and space.orientation == "LIA"
    with pytest.raises(dataclasses.FrozenInstanceError):
        space.voxsize = 2.0
    assert [ModelSpace(1.0, o, 1).lr_axis for o in ("RAS", "ILA", "AIL", "PSR")] == [0, 1, 2, 2]


def test_min_extent_from_metadata():
    meta = {"input": {"voxsize": 2.0, "orientation": "LIA", "multiple": 16, "min_extent_mm": 80}}
    space = ModelSpace.from_meta(meta)
    assert space.min_extent_mm == 80.0
    assert space.to_meta() == dict(meta["input"], min_extent_mm=80.0, normalization=NORMALIZATION)
    assert "min_extent_mm" not in ModelSpace(2.0, "LIA", 16).to_meta()


GOOD = {"voxsize": 2.0, "orientation": "LIA", "multiple": 16}


@pytest.mark.parametrize("block,words", [
    (None, "no input space"),
    ("LIA", "no input space"),
    ({"voxsize": 2.0, "orientation": "LIA"}, "lacks multiple"),
    ({"multiple": 16}, "lacks voxsize, orientation"),
    (dict(GOOD, voxsize=-2.0), "voxsize must be one positive number"),
    (dict(GOOD, voxsize=float("nan")), "voxsize must be one positive number"),
    (dict(GOOD, voxsize="2"), "voxsize must be one positive number"),
    (dict(GOOD, voxsize=True), "voxsize must be one positive number"),
    (dict(GOOD, voxsize=[2.0, 2.0, 2.0]), "voxsize must be one positive number"),
    (dict(GOOD, orientation="LIX"), "orientation must be 3 letters"),
    (dict(GOOD, orientation="LLA"), "must use each of L/R, A/P, S/I once"),
    (dict(GOOD, orientation=3), "orientation must be a 3-letter code"),
    (dict(GOOD, multiple=0), "multiple must be a whole number"),
    (dict(GOOD, multiple=2.5), "multiple must be a whole number"),
    (dict(GOOD, min_extent_mm=-1), "min_extent_mm must be a number of mm >= 0"),
    (dict(GOOD, min_extent=60), "unknown key in the input space: min_extent"),
])
def test_bad_metadata_is_one_clear_model_error(block, words):
    meta = {} if block is None else {"input": block}
    with pytest.raises(ModelError) as exc:
        ModelSpace.from_meta(meta, "model /x/y")
    text = str(exc.value)
    assert words in text and text.startswith("model /x/y: ") and "\n" not in text


def test_a_model_with_a_bad_space_is_refused_by_the_tools(tiny_strip_model, head_path, tmp_path, capsys):
    from synthtools.cli import strip as strip_cli
    from helpers import run_cli

    bad = tmp_path / "bad_model"
    shutil.copytree(tiny_strip_model, bad)
    meta = json.loads((bad / "metadata.json").read_text())
    del meta["input"]["multiple"]
    (bad / "metadata.json").write_text(json.dumps(meta))
    out = tmp_path / "s.nii.gz"
    code, _, err = run_cli(strip_cli, "-i", head_path, "-o", out, "--model", bad, capsys=capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "input space lacks multiple" in lines[0] and str(bad) in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("name", ["skullstrip", "segment", "rigid"])
def test_recipe_writes_the_space_it_conforms_with(name):
    from synthtools.io import Volume
    from synthtools.training.recipes import get_recipe, load_config

    recipe = get_recipe(load_config(name, {"recipe.voxsize": 3.0}))
    space = recipe.model_space()
    block = recipe.metadata()["input"]
    assert ModelSpace.from_meta({"input": block}) == space
    assert (space.voxsize, space.orientation) == (3.0, "LIA") == (recipe.space.voxsize, recipe.space.orientation)
    if name == "rigid":     # the registration network's own shape multiple
        assert space.multiple == recipe.build_model().multiple
    else:
        assert space.multiple == 16
    if hasattr(recipe, "targets"):
        # Real training pairs go onto the same grid: voxel size and axes.
        data, affine = _oblique_image((30, 34, 26))
        labels = (data > 100).astype(np.int16) * 2
        image, index = recipe.prepare_real(Volume(data, affine), Volume(labels, affine))
        ref = conform((data, affine), voxsize=3.0, orientation="LIA", multiple=None)
        assert image.shape == index.shape == ref.shape


def test_recipe_slices_take_their_left_right_axis_from_the_space():
    """2D training samples mirror along the slice's left-right axis: derived
    from the model space, not assumed to be axis 0."""
    from synthtools.training.recipes import get_recipe, load_config
    recipe = get_recipe(load_config("segment"))
    assert recipe.space.lr_axis == 0 and [recipe.lr_axis_of_slice(a) for a in range(3)] == [None, 0, 0]
    recipe.space = ModelSpace(voxsize=2.0, orientation="ILA", multiple=16)   # left-right is axis 1
    assert [recipe.lr_axis_of_slice(a) for a in range(3)] == [0, None, 1]
