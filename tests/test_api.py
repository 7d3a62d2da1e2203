"""The Python API (synthtools.strip / segment / register): paths or nibabel
images in, nibabel images on the input's grid out, the same results as the
command-line tools; and the model listing (``synthtools models``)."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import synthtools
from conftest import assert_same_geometry, head_phantom, oblique_affine  # (tests/ is on sys.path)
from synthtools.cli import models as models_cli
from synthtools.cli import seg as seg_cli
from synthtools.cli import strip as strip_cli
from synthtools.data import example_scan
from synthtools.io import InputError
from synthtools.weights import ModelError

pytestmark = pytest.mark.usefixtures("one_thread")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "validation"
REPO = Path(__file__).resolve().parents[1]


def arr(img) -> np.ndarray:
    return np.asanyarray(img.dataobj)


def dice(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def run_cli(main, *args) -> int:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return exc.value.code


# ------------------------------------------------------------------ exports --

def test_package_exports_are_lazy_and_callable():
    code = ("import sys, synthtools; assert 'torch' not in sys.modules, 'import synthtools loaded torch'; "
            "assert callable(synthtools.strip) and callable(synthtools.segment) and callable(synthtools.register); "
            "import synthtools.strip as m; assert m.brain_sdt; print(sorted(synthtools.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert {"strip", "segment", "register"} <= set(eval(out.stdout))


def test_strip_name_keeps_both_meanings_in_either_import_order():
    """``synthtools.strip(img)`` is the API and ``from synthtools.strip import
    ...`` the skull-stripping internals (re-exported from synthtools.skullstrip),
    whichever is imported first."""
    code = ("import synthtools, synthtools.api as api, synthtools.skullstrip as s; import sys; "
            "from synthtools.strip import brain_sdt, strip; "
            "assert brain_sdt is s.brain_sdt and strip is s.strip; "
            "assert callable(synthtools.strip) and synthtools.strip is sys.modules['synthtools.strip']; "
            "assert synthtools.api.strip is api.strip")
    for first in ("import synthtools.strip", "import synthtools.api"):
        out = subprocess.run([sys.executable, "-c", f"{first}; {code}"], capture_output=True, text=True, cwd=REPO)
        assert out.returncode == 0, out.stderr


def test_strip_module_call_is_the_api(tiny_strip_model, head_path):
    import synthtools.strip as module
    from synthtools import api
    a = module(str(head_path), model=tiny_strip_model, flip=False)
    b = api.strip(str(head_path), model=tiny_strip_model, flip=False)
    assert np.array_equal(np.asanyarray(a.mask.dataobj), np.asanyarray(b.mask.dataobj))
    assert np.asanyarray(a.mask.dataobj).any()


# -------------------------------------------------------------------- strip --

def test_strip_keeps_geometry_and_matches_the_cli(make_head, tiny_strip_model, tmp_path):
    head = make_head(qcode=1, scode=2)
    out = synthtools.strip(head, model=tiny_strip_model, flip=False)
    for kind in ("mask", "stripped", "sdt"):
        path = tmp_path / f"api_{kind}.nii.gz"
        getattr(out, kind).to_filename(path)
        assert_same_geometry(path, head)
    assert out.mask.get_data_dtype() == np.uint8 and out.sdt.get_data_dtype() == np.float32
    assert out.stripped.get_data_dtype() == np.uint16                      # the input's type
    # The phantom's brain, and exactly what synthstrip writes.
    truth = head_phantom(oblique_affine(), (40, 44, 36))[1]
    assert dice(arr(out.mask), truth) > 0.85                                # 4 mm network, 1 mm border
    assert run_cli(strip_cli.main, head, "-m", tmp_path / "cli_mask.nii.gz", "-o", tmp_path / "cli_s.nii.gz",
                   "--model", tiny_strip_model, "--no-flip") == 0
    assert np.array_equal(arr(out.mask), arr(nib.load(tmp_path / "cli_mask.nii.gz")))
    assert np.array_equal(arr(out.stripped), arr(nib.load(tmp_path / "cli_s.nii.gz")))
    # Stripped: the input inside the mask, the fill value outside.
    src, mask = arr(nib.load(head)), arr(out.mask).astype(bool)
    assert np.array_equal(arr(out.stripped)[mask], src[mask]) and not arr(out.stripped)[~mask].any()
    assert out.model_sha256 == json.loads((tiny_strip_model / "metadata.json").read_text())["sha256"]
    assert out.brain_volume_mm3 == pytest.approx(mask.sum() * 8.0)         # 2 mm voxels


def test_strip_nibabel_image_in_equals_path_in(make_head, tiny_strip_model):
    head = make_head(qcode=2, scode=0)
    img = nib.load(head)
    a = synthtools.strip(img, model=tiny_strip_model, flip=False, fill=7)
    b = synthtools.strip(str(head), model=tiny_strip_model, flip=False, fill=7)
    assert np.array_equal(arr(a.mask), arr(b.mask)) and np.array_equal(arr(a.stripped), arr(b.stripped))
    assert np.all(arr(a.stripped)[arr(a.mask) == 0] == 7)
    for out in (a.mask, a.stripped, a.sdt):
        assert [int(c) for c in (out.header["qform_code"], out.header["sform_code"])] == [2, 0]
        assert np.array_equal(out.affine, img.affine) and out.shape == img.shape


def test_strip_keeps_a_singleton_4th_dimension(make_head, tiny_strip_model):
    head = make_head(frames=1)
    assert nib.load(head).shape == (40, 44, 36, 1)
    out = synthtools.strip(head, model=tiny_strip_model, flip=False)
    assert out.mask.shape == out.stripped.shape == out.sdt.shape == (40, 44, 36, 1)
    assert arr(out.mask).any()


def test_strip_mgz_in_mgz_out(make_head, tiny_strip_model, tmp_path):
    src = nib.load(make_head())
    mgz = tmp_path / "head.mgz"
    nib.MGHImage(arr(src).astype(np.float32), src.affine).to_filename(mgz)
    out = synthtools.strip(mgz, model=tiny_strip_model, flip=False)
    assert isinstance(out.mask, nib.MGHImage)
    assert np.allclose(out.mask.affine, src.affine, atol=1e-5) and out.mask.shape == src.shape


def test_strip_errors(make_head, tiny_strip_model, tiny_seg_model):
    head = make_head()
    bad = np.random.rand(20, 20, 20).astype(np.float32)
    bad[1, 2, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        synthtools.strip(nib.Nifti1Image(bad, np.eye(4)), model=tiny_strip_model)
    with pytest.raises(InputError, match="empty"):
        synthtools.strip(nib.Nifti1Image(np.zeros((20, 20, 20), np.float32), np.eye(4)), model=tiny_strip_model)
    with pytest.raises(InputError, match="file not found"):
        synthtools.strip(head.parent / "missing.nii.gz", model=tiny_strip_model)
    with pytest.raises(TypeError, match="nibabel"):
        synthtools.strip(np.zeros((4, 4, 4)), model=tiny_strip_model)
    with pytest.raises(ValueError, match="does not fit"):
        synthtools.strip(head, model=tiny_strip_model, fill=-1)              # uint16 input
    with pytest.raises(ModelError, match="not a skullstrip model"):
        synthtools.strip(head, model=tiny_seg_model)
    with pytest.raises(ModelError, match="no-CSF"):
        synthtools.strip(head, model=tiny_strip_model, no_csf=True)          # the tiny model has CSF only


# ------------------------------------------------------------------ segment --

def test_segment_geometry_volumes_and_cli_agreement(make_head, tiny_seg_model, tmp_path):
    head = make_head(qcode=1, scode=2)
    out = synthtools.segment(head, model=tiny_seg_model, flip=False, refine=False, posteriors=True)
    out.labels.to_filename(tmp_path / "labels.nii.gz")
    assert_same_geometry(tmp_path / "labels.nii.gz", head)
    assert out.labels.get_data_dtype() == np.int32
    labels = arr(out.labels)
    assert set(np.unique(labels)) <= set(out.label_names) and {0, 2, 24} <= set(np.unique(labels))
    post = arr(out.posteriors)
    assert post.shape == (40, 44, 36, len(out.label_names))
    assert np.allclose(post.sum(-1), 1.0, atol=1e-4)
    names = list(out.label_names.values())
    assert np.array_equal(labels, np.array(list(out.label_names))[post.argmax(-1)])
    # Soft volumes (mm^3) are the posteriors' sums times the 8 mm^3 voxel.
    for k, name in enumerate(names[1:], 1):
        assert out.volumes[name] == pytest.approx(post[..., k].sum() * 8.0, rel=1e-4, abs=1e-3)
    total = out.volumes.pop("Total-Intracranial")
    assert total == pytest.approx(sum(out.volumes.values()))
    assert 0 < out.qc["mean"] <= 1
    # synthseg's --vol table has the same numbers.
    vol = tmp_path / "vol.csv"
    assert run_cli(seg_cli.main, head, tmp_path / "cli.nii.gz", "--model", tiny_seg_model, "--no-flip",
                   "--no-refine", "--vol", vol) == 0
    row = list(csv.DictReader(open(vol)))[0]
    for name, value in out.volumes.items():
        assert float(row[name]) == pytest.approx(value, abs=2e-3)
    assert np.array_equal(labels, arr(nib.load(tmp_path / "cli.nii.gz")))


def test_segment_refuses_4d_and_bad_options(make_head, tiny_seg_model):
    with pytest.raises(InputError, match="3D image is required"):
        synthtools.segment(make_head(frames=2), model=tiny_seg_model)
    with pytest.raises(ValueError, match="atlases"):
        synthtools.segment(make_head(), model=tiny_seg_model, atlases=2)   # the tiny model ships none
    with pytest.raises(ValueError, match="crop"):
        synthtools.segment(make_head(), model=tiny_seg_model, crop=0)


def test_segment_singleton_4d_comes_back_4d(make_head, tiny_seg_model):
    out = synthtools.segment(make_head(frames=1), model=tiny_seg_model, flip=False, refine=False)
    assert out.labels.shape == (40, 44, 36, 1)


# ----------------------------------------------------------------- register --

def _rigid(degrees, shift) -> np.ndarray:
    from conftest import rotation
    t = np.eye(4)
    t[:3, :3] = rotation(degrees)
    t[:3, 3] = shift
    return t


@pytest.mark.slow
def test_register_rigid_recovers_a_known_motion(tmp_path):
    """The bundled FLAIR moved by a known rigid motion (header only): the
    shipped rigid model finds it within 1 mm over the head."""
    fixed = nib.load(example_scan())
    truth = _rigid((4.0, -3.0, 5.0), (6.0, -4.0, 3.0))
    data = arr(fixed)
    moving = nib.Nifti1Image(data, truth @ fixed.affine, fixed.header)
    moving.set_qform(truth @ fixed.affine, code=1)
    moving.set_sform(truth @ fixed.affine, code=1)
    out = synthtools.register(moving, str(example_scan()), mode="rigid", inverse=True)
    # Pull-back fixed RAS -> moving RAS: the truth itself. Error over the head's voxels.
    ijk = np.argwhere(data > np.percentile(data, 75))[::50]
    world = np.c_[ijk, np.ones(len(ijk))] @ fixed.affine.T
    err = np.linalg.norm((world @ out.transform.matrix.T - world @ truth.T)[:, :3], axis=1)
    assert err.mean() < 1.0, err.mean()
    assert np.allclose(out.inverse.matrix @ out.transform.matrix, np.eye(4), atol=1e-6)
    # The moved image is on the fixed grid, with the fixed header, and looks like it.
    assert out.moved.shape == fixed.shape and np.array_equal(out.moved.affine, fixed.affine)
    assert int(out.moved.header["qform_code"]) == int(fixed.header["qform_code"])
    m, f = arr(out.moved).astype(float).ravel(), data.astype(float).ravel()
    assert np.corrcoef(m, f)[0, 1] > 0.9
    lta = out.save(tmp_path / "t.lta")
    from synthtools.morph import read_transform
    assert np.allclose(read_transform(lta).matrix, out.transform.matrix, atol=1e-4)


def test_register_argument_errors():
    with pytest.raises(ValueError, match="mode"):
        synthtools.register(example_scan(), example_scan(), mode="elastic")
    with pytest.raises(ValueError, match="regularization"):
        synthtools.register(example_scan(), example_scan(), regularization=2.0)
    with pytest.raises(ValueError, match="affine_model"):
        synthtools.register(example_scan(), example_scan(), mode="rigid", affine_model="synthmorph-affine")


# ------------------------------------------------ shipped models, real scans --

@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "spm12_mni_templates").is_dir(), reason="needs ../shared/data")
def test_strip_real_template_against_its_brain_mask():
    scan = DATA / "spm12_mni_templates" / "avg152T1.nii.gz"
    ref = arr(nib.load(DATA / "spm12_mni_templates" / "brainmask_prob_2mm.nii.gz")) > 0.5
    out = synthtools.strip(scan)
    assert out.mask.shape == ref.shape
    assert dice(arr(out.mask), ref) > 0.9


# ------------------------------------------------------------ model listing --

def test_models_listing_reads_every_shipped_model(capsys):
    assert models_cli.run(["models", "--json", "--verify"]) == 0
    listed = json.loads(capsys.readouterr().out)
    shipped = sorted(p.parent.name for p in (REPO / "models").glob("*/metadata.json"))
    assert sorted(m["name"] for m in listed) == shipped
    for m in listed:
        meta = json.loads((REPO / "models" / m["name"] / "metadata.json").read_text())
        assert m["sha256"] == meta["sha256"] and len(m["sha256"]) == 64 and m["sha256_ok"] is True
        assert m["steps"] == meta["steps"] > 0
        assert m["headline"], m["name"]                   # every shipped model has its numbers
    by_name = {m["name"]: m for m in listed}
    strip_meta = json.loads((REPO / "models" / "synthstrip" / "metadata.json").read_text())
    assert by_name["synthstrip"]["headline"]["mean_dice_all_cases"] == strip_meta["metrics"]["mean_dice_all_cases"]


def test_models_listing_text_and_a_corrupted_weight(tmp_path, tiny_strip_model, capsys):
    import shutil
    folder = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_strip_model, folder)
    assert models_cli.run(["models", "--models-dir", str(tmp_path / "models")]) == 0
    text = capsys.readouterr().out
    assert text.startswith("tiny  (skullstrip") and json.loads((folder / "metadata.json").read_text())["sha256"] in text
    with open(folder / "weights.pt", "ab") as f:
        f.write(b"x")
    assert models_cli.run(["models", "--verify", "--models-dir", str(tmp_path / "models")]) == 1
    assert "WEIGHTS DO NOT MATCH" in capsys.readouterr().out
    assert models_cli.run(["models", "--models-dir", str(tmp_path / "none")]) == 2
    assert "not found" in capsys.readouterr().err


def test_python_dash_m_synthtools_models():
    out = subprocess.run([sys.executable, "-m", "synthtools", "models"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "synthseg  (segment" in out.stdout and "sha256" in out.stdout
