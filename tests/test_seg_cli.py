"""The ``synthseg`` command and the segmentation core: labels, geometry,
posteriors, volumes, QC, flip augmentation, crop, colour tables, batch mode
and errors.

Runs the CLI in-process with tiny 4 mm 33-output models from conftest: a
hand-set one that labels by intensity band (deterministic, non-trivial) and
a seeded random one (not left-right symmetric).
"""
from __future__ import annotations

import csv
import gzip
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import (BAD_INPUT_CASES, assert_same_geometry, files_under,  # noqa: E402  (tests/ is on sys.path)
                      head_phantom)
from synthtools.seg import lut
from synthtools.cli import seg as cli
from synthtools.conform import axcodes
from synthtools.io import Volume
from synthtools.seg import QC_GROUPS, flip_permutation, segment
from synthtools.weights import load_model
from synthtools.training.generator.labels import LEFT_RIGHT, SYNTHSEG_LABELS
import helpers  # noqa: E402

LABELS = np.array(SYNTHSEG_LABELS)
STRUCTURES = [lut.name(v) for v in SYNTHSEG_LABELS[1:]]


pytestmark = pytest.mark.usefixtures("one_thread")


def synthseg(*args, capsys=None) -> tuple[int, str]:
    """Run the CLI in-process; exit code and stderr (if capsys is given)."""
    with pytest.raises(SystemExit) as exc:
        cli.main([str(a) for a in args])
    code = exc.value.code if isinstance(exc.value.code, int) else 1
    return code, capsys.readouterr().err if capsys is not None else ""


def data(path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def one_error_line(err: str) -> str:
    return helpers.one_error_line(err, "synthseg")


def read_csv(path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def voxel_volume(path) -> float:
    return float(abs(np.linalg.det(nib.load(str(path)).affine[:3, :3])))


def ras_head(folder: Path, name: str, flip: bool = False, shape=(40, 44, 36)) -> Path:
    """Axis-aligned 2 mm phantom (RAS); ``flip`` mirrors the data along the
    world x axis about the grid centre, keeping the header."""
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = -(np.array(shape) - 1.0)  # grid centre at world 0
    img = head_phantom(aff, shape)[0].astype(np.float32)
    if flip:
        img = img[::-1].copy()
    path = folder / name
    nib.save(nib.Nifti1Image(img, aff), str(path))
    return path


# ------------------------------------------------------------ lut, flips --

def test_lut_names_colours_and_left_right_pairs(tmp_path):
    names = lut.names_for(SYNTHSEG_LABELS)
    assert len(set(names)) == 33 and "Label-" not in "".join(names)
    assert [lut.name(v) for v in (0, 2, 4, 14, 16, 24, 41, 60)] == [
        "Unknown", "Left-Cerebral-White-Matter", "Left-Lateral-Ventricle", "3rd-Ventricle", "Brain-Stem",
        "CSF", "Right-Cerebral-White-Matter", "Right-VentralDC"]
    assert lut.color(3) == (205, 62, 78) and lut.color(17) == (220, 216, 20)
    # The name-derived twins are the training generator's left/right pairs.
    in_table = {(a, b) for a, b in LEFT_RIGHT if a in lut.FREESURFER_LUT and b in lut.FREESURFER_LUT}
    assert set(lut.left_right_pairs(SYNTHSEG_LABELS)) == in_table and len(in_table) == 14
    perm = flip_permutation(SYNTHSEG_LABELS)
    assert np.array_equal(perm[perm], np.arange(33))  # an involution
    twin = dict(zip(SYNTHSEG_LABELS, LABELS[perm].tolist()))
    assert twin[2] == 41 and twin[60] == 28 and twin[16] == 16 and twin[0] == 0
    # FreeSurferColorLUT format: value name R G B A.
    rows = [line.split() for line in lut.lut_text(SYNTHSEG_LABELS).splitlines() if not line.startswith("#")]
    assert [int(r[0]) for r in rows] == list(SYNTHSEG_LABELS)
    assert [r[1] for r in rows] == names and all(len(r) == 6 for r in rows)
    assert rows[1][2:] == ["245", "245", "245", "0"]


def test_embedded_colour_table_matches_surfa():
    fsio = pytest.importorskip("surfa.io.fsio")
    import io

    import surfa as sf

    table = sf.LabelLookup()
    for v in SYNTHSEG_LABELS:
        table[v] = (lut.name(v), list(lut.color(v)))
    buf = io.BytesIO()
    fsio.write_tag(buf, fsio.tags.old_colortable)
    fsio.write_binary_lookup_table(buf, table)
    assert lut.mgh_colortable(SYNTHSEG_LABELS) == buf.getvalue()


# ------------------------------------------------------ outputs, geometry --

def test_native_outputs_oblique_anisotropic(make_head, tiny_seg_model, tmp_path, capsys):
    head = make_head("aniso.nii.gz", shape=(44, 40, 24), voxsize=(1.8, 2.2, 3.0), qcode=1, scode=2)
    out, post, res = tmp_path / "seg.nii.gz", tmp_path / "post.nii.gz", tmp_path / "res.nii.gz"
    qc, png = tmp_path / "qc.csv", tmp_path / "snap.png"
    code, err = synthseg(head, out, "--no-flip", "--post", post, "--resample", res, "--qc", qc, "--snapshot", png,
                         "--model", tiny_seg_model, capsys=capsys)
    assert code == 0, err
    assert_same_geometry(out, head)
    assert_same_geometry(post, head, spatial_only=True)
    assert nib.load(str(out)).get_data_dtype() == np.int32
    labels = data(out)
    assert set(np.unique(labels)) <= set(SYNTHSEG_LABELS)
    assert len(np.unique(labels)) >= 5  # the band model gives a non-trivial map
    # The brain band is label 2: a wrong axis order, flip or affine would wreck the overlap.
    brain = head_phantom(nib.load(str(head)).affine, (44, 40, 24))[1]
    dice = 2 * np.sum((labels == 2) & brain) / (np.sum(labels == 2) + brain.sum())
    assert dice > 0.8, dice
    # Posteriors: channel-last, 33 channels in the metadata's order, sum to one, argmax = labels.
    p = data(post)
    assert p.dtype == np.float32 and p.shape == (44, 40, 24, 33)
    assert np.allclose(p.sum(-1), 1.0, atol=1e-4) and p.min() >= 0
    assert np.array_equal(LABELS[p.argmax(-1)], labels)
    # The colour table beside the labels.
    table = (tmp_path / "seg.lut.txt").read_text()
    assert "Left-Cerebral-White-Matter" in table and len([ln for ln in table.splitlines()
                                                          if not ln.startswith("#")]) == 33
    # The image the network saw: 4 mm LIA, normalised to [0, 1].
    r = nib.load(str(res))
    assert axcodes(r.affine) == "LIA" and np.allclose(r.header.get_zooms(), 4.0)
    assert all(n % 2 == 0 for n in r.shape) and 0 <= data(res).min() and data(res).max() <= 1
    rows = read_csv(qc)
    assert rows[0] == ["subject", *QC_GROUPS, "mean"] and len(rows) == 2 and rows[1][0] == str(head)
    scores = np.array(rows[1][1:], float)
    assert np.all((scores >= 0) & (scores <= 1)) and scores[0] > 0.5  # confident on white matter
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_keep_conformed_grid_and_soft_volumes(head_path, tiny_seg_model, tmp_path, capsys):
    out, post, res, vol = (tmp_path / n for n in ("seg.nii.gz", "post.nii.gz", "res.nii.gz", "vol.csv"))
    code, err = synthseg(head_path, out, "--no-flip", "--no-refine", "--post", post, "--resample", res, "--vol", vol,
                         "--keep-conformed", "--model", tiny_seg_model, capsys=capsys)
    assert code == 0, err
    seg, ref = nib.load(str(out)), nib.load(str(res))
    assert seg.shape == ref.shape and np.allclose(seg.affine, ref.affine) and axcodes(seg.affine) == "LIA"
    assert nib.load(str(post)).shape == ref.shape + (33,)
    # On the network's grid the band model is sharp: soft volumes match the
    # hard label counts structure by structure.
    labels, vv = data(out), voxel_volume(out)
    assert vv == pytest.approx(64.0)
    rows = read_csv(vol)
    soft = dict(zip(rows[0][1:-1], np.array(rows[1][1:-1], float)))
    for value in SYNTHSEG_LABELS[1:]:
        hard = np.sum(labels == value) * vv
        assert soft[lut.name(value)] == pytest.approx(hard, rel=0.05, abs=3 * vv), value


def test_volumes_table_structure_sums_and_appending(make_head, tiny_seg_model, tmp_path, capsys):
    a, b = make_head("a.nii.gz"), make_head("b.nii.gz", shape=(36, 40, 32), voxsize=(2.0, 2.2, 2.4))
    vol = tmp_path / "vol.csv"
    for src in (a, b):  # the second run appends
        code, err = synthseg(src, "--vol", vol, "--model", tiny_seg_model, capsys=capsys)
        assert code == 0, err
    rows = read_csv(vol)
    assert rows[0] == ["subject", *STRUCTURES, "Total-Intracranial"]
    assert [r[0] for r in rows[1:]] == [str(a), str(b)] and all(len(r) == 34 for r in rows)
    assert files_under(tmp_path) == {"a.nii.gz", "b.nii.gz", "vol.csv"}  # --vol alone writes no image
    # Soft volumes, background included, fill the native grid; the total is
    # the sum of the structures.
    model = load_model(tiny_seg_model)
    img = nib.load(str(a))
    result = segment(model, Volume(np.asarray(img.dataobj, np.float32), img.affine), flip=True,
                     refine=True)  # the CLI defaults
    n_vox, vv = np.prod(img.shape), voxel_volume(a)
    assert result.volumes.sum() == pytest.approx(n_vox * vv, rel=1e-3)
    values = np.array(rows[1][1:], float)
    assert values[-1] == pytest.approx(values[:-1].sum(), rel=1e-4)
    assert values[-1] + result.volumes[0] == pytest.approx(n_vox * vv, rel=1e-3)
    assert np.allclose(values[:-1], result.volumes[1:], rtol=1e-4, atol=1e-2)
    # A table with other columns is refused before anything runs.
    other = tmp_path / "other.csv"
    other.write_text("subject,x\n")
    code, err = synthseg(a, tmp_path / "s.nii.gz", "--vol", other, "--model", tiny_seg_model, capsys=capsys)
    assert code == 2 and "other columns" in one_error_line(err)
    assert other.read_text() == "subject,x\n" and not (tmp_path / "s.nii.gz").exists()


def test_mgz_output_embeds_colour_table(head_path, tiny_seg_model, tmp_path, capsys):
    out = tmp_path / "seg.mgz"
    code, err = synthseg(head_path, out, "--model", tiny_seg_model, capsys=capsys)
    assert code == 0, err
    img = nib.load(str(out))
    assert np.allclose(img.affine, nib.load(str(head_path)).affine) and img.shape == (40, 44, 36)
    assert (tmp_path / "seg.lut.txt").exists()
    # After header (284 bytes), int32 data and the 5-float footer: the colour table tag.
    raw = gzip.decompress(out.read_bytes())
    pos = 284 + 4 * int(np.prod(img.shape)) + 20
    tag, version, size, name_len, count = struct.unpack(">iiiii", raw[pos:pos + 20])
    assert (tag, version, size, name_len, count) == (1, -2, 61, 0, 33)
    pos += 20
    names = []
    for _ in range(count):
        value, n = struct.unpack(">ii", raw[pos:pos + 8])
        names.append((value, raw[pos + 8:pos + 8 + n - 1].decode()))
        pos += 8 + n + 16
    assert names == list(zip(SYNTHSEG_LABELS, lut.names_for(SYNTHSEG_LABELS)))
    assert pos == len(raw)


# ------------------------------------------------------ flip augmentation --

def test_flip_averaging_is_left_right_equivariant(random_seg_model, tmp_path, capsys):
    """With the flip (the default), segmenting the mirrored head gives the mirrored result
    with left and right labels swapped -- for any model, here a random,
    asymmetric one. This fails if the mirror axis, the mirroring back or the
    left/right channel permutation is wrong."""
    orig, mirrored = ras_head(tmp_path, "orig.nii.gz"), ras_head(tmp_path, "mirror.nii.gz", flip=True)
    perm = flip_permutation(SYNTHSEG_LABELS)
    posts, labels = {}, {}
    for name, src in (("orig", orig), ("mirror", mirrored)):
        out, post = tmp_path / f"{name}_seg.nii.gz", tmp_path / f"{name}_post.nii.gz"
        # The flip is the default: no flag needed.
        code, err = synthseg(src, out, "--post", post, "--model", random_seg_model, capsys=capsys)
        assert code == 0, err
        posts[name], labels[name] = data(post), data(out)
    back = posts["mirror"][::-1][..., perm]
    # The intensity refinement (a CLI default) sums in mirrored order: float32 rounding, ~1e-5 at
    # 99.99 % of voxels, up to ~1.3e-3 at a few (the tempered prior lets the fitted Gaussians weigh
    # more); a broken flip differs by > 0.05 (below).
    assert np.allclose(back, posts["orig"], atol=3e-3)
    assert np.quantile(np.abs(back - posts["orig"]), 0.999) < 1e-4
    swapped = LABELS[perm][np.searchsorted(LABELS, labels["mirror"][::-1])]
    top2 = np.sort(posts["orig"], -1)[..., -2:]
    # Ties may break either way: averaging makes twins tie where the image is
    # uniform (background), so compare where the winner is clear.
    clear = top2[..., 1] - top2[..., 0] > 1e-3
    assert clear.mean() > 0.5 and np.array_equal(swapped[clear], labels["orig"][clear])
    assert len(np.unique(labels["orig"])) > 3
    # Without the averaging this model is far from equivariant: the test has teeth.
    model = load_model(random_seg_model)
    plain = {k: segment(model, Volume(np.asarray(nib.load(str(p)).dataobj), nib.load(str(p)).affine),
                        posteriors=True).posteriors for k, p in (("orig", orig), ("mirror", mirrored))}
    assert np.abs(plain["mirror"][::-1][..., perm] - plain["orig"]).max() > 0.05
    # --no-flip is that one pass.
    one = tmp_path / "one_post.nii.gz"
    code, err = synthseg(orig, tmp_path / "one.nii.gz", "--post", one, "--no-flip", "--no-refine",
                         "--model", random_seg_model, capsys=capsys)
    assert code == 0, err
    assert np.allclose(data(one), plain["orig"], atol=1e-5)


# -------------------------------------------------------------------- crop --

def test_crop_is_centred_rounded_and_background_outside(head_path, tiny_seg_model, tmp_path, capsys):
    out, res = tmp_path / "seg.nii.gz", tmp_path / "res.nii.gz"
    code, err = synthseg(head_path, out, "--no-flip", "--no-refine", "--resample", res, "--crop", 5, 6, 7,
                         "--model", tiny_seg_model, capsys=capsys)
    assert code == 0, err
    assert nib.load(str(res)).shape == (6, 6, 8)  # rounded up to the multiple (2)
    labels = data(out)
    assert (labels == 0).mean() > 0.5 and labels.any()
    model = load_model(tiny_seg_model)
    img = nib.load(str(head_path))
    vol = Volume(np.asarray(img.dataobj, np.float32), img.affine)
    cropped = segment(model, vol, crop=(5, 6, 7))
    assert np.array_equal(cropped.labels, labels)
    uncropped = segment(model, vol)
    # Cropping removes labelled voxels but the posteriors still fill the grid.
    assert np.count_nonzero(cropped.labels) < np.count_nonzero(uncropped.labels)
    vv = voxel_volume(head_path)
    assert cropped.volumes.sum() == pytest.approx(np.prod(img.shape) * vv, rel=1e-3)


# ------------------------------------------------------------- batch mode --

def test_batch_matches_single_runs(make_head, tiny_seg_model, tmp_path, capsys):
    a = make_head("a.nii.gz")
    b = make_head("b.nii.gz", shape=(36, 40, 32), voxsize=(2.0, 2.2, 2.4), folder=tmp_path / "other")
    for name, src in (("a", a), ("b", b)):
        code, err = synthseg(src, tmp_path / f"{name}_single.nii.gz", "--model", tiny_seg_model, capsys=capsys)
        assert code == 0, err
    (tmp_path / "list.txt").write_text(f"# scans\n{a}\n\n{b}\n")
    code, err = synthseg("-i", tmp_path / "list.txt", "-o", f"{tmp_path / 'out'}/", "--post",
                         f"{tmp_path / 'post'}/", "--vol", tmp_path / "out" / "vol.csv", "--model",
                         tiny_seg_model, capsys=capsys)
    assert code == 0, err
    assert files_under(tmp_path / "out") == {"a_synthseg.nii.gz", "a_synthseg.lut.txt", "b_synthseg.nii.gz",
                                             "b_synthseg.lut.txt", "vol.csv"}
    assert files_under(tmp_path / "post") == {"a_posteriors.nii.gz", "b_posteriors.nii.gz"}
    for name in ("a", "b"):
        single, batch = data(tmp_path / f"{name}_single.nii.gz"), data(tmp_path / "out" / f"{name}_synthseg.nii.gz")
        assert batch.dtype == single.dtype and batch.tobytes() == single.tobytes()
    assert [r[0] for r in read_csv(tmp_path / "out" / "vol.csv")[1:]] == [str(a), str(b)]


def test_batch_continues_after_a_failing_input(make_head, tiny_seg_model, tmp_path, capsys):
    a, b = make_head("a.nii.gz"), make_head("b.nii.gz")
    bad = tmp_path / "bad.nii.gz"
    bad.write_text("not an image")
    four_d = make_head("series.nii.gz", frames=2)
    code, err = synthseg("-i", a, bad, four_d, tmp_path / "gone.nii.gz", b, "-o", f"{tmp_path}/out/",
                         "--qc", tmp_path / "qc.csv", "--model", tiny_seg_model, capsys=capsys)
    assert code == 1
    assert "bad.nii.gz" in err and "gone.nii.gz" in err and "4D" in err and "Traceback" not in err
    assert "3 of 5 inputs failed" in err
    assert files_under(tmp_path / "out") == {"a_synthseg.nii.gz", "a_synthseg.lut.txt",
                                             "b_synthseg.nii.gz", "b_synthseg.lut.txt"}
    assert [r[0] for r in read_csv(tmp_path / "qc.csv")[1:]] == [str(a), str(b)]


# ----------------------------------------------------------------- errors --

def as_mgz(src: Path, dst: Path) -> Path:
    img = nib.load(str(src))
    dst.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.MGHImage(np.asanyarray(img.dataobj), img.affine), str(dst))
    return dst


ERROR_CASES = {
    **BAD_INPUT_CASES,
    "crop sizes": (lambda t, h, m: [h, t / "out" / "s.nii.gz", "--crop", "8", "8"], 2, "--crop"),
    "crop zero": (lambda t, h, m: [h, t / "out" / "s.nii.gz", "--crop", "0"], 2, "--crop"),
    "table extension": (lambda t, h, m: [h, "--vol", t / "out" / "v.txt"], 2, ".csv"),
    "same table twice": (lambda t, h, m: [h, "--vol", t / "out" / "v.csv", "--qc", t / "out" / "v.csv"], 2,
                         "same output"),
    "posteriors are input": (lambda t, h, m: ["-i", h, "--post", h], 2, "overwrite an input"),
    "labels same as posteriors": (lambda t, h, m: [h, t / "out" / "s.nii.gz", "--post", t / "out" / "s.nii.gz"],
                                  2, "same output"),
    # a.nii.gz and a.mgz write a_synthseg.nii.gz and a_synthseg.mgz, but one a_synthseg.lut.txt.
    "colour tables collide": (lambda t, h, m: ["-i", h, as_mgz(h, t / "b" / "head.mgz"), "-o", t / "out"], 2,
                              "both write"),
    "not a segmentation model": (lambda t, h, m: [h, t / "out" / "s.nii.gz", "--model", m], 1,
                                 "not a segmentation model"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_one_line_no_output(case, head_path, tiny_strip_model, tiny_seg_model, tmp_path, capsys):
    setup, expected, text = ERROR_CASES[case]
    (tmp_path / "out").mkdir()
    argv = setup(tmp_path, head_path, tiny_strip_model)  # the model argument: a model of another task
    if "--model" not in argv:
        argv += ["--model", tiny_seg_model]
    # The other outputs too: none of them may appear.
    if "-i" not in argv and "--post" not in argv and "--vol" not in argv:
        argv += ["--post", tmp_path / "out" / "p.nii.gz", "--vol", tmp_path / "out" / "v.csv"]
    before = files_under(tmp_path)
    code, err = synthseg(*argv, capsys=capsys)
    assert code == expected, err
    assert text in one_error_line(err)
    assert files_under(tmp_path) == before


def test_default_model_not_yet_available(head_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SYNTHTOOLS_MODELS", str(tmp_path / "empty"))
    code, err = synthseg(head_path, tmp_path / "s.nii.gz", capsys=capsys)
    line = one_error_line(err)
    assert code == 1 and "not yet available" in line and "'synthseg'" in line
    assert not (tmp_path / "s.nii.gz").exists()


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["-h"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "--keep-conformed" in out and "--vol" in out


def test_aseg_in_protocol_relabels_by_hemisphere():
    """Choroid plexus joins its ventricle; corpus callosum / WM hypointensities
    join the white matter of their own side; nothing else changes."""
    from synthtools.metrics import aseg_in_protocol, aseg_scores
    ref = np.zeros((20, 8, 8), np.int32)
    ref[2:8] = 2            # left WM at low i
    ref[12:18] = 41         # right WM at high i
    ref[8:12, 2:6, 2:6] = 251   # corpus callosum across the midline (i = 10)
    ref[3:5, 3:5, 3:5] = 4
    ref[3, 3, 3] = 31       # choroid plexus inside the left ventricle
    ref[16, 0, 0] = 77      # a hypointensity in the right WM
    ref[0, 0, 0] = 17       # an unrelated label
    out = aseg_in_protocol(ref)
    assert out[3, 3, 3] == 4 and out[16, 0, 0] == 41 and out[0, 0, 0] == 17
    assert (out[8:10, 2:6, 2:6] == 2).all() and (out[10:12, 2:6, 2:6] == 41).all()
    assert set(np.unique(out)) == {0, 2, 4, 17, 41}
    assert (out[ref == 0] == 0).all() and ref[8, 2, 2] == 251      # the input is not modified
    # A protocol-perfect prediction is perfect only against the relabelled aseg.
    d_raw, _, _ = aseg_scores(out, ref)
    d_pro, mean_pro, _ = aseg_scores(out, out)
    assert mean_pro == 1.0 and d_raw[2] < 1.0 and d_raw[41] < 1.0
