"""synthgen sample / preview on a small label map written to disk."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from synthtools.training.cli import main


def label_file(path):
    g = np.meshgrid(*[np.linspace(-1, 1, s) for s in (30, 34, 26)], indexing="ij")
    r = np.sqrt(sum(x ** 2 for x in g))
    lab = np.select([r < 0.4, r < 0.7, r < 0.9], [2, 3, 502], 0).astype(np.float32)  # float, like some shared maps
    aff = np.array([[-1.0, 0, 0, 20], [0, 0, 1.2, -30], [0, -0.9, 0, 25], [0, 0, 0, 1]])
    img = nib.Nifti1Image(lab, aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=2)
    nib.save(img, str(path))
    return path


def run(*args):
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code
    return 0


def test_sample_keeps_geometry_and_is_seeded(tmp_path):
    src = label_file(tmp_path / "lab.nii.gz")
    assert run("sample", src, "-o", tmp_path / "a.nii.gz", "--labels-out", tmp_path / "al.nii.gz", "--seed", 3) == 0
    assert run("sample", src, "-o", tmp_path / "b.nii.gz", "--seed", 3) == 0
    assert run("sample", src, "-o", tmp_path / "c.nii.gz", "--seed", 4) == 0
    ref = nib.load(str(src))
    a = nib.load(str(tmp_path / "a.nii.gz"))
    assert a.shape == ref.shape and np.array_equal(a.affine, ref.affine)
    assert int(a.header["qform_code"]) == 1 and int(a.header["sform_code"]) == 2
    labels = np.asarray(nib.load(str(tmp_path / "al.nii.gz")).dataobj)
    assert set(np.unique(labels)) <= {0, 2, 3, 502}
    va, vb, vc = (np.asarray(nib.load(str(tmp_path / f"{k}.nii.gz")).dataobj) for k in "abc")
    assert np.array_equal(va, vb) and not np.array_equal(va, vc)


def test_sample_many_and_preview(tmp_path):
    pytest.importorskip("matplotlib")
    src = label_file(tmp_path / "lab.nii.gz")
    assert run("sample", src, "-o", tmp_path / "imgs", "--labels-out", tmp_path / "labs", "-n", 2) == 0
    assert len(list((tmp_path / "imgs").iterdir())) == 2 and len(list((tmp_path / "labs").iterdir())) == 2
    assert run("preview", src, "-o", tmp_path / "g.png", "-n", 3, "--max") == 0
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_inputs(tmp_path):
    assert run("sample", tmp_path / "missing.nii.gz", "-o", tmp_path / "x.nii.gz") == 2
    src = label_file(tmp_path / "lab.nii.gz")
    assert run("sample", src, "-o", tmp_path / "x.png") == 2
    assert run("preview", src, "-o", tmp_path / "x.nii.gz", "-n", 1) == 2
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.nii.gz").exists()


@pytest.mark.parametrize("args", [["train"], ["--bogus"], ["export", "run"], ["sample", "lab.nii.gz", "-n", "x"]])
def test_usage_errors_are_one_line(args, capsys):
    """As for the other tools: no usage block, one line naming the help to read, exit 2."""
    from helpers import one_error_line
    assert run(*args) == 2
    line = one_error_line(capsys.readouterr().err, "synthgen")
    assert line.endswith("-h)")
