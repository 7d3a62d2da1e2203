"""The ``synthstrip`` command: geometry, mask properties, batch mode, errors.

Runs the CLI in-process (``run``/``main``) with tiny 4 mm models from
conftest; two cases go through a subprocess for the real exit code.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from synthtools.cli import strip as cli
from conftest import (BAD_INPUT_CASES, assert_same_geometry, files_under, strip_metadata,  # noqa: E402
                      threshold_unet)  # (tests/ is on sys.path)
from synthtools.nets.unet import UNet
from synthtools.skullstrip import mask_from_sdt
from synthtools.weights import save_model
import helpers  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def synthstrip(*args, capsys=None) -> tuple[int, str]:
    """Run the CLI in-process; exit code and stderr (if capsys is given)."""
    try:
        cli.main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    else:  # pragma: no cover - main always exits
        raise AssertionError("main() returned instead of exiting")
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


def data(path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def one_error_line(err: str) -> str:
    return helpers.one_error_line(err, "synthstrip")


# ------------------------------------------------ mask_from_sdt, directly --

def test_mask_from_sdt_one_component_no_holes_monotonic():
    """Ellipsoid with an internal cavity, plus a separate blob: the mask is
    the ellipsoid alone, holes filled, and grows with the border."""
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in (40, 36, 32)], indexing="ij"), -1)
    ell = np.sqrt(np.sum(((idx - [18, 18, 16]) / [12, 10, 9]) ** 2, -1)) <= 1
    cavity = np.sqrt(np.sum((idx - [18, 18, 16]) ** 2, -1)) <= 3
    blob = np.sqrt(np.sum((idx - [36, 4, 4]) ** 2, -1)) <= 2
    inside = (ell & ~cavity) | blob
    # Voxel-centre distances, shifted half a voxel so zero lies on the boundary.
    sdt = np.where(inside, 0.5 - ndimage.distance_transform_edt(inside),
                   ndimage.distance_transform_edt(~inside) - 0.5).astype(np.float32)

    masks = {b: mask_from_sdt(sdt, b) for b in (-1.0, 0.0, 1.0, 3.0)}
    for b, m in masks.items():
        assert m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1}
        assert ndimage.label(m)[1] == 1, f"border {b}: not one component"
        assert np.array_equal(ndimage.binary_fill_holes(m), m.astype(bool)), f"border {b}: holes"
        assert m[18, 18, 16] == 1  # cavity filled
        assert m[36, 4, 4] == 0     # blob dropped
    for small, big in ((-1.0, 0.0), (0.0, 1.0), (1.0, 3.0)):
        assert np.all(masks[small] <= masks[big]) and masks[small].sum() < masks[big].sum()


def test_flip_makes_the_distance_map_mirror_equivariant(random_strip_model):
    """With the test-time flip, mirroring the head left-right (same grid)
    mirrors the distance map exactly; a random network alone does not."""
    from synthtools.io import Volume
    from synthtools.skullstrip import brain_sdt
    from synthtools.weights import load_model
    from conftest import head_phantom  # noqa: E402
    model = load_model(random_strip_model)
    # Already the model's space (4 mm LIA, even sizes): conform is the identity.
    affine = np.array([[-4.0, 0, 0, 60], [0, 0, 4, -60], [0, -4, 0, 60], [0, 0, 0, 1]])
    shape = (32, 32, 32)
    head = head_phantom(affine, shape)[0].astype(np.float32)
    left, right = Volume(head, affine), Volume(head[::-1].copy(), affine)
    for flip in (False, True):
        a, b = brain_sdt(model, left, flip=flip), brain_sdt(model, right, flip=flip)
        gap = np.abs(a[::-1] - b).max()
        assert gap < 1e-4 if flip else gap > 1e-3, (flip, gap)


# ------------------------------------------------------------- geometry --

def test_geometry_oblique_anisotropic_3d(make_head, tiny_strip_model, tmp_path, capsys):
    head = make_head("aniso.nii.gz", shape=(44, 40, 24), voxsize=(1.8, 2.2, 3.0), qcode=1, scode=2)
    out, mask, sdt = tmp_path / "s.nii.gz", tmp_path / "m.nii.gz", tmp_path / "d.nii.gz"
    code, err = synthstrip(head, out, "-m", mask, "-d", sdt, "--model", tiny_strip_model, capsys=capsys)
    assert code == 0, err
    for path in (out, mask, sdt):
        assert_same_geometry(path, head)
    img = nib.load(str(out))
    assert img.get_data_dtype() == np.uint16
    assert nib.load(str(mask)).get_data_dtype() == np.uint8
    assert nib.load(str(sdt)).get_data_dtype() == np.float32
    m = data(mask)
    # The stripped image is the input inside the mask and 0 outside.
    assert np.array_equal(data(out), np.where(m > 0, data(head), 0))
    # The hand-set model marks the phantom's brain: a wrong axis order,
    # flip or affine would wreck the overlap.
    from conftest import head_phantom  # noqa: E402  (pytest puts tests/ on sys.path)
    brain = head_phantom(nib.load(str(head)).affine, (44, 40, 24))[1]
    dice = 2 * np.sum((m > 0) & brain) / (np.sum(m > 0) + brain.sum())
    assert dice > 0.8, dice


def test_geometry_4d(make_head, tiny_strip_model, tmp_path, capsys):
    head = make_head("series.nii.gz", shape=(32, 36, 30), dtype=np.float32, frames=2)
    out, mask, sdt = tmp_path / "s.nii.gz", tmp_path / "m.nii.gz", tmp_path / "d.nii.gz"
    code, err = synthstrip("-i", head, "-o", out, "-m", mask, "-d", sdt, "--model", tiny_strip_model,
                           capsys=capsys)
    assert code == 0, err
    for path in (out, mask, sdt):
        assert_same_geometry(path, head)
    assert nib.load(str(out)).get_data_dtype() == np.float32
    m = data(mask)
    assert m.shape == (32, 36, 30, 2) and set(np.unique(m)) <= {0, 1}
    assert all(m[..., t].any() for t in range(2))


# -------------------------------------------------------- mask properties --

@pytest.mark.parametrize("which", ["tiny_strip_model", "random_strip_model"])
def test_mask_binary_one_component_no_holes(which, request, head_path, tmp_path, capsys):
    model = request.getfixturevalue(which)
    mask = tmp_path / "m.nii.gz"
    code, err = synthstrip(head_path, "-m", mask, "--model", model, capsys=capsys)
    assert code == 0, err
    m = data(mask)
    assert m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1}
    if m.any():  # a random model may mark nothing (the CLI then only warns)
        assert ndimage.label(m)[1] == 1
        assert np.array_equal(ndimage.binary_fill_holes(m), m.astype(bool))


def test_border_grows_and_shrinks_mask(head_path, tiny_strip_model, tmp_path, capsys):
    masks, sdts = {}, {}
    for b in (3, 1, -1):
        mask, sdt = tmp_path / f"m{b}.nii.gz", tmp_path / f"d{b}.nii.gz"
        code, err = synthstrip(head_path, "-m", mask, "-d", sdt, "-b", b, "--model", tiny_strip_model,
                               capsys=capsys)
        assert code == 0, err
        masks[b], sdts[b] = data(mask).astype(bool), data(sdt)
        assert not np.any(masks[b] & (sdts[b] >= b))  # mask within {sdt < border}
    assert np.array_equal(sdts[3], sdts[-1])  # the border only thresholds
    assert np.all(masks[-1] <= masks[1]) and np.all(masks[1] <= masks[3])
    assert masks[-1].sum() < masks[1].sum() < masks[3].sum()


# ------------------------------------------------------------- batch mode --

def test_batch_matches_single_runs(make_head, tiny_strip_model, tmp_path, capsys):
    a = make_head("a.nii.gz")
    b = make_head("b.nii.gz", shape=(36, 40, 32), voxsize=(2.0, 2.2, 2.4), folder=tmp_path / "other")
    for name in ("a", "b"):
        src = a if name == "a" else b
        code, err = synthstrip(src, tmp_path / f"{name}_single.nii.gz", "-m", tmp_path / f"{name}_m.nii.gz",
                               "--model", tiny_strip_model, capsys=capsys)
        assert code == 0, err
    # Output folders: one existing, one created because of the trailing '/'.
    (tmp_path / "out").mkdir()
    code, err = synthstrip("-i", a, b, "-o", tmp_path / "out", "-m", f"{tmp_path / 'masks'}/",
                           "--model", tiny_strip_model, capsys=capsys)
    assert code == 0, err
    # The same through a list file.
    (tmp_path / "list.txt").write_text(f"# scans\n{a}\n\n{b}\n")
    code, err = synthstrip("-i", tmp_path / "list.txt", "-o", f"{tmp_path / 'out2'}/", "--model",
                           tiny_strip_model, capsys=capsys)
    assert code == 0, err
    for name in ("a", "b"):
        single = data(tmp_path / f"{name}_single.nii.gz")
        for folder in ("out", "out2"):
            batch = data(tmp_path / folder / f"{name}_stripped.nii.gz")
            assert batch.dtype == single.dtype and batch.tobytes() == single.tobytes()
        assert data(tmp_path / "masks" / f"{name}_mask.nii.gz").tobytes() == \
            data(tmp_path / f"{name}_m.nii.gz").tobytes()


def test_batch_continues_after_a_failing_input(make_head, tiny_strip_model, tmp_path, capsys):
    a, b = make_head("a.nii.gz"), make_head("b.nii.gz")
    bad = tmp_path / "bad.nii.gz"
    bad.write_text("not an image")
    code, err = synthstrip("-i", a, bad, tmp_path / "gone.nii.gz", b, "-m", f"{tmp_path}/out/",
                           "--model", tiny_strip_model, capsys=capsys)
    assert code == 1
    assert "bad.nii.gz" in err and "gone.nii.gz" in err and "Traceback" not in err
    assert files_under(tmp_path / "out") == {"a_mask.nii.gz", "b_mask.nii.gz"}


def test_mgz_input_keeps_its_format(head_path, tiny_strip_model, tmp_path, capsys):
    img = nib.load(str(head_path))
    mgz = tmp_path / "t1.mgz"
    nib.save(nib.MGHImage(np.asanyarray(img.dataobj), img.affine), str(mgz))
    code, err = synthstrip("-i", mgz, "-o", f"{tmp_path}/o/", "--model", tiny_strip_model, capsys=capsys)
    assert code == 0, err
    out = nib.load(str(tmp_path / "o" / "t1_stripped.mgz"))
    assert np.allclose(out.affine, nib.load(str(mgz)).affine) and out.shape == img.shape


def test_overwrite_input_when_allowed(head_path, tiny_strip_model, capsys):
    before = data(head_path)
    code, err = synthstrip(head_path, head_path, "--overwrite-input", "--model", tiny_strip_model,
                           capsys=capsys)
    assert code == 0, err
    after = data(head_path)
    assert after.dtype == before.dtype and np.all((after == before) | (after == 0))
    assert (after == 0).sum() > (before == 0).sum()


def test_fill_value_and_snapshot(head_path, tiny_strip_model, tmp_path, capsys):
    out, mask, png = tmp_path / "s.nii.gz", tmp_path / "m.nii.gz", tmp_path / "snap.png"
    code, err = synthstrip(head_path, out, "-m", mask, "-f", 7, "--snapshot", png, "--model",
                           tiny_strip_model, capsys=capsys)
    assert code == 0, err
    assert np.all(data(out)[data(mask) == 0] == 7)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------- errors --

# The tool-independent cases live in conftest (synthseg runs them too); these
# involve synthstrip's own options.
ERROR_CASES = {
    **BAD_INPUT_CASES,
    "fill out of range": (lambda t, h, m: [h, t / "out" / "s.nii.gz", "-f", "-1"], 1, "fill value"),
    "mask is input": (lambda t, h, m: ["-i", h, "-m", h], 2, "overwrite an input"),
    "same output twice": (lambda t, h, m: [h, t / "out" / "s.nii.gz", "-m", t / "out" / "s.nii.gz"], 2, "same output"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_one_line_no_output(case, head_path, tiny_strip_model, tmp_path, capsys):
    setup, expected, text = ERROR_CASES[case]
    (tmp_path / "out").mkdir()
    argv = setup(tmp_path, head_path, tiny_strip_model)
    if "--model" not in argv:
        argv += ["--model", tiny_strip_model]
    # The other outputs too: none of them may appear.
    if "-m" not in argv and "-i" not in argv:
        argv += ["-m", tmp_path / "out" / "m.nii.gz", "-d", tmp_path / "out" / "d.nii.gz"]
    before = files_under(tmp_path)
    code, err = synthstrip(*argv, capsys=capsys)
    assert code == expected, err
    assert text in one_error_line(err)
    assert files_under(tmp_path) == before


def test_unwritable_output_folder(head_path, tiny_strip_model, tmp_path, monkeypatch, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # root ignores permissions: make the access check see what a user would.
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.fspath(p).startswith(str(ro))
                            else real_access(p, mode, **kw))
    try:
        code, err = synthstrip(head_path, ro / "s.nii.gz", "--model", tiny_strip_model, capsys=capsys)
        assert code == 2 and "not writable" in one_error_line(err)
        assert not any(ro.iterdir())
    finally:
        ro.chmod(0o755)


def test_default_model_not_yet_available(head_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SYNTHTOOLS_MODELS", str(tmp_path / "empty"))
    code, err = synthstrip(head_path, tmp_path / "s.nii.gz", "--no-csf", capsys=capsys)
    assert code == 1   # a missing model: a runtime failure, not a usage error
    line = one_error_line(err)
    assert "not yet available" in line and "'synthstrip'" in line
    assert not (tmp_path / "s.nii.gz").exists()


def test_no_csf_uses_the_second_output_of_a_two_boundary_model(head_path, tmp_path, capsys):
    """A model with both brain definitions: --no-csf thresholds its second
    channel (here the first shifted by +3 mm, i.e. a smaller brain)."""
    net = UNet(3, 1, 2, features=(4, 8), convs=1)
    base = threshold_unet()
    with torch.no_grad():
        state = {k: v.clone() for k, v in base.state_dict().items()}
        state["head.weight"] = state["head.weight"].repeat(2, 1, 1, 1, 1)
        state["head.bias"] = state["head.bias"].repeat(2) + torch.tensor([0.0, 3.0])
        net.load_state_dict(state)
    meta = strip_metadata()
    meta["output"].update(channels=["csf", "nocsf"])
    folder = save_model(net, meta, tmp_path / "two")
    masks = {}
    for flag in ([], ["--no-csf"]):
        out = tmp_path / f"m{len(flag)}.nii.gz"
        code, err = synthstrip("-i", head_path, "-m", out, "--model", folder, *flag, capsys=capsys)
        assert code == 0, err
        masks[bool(flag)] = np.asarray(nib.load(str(out)).dataobj) > 0
    assert masks[True].sum() < 0.9 * masks[False].sum() and not (masks[True] & ~masks[False]).any()


def test_gpu_without_cuda(head_path, tiny_strip_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = synthstrip(head_path, tmp_path / "s.nii.gz", "-g", "--model", tiny_strip_model, capsys=capsys)
    assert code == 1 and "CUDA" in one_error_line(err)
    assert not (tmp_path / "s.nii.gz").exists()


def test_corrupted_weights(head_path, tiny_strip_model, tmp_path, capsys):
    bad = tmp_path / "bad_model"
    shutil.copytree(tiny_strip_model, bad)
    raw = bytearray((bad / "weights.pt").read_bytes())
    raw[-20] ^= 0xFF
    (bad / "weights.pt").write_bytes(bytes(raw))
    code, err = synthstrip(head_path, tmp_path / "s.nii.gz", "--model", bad, capsys=capsys)
    assert code == 1 and "sha256 mismatch" in one_error_line(err)
    assert not (tmp_path / "s.nii.gz").exists()


def test_snapshot_without_matplotlib(head_path, tiny_strip_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    code, err = synthstrip(head_path, tmp_path / "s.nii.gz", "--snapshot", tmp_path / "x.png",
                           "--model", tiny_strip_model, capsys=capsys)
    assert code == 1 and "matplotlib" in one_error_line(err)
    assert files_under(tmp_path) == {"head.nii.gz"}


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["-h"])
    assert exc.value.code == 0 and "--no-csf" in capsys.readouterr().out


def test_synthmorph_without_subcommand(capsys):
    # synthmorph has its own tests (test_morph_transforms.py); here only that
    # bare 'synthmorph' says what it expects, then one error line, exit 2.
    from synthtools.cli import morph

    with pytest.raises(SystemExit) as exc:
        morph.main([])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("usage: synthmorph register") and any("synthmorph apply TRANS" in x for x in lines)
    assert lines[-1].startswith("synthmorph: error: a subcommand and its images are required")


# ------------------------------------------------------ real subprocesses --

def _subprocess(*args, env_extra=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "synthtools.cli.strip", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=120)


def test_subprocess_missing_input(tmp_path, tiny_strip_model):
    res = _subprocess(tmp_path / "nope.nii.gz", tmp_path / "s.nii.gz", "--model", tiny_strip_model)
    assert res.returncode == 1
    assert "file not found" in one_error_line(res.stderr)
    assert files_under(tmp_path) == set()


def test_subprocess_gpu_without_cuda(head_path, tiny_strip_model, tmp_path):
    # Hiding the devices makes this hold on GPU machines too.
    res = _subprocess(head_path, tmp_path / "s.nii.gz", "-g", "--model", tiny_strip_model,
                      env_extra={"CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 1
    assert "CUDA" in one_error_line(res.stderr)
    assert not (tmp_path / "s.nii.gz").exists()


def test_example_scan_is_bundled_and_runs(tiny_strip_model, tmp_path, capsys):
    from synthtools.data import example_scan
    src = example_scan()
    assert src.is_file()
    code, err = synthstrip("--example", tmp_path / "s.nii.gz", "-m", tmp_path / "m.nii.gz",
                           "--model", tiny_strip_model, capsys=capsys)
    assert code == 0, err
    ref = nib.load(str(src))
    out = nib.load(str(tmp_path / "m.nii.gz"))
    assert out.shape == ref.shape and np.array_equal(out.affine, ref.affine)
    code, err = synthstrip("--example", "-i", src, "-m", tmp_path / "x.nii.gz", capsys=capsys)
    assert code == 2 and "--example" in one_error_line(err)
