"""Issue 35: the command lines that pipeline wrappers write (FreeSurfer's
mri_synthstrip / mri_synthseg / mri_synthmorph flags, the NiPreps -n) are
accepted, or refused on one line with exit 2 and nothing written."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from conftest import assert_same_geometry, files_under
from synthtools.cli import morph as morph_cli
from synthtools.cli import seg as seg_cli
from synthtools.cli import strip as strip_cli
from synthtools.io import load_volume
from synthtools.morph import Affine, write_transform
from helpers import run_cli as run  # noqa: E402


@pytest.mark.parametrize("flags, what", [
    (["--parc"], "no cortical parcellation"), (["--v1"], "SynthSeg 1.0"), (["--autocrop"], "--crop"),
    (["--noaddctab"], "colour table"), (["--photo", "both"], "Photo-SynthSeg")])
def test_synthseg_refuses_unimplemented_freesurfer_flags(flags, what, head_path, tmp_path, capsys, one_thread):
    before = files_under(tmp_path)
    code, _, err = run(seg_cli, "--i", head_path, "--o", tmp_path / "seg.nii.gz", *flags, capsys=capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and what in err and flags[0] in err, err
    assert files_under(tmp_path) == before


def test_synthseg_runs_an_mri_synthseg_command_line(head_path, tiny_seg_model, tmp_path, capsys, one_thread):
    """mri_synthseg's spelling end to end: --i/--o, --vol/--qc, --threads, --cpu, --robust, --fast,
    --keepgeom, --addctab; the labels keep the input's geometry."""
    out = tmp_path / "seg.nii.gz"
    code, _, err = run(seg_cli, "--i", head_path, "--o", out, "--vol", tmp_path / "v.csv", "--qc",
                       tmp_path / "q.csv", "--threads", "1", "--cpu", "--robust", "--fast", "--keepgeom",
                       "--addctab", "--model", tiny_seg_model, capsys=capsys)
    assert code == 0, err
    assert "--robust: using the shipped model" in err
    assert_same_geometry(out, head_path)
    assert (tmp_path / "seg.lut.txt").is_file() and (tmp_path / "v.csv").is_file() and (tmp_path / "q.csv").is_file()


def test_synthseg_fast_means_no_flip_refine_or_atlases():
    args = seg_cli.build_parser().parse_intermixed_args(["--i", "a.nii.gz", "--o", "b.nii.gz", "--fast"])
    seg_cli.apply_freesurfer_flags(args)
    assert (args.inputs, args.out, args.flip, args.refine, args.atlases) == (["a.nii.gz"], "b.nii.gz", False, False, 0)


@pytest.mark.parametrize("flags, what", [(["--cpu", "-g"], "contradict"), (["--keepgeom", "--keep-conformed"],
                                                                          "contradict")])
def test_synthseg_contradicting_flags(flags, what, head_path, tmp_path, capsys):
    code, _, err = run(seg_cli, "--i", head_path, "--o", tmp_path / "s.nii.gz", *flags, capsys=capsys)
    assert code == 2 and what in err and not (tmp_path / "s.nii.gz").exists()


def test_synthseg_ct_clips_to_the_brain_window(head_path, tiny_seg_model, tmp_path, capsys, one_thread):
    """--ct clips Hounsfield units to [0, 80]: a CT scaled far outside that window gives the same
    labels as the same CT already clipped."""
    img = nib.load(str(head_path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    hu = data / max(float(data.max()), 1.0) * 1000.0 - 200.0      # -200 .. 800 HU
    raw = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(hu, img.affine, img.header), str(raw))
    clipped = tmp_path / "ct_clipped.nii.gz"
    nib.save(nib.Nifti1Image(np.clip(hu, 0, 80), img.affine, img.header), str(clipped))
    common = ["--model", tiny_seg_model, "--no-refine", "--no-flip", "-q"]
    assert run(seg_cli, raw, tmp_path / "a.nii.gz", "--ct", *common, capsys=capsys)[0] == 0
    assert run(seg_cli, clipped, tmp_path / "b.nii.gz", *common, capsys=capsys)[0] == 0
    a, b = (np.asarray(nib.load(str(tmp_path / n)).dataobj) for n in ("a.nii.gz", "b.nii.gz"))
    assert np.array_equal(a, b)
    assert_same_geometry(tmp_path / "a.nii.gz", raw)


def test_synthstrip_v_is_version(capsys):
    import synthtools
    code, out, _ = run(strip_cli, "-v", capsys=capsys)
    assert code == 0 and out.strip().endswith(f"(synthtools) {synthtools.__version__}")


@pytest.mark.parametrize("flags, what", [(["-w", "synthmorph.affine.2.h5"], "SynthMorph .h5"),
                                         (["-d", "inspect"], "network-space")])
def test_register_refuses_unimplemented_freesurfer_flags(flags, what, head_path, tmp_path, capsys):
    before = files_under(tmp_path)
    code, _, err = run(morph_cli, "register", head_path, head_path, "-t", tmp_path / "t.lta", *flags, capsys=capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and what in err, err
    assert files_under(tmp_path) == before


def test_register_takes_mri_synthmorphs_long_flags(head_path, tmp_path, capsys, monkeypatch):
    """'--model affine' names the transformation model (mri_synthmorph's spelling), '--mid-space' is -M,
    -n/-e are noted; the registration runs and writes a linear transform."""
    seen = {}
    real = morph_cli._freesurfer_register_flags

    def spy(args):
        real(args)
        seen.update(mode=args.mode, model=args.model, middle=args.middle)
    monkeypatch.setattr(morph_cli, "_freesurfer_register_flags", spy)
    parser = morph_cli.register_parser()
    args = parser.parse_intermixed_args([str(head_path), str(head_path), "--model", "rigid", "--mid-space",
                                         "-n", "7", "-e", "256", "-v", "-t", "t.lta"])
    spy(args)
    assert seen == {"mode": "rigid", "model": None, "middle": True}
    err = capsys.readouterr().err
    assert "-n 7 ignored" in err and "-e 256 ignored" in err


def test_register_extent_outside_freesurfers_choices_is_refused(head_path, tmp_path, capsys):
    code, _, err = run(morph_cli, "register", head_path, head_path, "-t", tmp_path / "t.lta", "-e", "100",
                       capsys=capsys)
    assert code == 2 and "-e" in err and not (tmp_path / "t.lta").exists()


def test_apply_takes_mri_synthmorph_apply_flags(head_path, tmp_path, capsys, one_thread):
    """mri_synthmorph apply's flags -m -t -f -H: an identity LTA with -H keeps the voxels and header."""
    vol = load_volume(head_path)
    trans = tmp_path / "id.lta"
    write_transform(Affine(np.eye(4), fixed=vol, moving=vol), trans)
    out = tmp_path / "o.nii.gz"
    code, _, err = run(morph_cli, "apply", "-m", "nearest", "-t", "float32", "-f", "0", "-H", trans, head_path, out,
                       capsys=capsys)
    assert code == 0, err
    assert np.allclose(nib.load(str(out)).affine, nib.load(str(head_path)).affine, atol=1e-5)
    assert np.array_equal(np.asarray(nib.load(str(out)).dataobj, dtype=np.float32),
                          np.asarray(nib.load(str(head_path)).dataobj, dtype=np.float32))
