"""Regression tests for the defects of issue 30 (2-10) and the CLI
consistency items: --threads/--version everywhere, exit codes, progress
lines, batch counters. Real scans from ../shared/data where the issue used
them (skipped when absent), phantoms and tiny models otherwise."""
from __future__ import annotations

import gzip
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import assert_same_geometry, files_under  # noqa: E402
from synthtools.cli import morph as morph_cli
from synthtools.cli import seg as seg_cli
from synthtools.cli import strip as strip_cli
from synthtools.io import load_volume
from synthtools.morph import Affine, write_transform
from helpers import run_cli as run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "validation"

pytestmark = pytest.mark.usefixtures("one_thread")


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not available (../shared/data)")
    return path


def error_line(err: str, prog: str) -> str:
    """The one error line (progress lines aside); never a traceback."""
    assert "Traceback" not in err
    lines = [x for x in err.strip().splitlines() if f"{prog}: error:" in x]
    assert len(lines) == 1, err
    return lines[0]


def lta(path: Path, matrix=np.eye(4), fixed=None, moving=None) -> Path:
    return Path(write_transform(Affine(matrix, fixed=fixed, moving=moving), path))


def image(path: Path, data: np.ndarray, affine: np.ndarray, qcode: int = 1, scode: int = 1) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=qcode)
    img.set_sform(affine, code=scode)
    nib.save(img, str(path))
    return path


def ramp(shape=(20, 22, 18), top=750.0) -> np.ndarray:
    """A smooth 0..``top`` image with a blob (not constant, integer-valued)."""
    idx = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    a = np.rint(top * np.exp(-np.sum(idx ** 2, -1) * 2)).astype(np.uint16)
    a[tuple(n // 2 for n in shape)], a[0, 0, 0] = top, 0      # exactly 0..top
    return a


# ----------------------------------------- 2: apply -t int8 must not clip --

def test_apply_refuses_an_output_type_that_clips(tmp_path, capsys):
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    src = image(tmp_path / "flair.nii.gz", ramp(), aff)
    t = lta(tmp_path / "id.lta", fixed=(ramp().shape, aff), moving=(ramp().shape, aff))
    for method in ("linear", "nearest"):
        code, _, err = run(morph_cli, "apply", t, src, tmp_path / "o.nii.gz", "-t", "int8", "-m", method,
                           capsys=capsys)
        line = error_line(err, "synthmorph")
        assert code == 1 and "0..750 do not fit the output type int8" in line and "wider -t" in line
        assert not (tmp_path / "o.nii.gz").exists()
    # A type that holds the values: written, values kept exactly (identity transform).
    code, _, err = run(morph_cli, "apply", t, src, tmp_path / "o.nii.gz", "-t", "int16", "-m", "nearest",
                       capsys=capsys)
    out = nib.load(str(tmp_path / "o.nii.gz"))
    assert code == 0 and out.get_data_dtype() == np.int16
    assert np.array_equal(np.asarray(out.dataobj), ramp())


def test_apply_int8_on_the_lesjak_flair_refuses(tmp_path, capsys):
    flair = need(DATA / "lesjak_longitudinal_ms_p01" / "raw" / "study1_FLAIR.nii.gz")
    vol = load_volume(flair)
    t = lta(tmp_path / "id.lta", fixed=vol, moving=vol)
    code, _, err = run(morph_cli, "apply", t, flair, tmp_path / "o.nii.gz", "-t", "int8", capsys=capsys)
    assert code == 1 and "do not fit the output type int8" in error_line(err, "synthmorph")
    assert files_under(tmp_path) == {"id.lta"}


# ------------------------------------------- 3: tiny field of view refused --

def slab(src: Path, dst: Path, slices: int = 5) -> Path:
    """``slices`` axial-ish slices from the middle of ``src`` (same header, shifted origin)."""
    img = nib.load(str(src))
    data = np.asanyarray(img.dataobj)
    k0 = data.shape[2] // 2 - slices // 2
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ [0, 0, k0] + img.affine[:3, 3]
    nib.save(nib.Nifti1Image(data[:, :, k0:k0 + slices], affine), str(dst))
    return dst


def test_synthseg_refuses_a_five_slice_slab(make_head, tiny_seg_model, tmp_path, capsys):
    head = make_head("head.nii.gz")
    thin = slab(head, tmp_path / "slab.nii.gz")
    code, _, err = run(seg_cli, thin, tmp_path / "seg.nii.gz", "--model", tiny_seg_model, capsys=capsys)
    line = error_line(err, "synthseg")
    assert code == 1 and "field of view" in line and "too small" in line and "50 mm" in line
    assert not (tmp_path / "seg.nii.gz").exists()
    # The whole head (80 x 88 x 72 mm) is accepted.
    code, _, err = run(seg_cli, head, tmp_path / "seg.nii.gz", "--model", tiny_seg_model, "-q", capsys=capsys)
    assert code == 0, err


def test_register_refuses_a_slab_of_a_real_t1(tmp_path, capsys):
    t1 = need(DATA / "brainweb_subject04" / "T1w_sim.nii.gz")
    thin = slab(t1, tmp_path / "slab.nii.gz")
    code, _, err = run(morph_cli, "register", "-m", "rigid", thin, t1, "-t", tmp_path / "t.lta", capsys=capsys)
    line = error_line(err, "synthmorph")
    assert code == 1 and str(thin) in line and "field of view 181x217x5 mm is too small" in line
    assert files_under(tmp_path) == {"slab.nii.gz"}


def test_similarity_ranks_the_truth_above_a_half_turn():
    from synthtools.morph.similarity import identity_similarity, similarity

    t1 = load_volume(need(DATA / "brainweb_subject04" / "T1w_sim.nii.gz"))
    centre = t1.affine[:3, :3] @ ((np.array(t1.shape) - 1) / 2) + t1.affine[:3, 3]
    half_turn = np.diag([-1.0, -1.0, 1.0, 1.0])            # 180 degrees about the z axis, through the centre
    half_turn[:3, 3] = centre - half_turn[:3, :3] @ centre
    same = identity_similarity(t1, t1)
    assert same > 1.5                                          # an image against itself: near 2
    assert similarity(Affine(half_turn), t1, t1) < same - 0.1


def test_register_warns_when_worse_than_the_identity(images_for_register, tmp_path, capsys, monkeypatch):
    """The registration's answer is replaced by a half turn: the CLI warns
    (one line) and still writes what was asked."""
    import importlib

    from synthtools.morph.register import Registration

    reg_module = importlib.import_module("synthtools.morph.register")

    moving, fixed = images_for_register
    vol = load_volume(fixed)
    centre = vol.affine[:3, :3] @ ((np.array(vol.shape) - 1) / 2) + vol.affine[:3, 3]
    half_turn = np.diag([-1.0, -1.0, 1.0, 1.0])
    half_turn[:3, 3] = centre - half_turn[:3, :3] @ centre
    monkeypatch.setattr(reg_module, "register",
                        lambda *a, **k: Registration(Affine(half_turn), Affine(np.linalg.inv(half_turn))))
    code, _, err = run(morph_cli, "register", "-m", "rigid", moving, fixed, "-t", tmp_path / "t.lta", "-q",
                       capsys=capsys)
    warnings = [x for x in err.splitlines() if "warning" in x]
    assert code == 0 and len(warnings) == 1 and "less similar than before registration" in warnings[0], err
    assert (tmp_path / "t.lta").exists()


@pytest.fixture
def images_for_register(make_head, tmp_path):
    """The phantom head as moving and fixed (a translated copy)."""
    fixed = make_head("fixed.nii.gz", dtype=np.float32)
    img = nib.load(str(fixed))
    affine = img.affine.copy()
    affine[:3, 3] += [3.0, -2.0, 1.0]
    moving = tmp_path / "moving.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), str(moving))
    return moving, fixed


# ---------------------------------------- 4: X x Y x Z x 1 stays 4D on output --

def test_singleton_4d_keeps_its_shape_in_every_tool(make_head, tiny_strip_model, tiny_seg_model, tmp_path, capsys):
    head = make_head("head4d.nii.gz", frames=1)
    shape = nib.load(str(head)).shape
    assert len(shape) == 4 and shape[3] == 1
    code, _, err = run(strip_cli, head, tmp_path / "s.nii.gz", "-m", tmp_path / "m.nii.gz",
                       "--model", tiny_strip_model, capsys=capsys)
    assert code == 0, err
    code, _, err = run(seg_cli, head, tmp_path / "seg.nii.gz", "--model", tiny_seg_model, "-q", capsys=capsys)
    assert code == 0, err
    vol = load_volume(head, allow_4d=True)
    code, _, err = run(morph_cli, "apply", lta(tmp_path / "id.lta", fixed=vol, moving=vol), head,
                       tmp_path / "moved.nii.gz", capsys=capsys)
    assert code == 0, err
    for name in ("s.nii.gz", "m.nii.gz", "seg.nii.gz", "moved.nii.gz"):
        assert nib.load(str(tmp_path / name)).shape == shape, name
    assert_same_geometry(tmp_path / "m.nii.gz", head)


def test_robex_atlas_keeps_its_4d_shape_through_apply(tmp_path, capsys):
    atlas = need(DATA / "robex_atlas_t1" / "atlas.nii.gz")
    vol = load_volume(atlas, allow_4d=True)
    code, _, err = run(morph_cli, "apply", lta(tmp_path / "id.lta", fixed=vol, moving=vol), atlas,
                       tmp_path / "o.nii.gz", "--fixed", atlas, capsys=capsys)
    out = nib.load(str(tmp_path / "o.nii.gz"))
    assert code == 0 and out.shape == (116, 150, 155, 1) == nib.load(str(atlas)).shape, err
    assert np.allclose(np.asarray(out.dataobj), np.asarray(nib.load(str(atlas)).dataobj), atol=0.05)  # float32 trilinear


# ------------------------------------- 5: apply keeps the fixed header codes --

def test_apply_keeps_the_fixed_images_qform_and_sform_codes(tmp_path, capsys):
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [-19, -21, -17]
    fixed = image(tmp_path / "fixed.nii.gz", ramp().astype(np.float32), aff, qcode=2, scode=1)
    moving = image(tmp_path / "moving.nii.gz", ramp().astype(np.float32), aff, qcode=1, scode=1)
    t = lta(tmp_path / "t.lta", np.eye(4))
    code, _, err = run(morph_cli, "apply", t, moving, tmp_path / "o.nii.gz", "--fixed", fixed, capsys=capsys)
    assert code == 0, err
    hdr = nib.load(str(tmp_path / "o.nii.gz")).header
    assert (int(hdr["qform_code"]), int(hdr["sform_code"])) == (2, 1)
    assert_same_geometry(tmp_path / "o.nii.gz", fixed)


# ------------------------------- 6: a scaled uint8 input is never float64 --

def test_scaled_uint8_is_written_as_float32_with_its_real_values(make_head, tiny_strip_model, tmp_path, capsys):
    head = make_head("ct.nii.gz", dtype=np.uint8)
    img = nib.load(str(head))
    scaled = nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header)
    scaled.header.set_slope_inter(14.88, 0.0)
    nib.save(scaled, str(tmp_path / "ct_scaled.nii.gz"))
    code, _, err = run(strip_cli, tmp_path / "ct_scaled.nii.gz", tmp_path / "s.nii.gz", "-m", tmp_path / "m.nii.gz",
                       "--model", tiny_strip_model, capsys=capsys)
    assert code == 0, err
    out = nib.load(str(tmp_path / "s.nii.gz"))
    assert out.get_data_dtype() == np.float32
    real = np.asarray(nib.load(str(tmp_path / "ct_scaled.nii.gz")).dataobj)
    mask = np.asarray(nib.load(str(tmp_path / "m.nii.gz")).dataobj) > 0
    assert mask.any() and np.allclose(np.asarray(out.dataobj)[mask], real[mask], rtol=1e-6)


def test_scaled_uint8_ct_template_loads_as_float32():
    ct = need(DATA / "ct_template_scct" / "scct_cormack_head.nii.gz")
    vol = load_volume(ct, dtype=None)
    assert vol.data.dtype == np.float32
    assert np.allclose(vol.data, np.asanyarray(nib.load(str(ct)).dataobj), rtol=1e-6)


# ----------------------------------------- 7: no unshipped synthstrip-nocsf --

def test_no_csf_help_names_no_unshipped_model_and_needs_the_channel(head_path, tiny_strip_model, tmp_path, capsys):
    with pytest.raises(SystemExit):
        strip_cli.main(["-h"])
    help_text = capsys.readouterr().out
    assert "--no-csf" in help_text and "synthstrip-nocsf" not in help_text
    assert "synthstrip-nocsf" not in Path(strip_cli.__file__).read_text()
    # A model with one brain definition (CSF): --no-csf is refused, nothing written.
    code, _, err = run(strip_cli, head_path, tmp_path / "s.nii.gz", "--no-csf", "--model", tiny_strip_model,
                       capsys=capsys)
    assert code == 1 and "no no-CSF output" in error_line(err, "synthstrip")
    assert not (tmp_path / "s.nii.gz").exists()


# ------------------------------- 8: everything moved out of the field of view --

def test_apply_refuses_a_transform_that_moves_everything_out(tmp_path, capsys):
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    src = image(tmp_path / "m.nii.gz", ramp().astype(np.float32), aff)
    far = np.eye(4)
    far[:3, 3] = [500.0, 0.0, 0.0]   # the fixed grid pulls back 500 mm away from the image
    t = lta(tmp_path / "far.lta", far, fixed=(ramp().shape, aff), moving=(ramp().shape, aff))
    code, _, err = run(morph_cli, "apply", t, src, tmp_path / "o.nii.gz", capsys=capsys)
    assert code == 1 and "out of the output field of view" in error_line(err, "synthmorph")
    assert not (tmp_path / "o.nii.gz").exists()
    near = np.eye(4)
    near[:3, 3] = [10.0, 0.0, 0.0]   # partly outside: fine
    t = lta(tmp_path / "near.lta", near, fixed=(ramp().shape, aff), moving=(ramp().shape, aff))
    assert run(morph_cli, "apply", t, src, tmp_path / "o.nii.gz", capsys=capsys)[0] == 0


# ---------------------------------------- 9: a binary file named .lta --

@pytest.mark.parametrize("content, kind", [(gzip.compress(b"type = 1\n" * 50), "gzip-compressed data"),
                                           (bytes(range(256)) * 4, "binary data")])
def test_binary_lta_is_a_one_line_error(content, kind, tmp_path, capsys):
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    src = image(tmp_path / "m.nii.gz", ramp().astype(np.float32), aff)
    (tmp_path / "t.lta").write_bytes(content)
    code, _, err = run(morph_cli, "apply", tmp_path / "t.lta", src, tmp_path / "o.nii.gz", capsys=capsys)
    line = error_line(err, "synthmorph")
    assert code == 1 and "not a FreeSurfer LTA file" in line and kind in line
    assert "UnicodeDecodeError" not in err and "codec" not in err
    (tmp_path / "t.txt").write_bytes(content)
    code, _, err = run(morph_cli, "apply", tmp_path / "t.txt", src, tmp_path / "o.nii.gz", "--fixed", src,
                       capsys=capsys)
    assert code == 1 and "not an ITK text transform" in error_line(err, "synthmorph")


# ------------------------------------------- 10: matplotlib is a dependency --

def test_matplotlib_is_a_runtime_dependency():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert any(re.match(r"matplotlib\b", d) for d in project["dependencies"])


def test_plots_are_not_skipped_silently(monkeypatch, tmp_path):
    """Without matplotlib the sweep and training-curve plots raise instead of
    returning without their PNG."""
    from synthtools.training import loop, sweep

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError):
        sweep.plot_sweep([{"value": 1, "val": {"dice_x": 0.5}}], "p", tmp_path / "s.png")
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    with pytest.raises(ImportError):
        loop.plot_log(tmp_path / "log.jsonl", tmp_path / "l.png")


# ----------------------------------------------------------- consistency --

def test_version_everywhere():
    from importlib import metadata

    import synthtools
    assert synthtools.__version__ == metadata.version("synthtools")
    for argv in (["synthtools.cli.strip", "--version"], ["synthtools.cli.seg", "--version"],
                 ["synthtools.cli.morph", "--version"], ["synthtools.cli.morph", "register", "--version"],
                 ["synthtools.cli.morph", "apply", "--version"]):
        res = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and res.stdout.strip().endswith(f"(synthtools) {synthtools.__version__}"), argv


@pytest.mark.parametrize("flags", [["--threads", "1"], ["-t", "1"], ["-n", "1"]])
def test_synthstrip_thread_flags(flags, head_path, tiny_strip_model, tmp_path, capsys):
    torch.set_num_threads(2)
    code, out, err = run(strip_cli, head_path, tmp_path / "s.nii.gz", *flags, "--model", tiny_strip_model,
                         capsys=capsys)
    assert code == 0 and torch.get_num_threads() == 1 and "cpu (1 thread)" in out, err


def test_threads_flag_on_every_cli(head_path, tiny_seg_model, tmp_path, capsys):
    vol = load_volume(head_path)
    t = lta(tmp_path / "id.lta", fixed=vol, moving=vol)
    for cli, argv in ((seg_cli, [head_path, tmp_path / "seg.nii.gz", "--model", tiny_seg_model, "-q"]),
                      (morph_cli, ["apply", t, head_path, tmp_path / "o.nii.gz"])):
        torch.set_num_threads(2)
        code, _, err = run(cli, *argv, "--threads", "1", capsys=capsys)
        assert code == 0 and torch.get_num_threads() == 1, err
    for cli, argv in ((seg_cli, [head_path, tmp_path / "x.nii.gz"]), (morph_cli, ["apply", t, head_path,
                                                                                    tmp_path / "x.nii.gz"])):
        code, _, err = run(cli, *argv, "--threads", "0", capsys=capsys)
        assert code == 2 and "at least 1" in err


def test_synthseg_progress_lines_and_quiet(head_path, tiny_seg_model, tmp_path, capsys):
    code, _, err = run(seg_cli, head_path, tmp_path / "seg.nii.gz", "--model", tiny_seg_model, "--no-refine",
                       capsys=capsys)
    stages = [x for x in err.splitlines() if re.fullmatch(r"synthseg: .+: \d+\.\d s \(total \d+\.\d s\)", x)]
    assert code == 0 and len(stages) >= 4 and len(stages) == len(err.strip().splitlines()), err
    assert any("network" in x for x in stages) and stages[-1].startswith("synthseg: wrote the outputs")
    code, out, err = run(seg_cli, head_path, tmp_path / "seg2.nii.gz", "--model", tiny_seg_model, "--no-refine",
                         "-q", capsys=capsys)
    assert code == 0 and err == "" and out == ""


def test_batch_counters_agree_with_the_summary(make_head, tiny_strip_model, tmp_path, capsys):
    heads = [make_head(f"h{k}.nii.gz") for k in range(3)]
    code, out, err = run(strip_cli, "-i", tmp_path / "missing.nii.gz", *heads, "-m", f"{tmp_path}/masks/",
                         "--model", tiny_strip_model, capsys=capsys)
    assert code == 1
    assert "[1/4]" in err and "file not found" in err
    assert [x for x in ("[2/4]", "[3/4]", "[4/4]") if x in out] == ["[2/4]", "[3/4]", "[4/4]"], out
    assert err.strip().splitlines()[-1] == "synthstrip: error: 1 of 4 inputs failed"
    assert "[1/3]" not in out + err
