"""Tests for synthtools.io (geometry-safe I/O) and synthtools.conform."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
import torch

from synthtools.conform import axcodes, conform, orientation_affine, resample
from synthtools.io import (
    InputError,
    Volume,
    check_input_path,
    check_output_path,
    load_volume,
    save_volume,
)

LABELS = (0, 3, 17, 41)


def rotation(deg: float, axis: int) -> np.ndarray:
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(4)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def oblique_affine() -> np.ndarray:
    """Rotated 17 deg (two axes), 0.9 x 1.1 x 3 mm voxels, off-centre."""
    aff = rotation(17, 2) @ rotation(-17, 0) @ np.diag([0.9, 1.1, 3.0, 1.0])
    aff[:3, 3] = [-12.3, 25.1, -7.7]
    return aff


def lia_affine(vs: float = 1.0) -> np.ndarray:
    aff = np.zeros((4, 4))
    aff[:3, :3] = np.array([[-1, 0, 0], [0, 0, 1], [0, -1, 0]]) * vs
    aff[:, 3] = [20.0, -15.0, 18.0, 1.0]
    return aff


GRIDS = {
    # name: (affine, shape)
    "oblique": (oblique_affine(), (26, 24, 10)),
    "LPS": (np.array([[-1.0, 0, 0, 10], [0, -1.0, 0, 12], [0, 0, 1.0, -9], [0, 0, 0, 1]]), (24, 22, 20)),
    "RAS": (np.diag([1.2, 1.2, 1.2, 1.0]), (20, 22, 18)),
    "LIA": (lia_affine(), (24, 20, 22)),
}


def world_coords(affine: np.ndarray, shape) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def centre(affine: np.ndarray, shape) -> np.ndarray:
    return affine[:3, :3] @ ((np.array(shape) - 1) / 2) + affine[:3, 3]


def blob(affine: np.ndarray, shape, sigma: float = 6.0) -> np.ndarray:
    w = world_coords(affine, shape) - centre(affine, shape)
    return np.exp(-np.sum(w**2, -1) / (2 * sigma**2)).astype(np.float32)


def label_spheres(affine: np.ndarray, shape) -> np.ndarray:
    r = np.linalg.norm(world_coords(affine, shape) - centre(affine, shape), axis=-1)
    lab = np.zeros(shape, np.int16)
    lab[r < 11] = 3
    lab[r < 7.5] = 17
    lab[r < 4] = 41
    return lab


def interior(shape, margin: int = 2) -> tuple[slice, ...]:
    return tuple(slice(margin, n - margin) if n > 2 * margin + 2 else slice(1, n - 1) for n in shape)


def edge_corners(affine: np.ndarray, shape) -> np.ndarray:
    c = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in shape], indexing="ij")).reshape(3, -1)
    return affine[:3, :3] @ c + affine[:3, 3:4]


def write_nifti(path, data, affine, *, qcode=1, scode=1) -> str:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=qcode)
    img.set_sform(affine, code=scode)
    nib.save(img, str(path))
    return str(path)


def open_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def assert_one_line(exc: pytest.ExceptionInfo, path) -> None:
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(os.fspath(path)), msg


# ---------------------------------------------------------------------------
# I/O round trips


def test_nifti_round_trip_keeps_header_exactly(tmp_path):
    aff = oblique_affine()
    data = np.random.default_rng(0).normal(size=(20, 18, 8)).astype(np.float32)
    img = nib.Nifti1Image(data, aff)
    # Different qform and sform, different codes: both must survive untouched.
    img.set_qform(aff, code=1)
    shifted = aff.copy()
    shifted[:3, 3] += [1.5, -2.0, 0.25]
    img.set_sform(shifted, code=2)
    img.header.set_xyzt_units("mm", "msec")
    src = tmp_path / "in.nii.gz"
    nib.save(img, str(src))

    vol = load_volume(src)
    assert vol.data.dtype == np.float32 and vol.shape == (20, 18, 8) and vol.frames == 1
    np.testing.assert_allclose(vol.voxsize, [0.9, 1.1, 3.0], rtol=1e-6)
    out = tmp_path / "out.nii.gz"
    save_volume(vol.data, vol, out)

    a, b = nib.load(str(src)), nib.load(str(out))
    np.testing.assert_array_equal(np.asanyarray(b.dataobj), data)
    for key in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d",
                "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z",
                "pixdim", "xyzt_units"):
        np.testing.assert_array_equal(a.header[key], b.header[key], err_msg=key)
    np.testing.assert_array_equal(a.affine, b.affine)
    np.testing.assert_array_equal(load_volume(out).affine, vol.affine)
    assert sorted(os.listdir(tmp_path)) == ["in.nii.gz", "out.nii.gz"]  # no temp files


def test_mgz_round_trip_and_conversion(tmp_path):
    aff = oblique_affine()
    data = (np.random.default_rng(1).random((16, 14, 12)) * 100).astype(np.float32)
    src = tmp_path / "in.mgz"
    nib.save(nib.MGHImage(data, aff), str(src))

    vol = load_volume(src)
    np.testing.assert_allclose(vol.affine, aff, atol=1e-4)
    save_volume(vol.data, vol, tmp_path / "out.mgz")
    back = nib.load(str(tmp_path / "out.mgz"))
    assert isinstance(back, nib.MGHImage)
    np.testing.assert_array_equal(back.affine, nib.load(str(src)).affine)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), data)

    # MGH -> NIfTI: affine copied, fresh scanner-coded header.
    save_volume(vol.data, vol, tmp_path / "conv.nii")
    nii = nib.load(str(tmp_path / "conv.nii"))
    assert isinstance(nii, nib.Nifti1Image)
    assert int(nii.header["qform_code"]) == 1 and int(nii.header["sform_code"]) == 1
    np.testing.assert_allclose(nii.affine, vol.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asanyarray(nii.dataobj), data)

    # NIfTI -> MGH.
    src2 = write_nifti(tmp_path / "b.nii.gz", data, aff)
    vol2 = load_volume(src2)
    save_volume(vol2.data, vol2, tmp_path / "b.mgh")
    mgh = load_volume(tmp_path / "b.mgh")
    np.testing.assert_allclose(mgh.affine, vol2.affine, atol=1e-4)
    np.testing.assert_array_equal(mgh.data, data)


@pytest.mark.parametrize("ext", [".nii.gz", ".mgz"])
def test_save_dtypes_4d_and_explicit_affine(tmp_path, ext):
    aff = oblique_affine()
    vol = load_volume(write_nifti(tmp_path / "in.nii.gz", blob(aff, (12, 10, 8)), aff, scode=2))

    # Float mask written as uint8: rounded, no scaling on disk.
    mask = (vol.data > 0.5).astype(np.float32) * 0.9999
    save_volume(mask, vol, tmp_path / f"mask{ext}", dtype=np.uint8)
    m = nib.load(str(tmp_path / f"mask{ext}"))
    assert m.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(m.dataobj), (vol.data > 0.5).astype(np.uint8))

    # Labels (int64 in memory) stored as int32 exactly.
    lab = label_spheres(aff, (12, 10, 8)).astype(np.int64)
    save_volume(lab, vol, tmp_path / f"lab{ext}", dtype=np.int32)
    back = load_volume(tmp_path / f"lab{ext}", dtype=None)
    assert back.data.dtype == np.int32
    np.testing.assert_array_equal(back.data, lab)

    # Posteriors: extra 4th dimension on a 3D reference grid.
    post = np.random.default_rng(2).random((12, 10, 8, 3)).astype(np.float32)
    save_volume(post, vol, tmp_path / f"post{ext}")
    p = load_volume(tmp_path / f"post{ext}", allow_4d=True)
    assert p.data.shape == (12, 10, 8, 3) and p.frames == 3
    np.testing.assert_array_equal(p.data, post)
    np.testing.assert_allclose(p.affine, vol.affine, atol=1e-4)

    # Explicit affine: fresh header.
    new_aff = lia_affine(1.5)
    save_volume(vol.data, None, tmp_path / f"aff{ext}", affine=new_aff)
    a = nib.load(str(tmp_path / f"aff{ext}"))
    np.testing.assert_allclose(a.affine, new_aff, atol=1e-5)
    if ext == ".nii.gz":
        assert int(a.header["qform_code"]) == 1 and int(a.header["sform_code"]) == 1


def test_torch_input_and_overwrite_rules(tmp_path):
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    src = write_nifti(tmp_path / "in.nii", blob(aff, (10, 10, 10)), aff)
    vol = load_volume(src)
    out = save_volume(torch.from_numpy(vol.data), vol, tmp_path / "t.nii")
    np.testing.assert_array_equal(load_volume(out).data, vol.data)
    with pytest.raises(InputError) as e:
        save_volume(vol.data, vol, out, overwrite=False)
    assert_one_line(e, out)
    with pytest.raises(InputError) as e:
        check_output_path(tmp_path / "sub" / ".." / "in.nii", input_paths=[src])
    assert "input" in str(e.value)
    check_output_path(src, input_paths=[src], allow_overwrite_input=True)


# ---------------------------------------------------------------------------
# Bad inputs


def _bad_images(tmp_path):
    rng = np.random.default_rng(3)
    ok = rng.random((10, 10, 10)).astype(np.float32)
    eye = np.eye(4)
    cases = {}
    cases["missing"] = tmp_path / "missing.nii.gz"
    txt = tmp_path / "text.nii.gz"
    txt.write_text("hello, this is not an image\n")
    cases["text"] = txt
    for ext in (".mgz", ".mgh"):
        bad = tmp_path / f"text{ext}"
        bad.write_text("hello, this is not an image either\n" * 20)
        cases[f"text{ext}"] = bad
    png = tmp_path / "image.png"
    png.write_bytes(b"\x89PNG\r\n")
    cases["ext"] = png
    cases["2d"] = write_nifti(tmp_path / "flat.nii.gz", rng.random((20, 20)).astype(np.float32), eye)
    cases["2d_slab"] = write_nifti(tmp_path / "slab.nii.gz", rng.random((20, 20, 1)).astype(np.float32), eye)
    cases["4d"] = write_nifti(tmp_path / "series.nii.gz", rng.random((10, 10, 10, 3)).astype(np.float32), eye)
    cases["5d"] = write_nifti(tmp_path / "five.nii", rng.random((6, 6, 6, 2, 2)).astype(np.float32), eye)
    nan = ok.copy()
    nan[3, 4, 5] = np.nan
    cases["nan"] = write_nifti(tmp_path / "nan.nii.gz", nan, eye)
    inf = ok.copy()
    inf[0, 0, 0] = np.inf
    cases["inf"] = write_nifti(tmp_path / "inf.nii", inf, eye)
    cases["zero"] = write_nifti(tmp_path / "zero.nii.gz", np.zeros((10, 10, 10), np.float32), eye)
    cases["huge_vox"] = write_nifti(tmp_path / "huge.nii.gz", ok, np.diag([100.0, 100.0, 100.0, 1.0]))
    tiny = tmp_path / "tiny.mgz"
    nib.save(nib.MGHImage(ok, np.diag([0.01, 1.0, 1.0, 1.0])), str(tiny))
    cases["tiny_vox"] = tiny
    sing = np.eye(4)
    sing[:3, 1] = sing[:3, 0]  # two parallel voxel axes
    cases["singular"] = write_nifti(tmp_path / "sing.nii.gz", ok, sing, qcode=0, scode=2)
    truncated = tmp_path / "trunc.nii"
    full = write_nifti(tmp_path / "full.nii", ok, eye)
    truncated.write_bytes(open_bytes(full)[:1000])
    cases["truncated"] = truncated
    return cases


def test_bad_inputs_raise_one_line_input_error(tmp_path):
    for name, path in _bad_images(tmp_path).items():
        with pytest.raises(InputError) as e:
            load_volume(path)
        assert_one_line(e, path)
        assert isinstance(e.value, ValueError), name
    # The 4D series is fine when allowed; a trailing singleton frame is 3D.
    vol = load_volume(tmp_path / "series.nii.gz", allow_4d=True)
    assert vol.data.shape == (10, 10, 10, 3) and vol.frames == 3
    one = write_nifti(tmp_path / "one.nii.gz", np.random.rand(8, 9, 7, 1).astype(np.float32), np.eye(4))
    assert load_volume(one).data.shape == (8, 9, 7)
    with pytest.raises(InputError):
        check_input_path(tmp_path)  # a folder


def test_bad_output_paths_leave_nothing_behind(tmp_path, monkeypatch):
    aff = np.eye(4)
    src = write_nifti(tmp_path / "in.nii.gz", blob(aff, (10, 10, 10)), aff)
    vol = load_volume(src)
    before = sorted(os.listdir(tmp_path))
    for bad in (tmp_path / "out.png", tmp_path / "out", tmp_path / "nope" / "out.nii.gz", tmp_path):
        with pytest.raises(InputError) as e:
            save_volume(vol.data, vol, bad)
        assert_one_line(e, bad)
    assert not (tmp_path / "nope").exists()

    # A failure while writing removes the temp file and leaves no output.
    def failing_save(img, filename):
        real_save(img, filename)  # the temp file exists now...
        raise OSError(28, "No space left on device")

    real_save = nib.save
    monkeypatch.setattr(nib, "save", failing_save)
    with pytest.raises(InputError) as e:
        save_volume(vol.data, vol, tmp_path / "out.mgz")
    assert_one_line(e, tmp_path / "out.mgz")
    monkeypatch.setattr(nib, "save", real_save)
    assert sorted(os.listdir(tmp_path)) == before

    if os.geteuid() != 0:  # root ignores permissions
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(InputError, match="not writable"):
                save_volume(vol.data, vol, ro / "out.nii.gz")
        finally:
            ro.chmod(0o700)


# ---------------------------------------------------------------------------
# conform


@pytest.mark.parametrize("voxsize", ["native", 0.8])
@pytest.mark.parametrize("grid", list(GRIDS))
def test_conform_round_trip_image_and_labels(grid, voxsize):
    aff, shape = GRIDS[grid]
    img = blob(aff, shape)
    # 'native': the finest input spacing (axis-aligned grids then map 1:1).
    vs = float(np.min(np.linalg.norm(aff[:3, :3], axis=0))) if voxsize == "native" else voxsize
    c = conform((img, aff), voxsize=vs)
    assert c.data.dtype == torch.float32
    back = c.to_native(c.data)
    assert back.shape == shape and back.dtype == np.float32
    inner = interior(shape)
    err = np.abs(back[inner] - img[inner]).mean() / (img.max() - img.min())
    assert err < 0.03, err

    lab = label_spheres(aff, shape)
    cl = conform((lab, aff), voxsize=vs, order=0)
    assert set(np.unique(cl.data.numpy())) <= set(LABELS)
    lab_back = cl.to_native(cl.data.numpy().astype(np.int16), order=0)
    assert lab_back.dtype == np.int16 and lab_back.shape == shape
    assert set(np.unique(lab_back)) <= set(LABELS)
    agree = np.mean(lab_back[inner] == lab[inner])
    assert agree > 0.95, agree


@pytest.mark.parametrize("orientation", ["LIA", "RAS", "LPS"])
@pytest.mark.parametrize("grid", ["oblique", "LIA"])
def test_conformed_grid_geometry(orientation, grid):
    aff, shape = GRIDS[grid]
    c = conform((blob(aff, shape), aff), voxsize=1.5, orientation=orientation, multiple=8)
    assert axcodes(c.affine) == orientation
    assert "".join(nib.aff2axcodes(c.affine)) == orientation
    np.testing.assert_allclose(c.voxsize, 1.5)
    assert all(n % 8 == 0 for n in c.shape)
    # Conformed axes are world-aligned, so its box is the min/max of its corners.
    outer = edge_corners(c.affine, c.shape)
    inner = edge_corners(aff, shape)
    assert np.all(inner.min(1) >= outer.min(1) - 1e-6)
    assert np.all(inner.max(1) <= outer.max(1) + 1e-6)
    np.testing.assert_allclose(centre(c.affine, c.shape), centre(aff, shape), atol=1e-9)
    assert c.native_shape == shape
    np.testing.assert_array_equal(c.native_affine, aff)


def test_conform_fixed_shape_and_4d():
    aff, shape = GRIDS["oblique"]
    img = blob(aff, shape)
    c = conform((np.stack([img, 2 * img], -1), aff), shape=(32, 40, 24), orientation="RAS")
    assert tuple(c.data.shape) == (2, 32, 40, 24)
    np.testing.assert_allclose(centre(c.affine, c.shape), centre(aff, shape), atol=1e-9)
    torch.testing.assert_close(c.data[1], 2 * c.data[0])
    back = c.to_native(c.data)  # torch in, numpy out, channel-first kept
    assert isinstance(back, np.ndarray) and back.shape == (2,) + shape
    # Volume input (loaded data layout) behaves the same.
    cv = conform(Volume(img, aff), shape=(32, 40, 24), orientation="RAS")
    torch.testing.assert_close(cv.data, c.data[0])
    with pytest.raises(ValueError):
        c.to_native(np.zeros((10, 10, 10)))
    with pytest.raises(ValueError):
        conform((img, aff), orientation="LRA")


@pytest.mark.parametrize("grid", ["oblique", "LPS"])
def test_bright_voxel_keeps_world_position(grid):
    aff, shape = GRIDS[grid]
    img = np.zeros(shape, np.float32)
    ijk = (7, 9, 4)
    img[ijk] = 100.0
    c = conform((img, aff), voxsize=1.0)
    peak = np.unravel_index(int(torch.argmax(c.data)), c.shape)
    peak_world = c.affine[:3, :3] @ np.array(peak) + c.affine[:3, 3]
    true_world = aff[:3, :3] @ np.array(ijk) + aff[:3, 3]
    assert np.all(np.abs(peak_world - true_world) <= 1.0 + 1e-6), (peak_world, true_world)


def test_resample_identity_fill_and_orientation_affine():
    rng = np.random.default_rng(4)
    aff = oblique_affine()
    lab = rng.choice(np.array(LABELS, np.uint16), size=(9, 8, 7))
    same = resample(lab, aff, aff, lab.shape, order=0)
    assert same.dtype == np.uint16
    np.testing.assert_array_equal(same, lab)
    img = rng.random((2, 9, 8, 7)).astype(np.float32)
    np.testing.assert_allclose(resample(img, aff, aff, (9, 8, 7)), img, atol=1e-5)
    # Shift the target by 3 voxels along axis 0: the last 3 slices are outside.
    shifted = aff.copy()
    shifted[:3, 3] += 3 * aff[:3, 0]
    out = resample(lab, aff, shifted, lab.shape, order=0, fill=41)
    np.testing.assert_array_equal(out[:-3], lab[3:])
    assert np.all(out[-3:] == 41)
    out_t = resample(torch.from_numpy(img), aff, shifted, (9, 8, 7), fill=-1.0)
    assert isinstance(out_t, torch.Tensor)
    np.testing.assert_allclose(out_t[:, :-3].numpy(), img[:, 3:], atol=1e-5)
    assert torch.all(out_t[:, -2:] == -1.0)

    a = orientation_affine("LIA", 2.0, (10, 12, 14), (1.0, 2.0, 3.0))
    assert axcodes(a) == "LIA"
    np.testing.assert_allclose(np.abs(a[:3, :3]).sum(0), 2.0)
    np.testing.assert_allclose(centre(a, (10, 12, 14)), [1.0, 2.0, 3.0])


@pytest.mark.parametrize("target", [(70, 9, 8), (1, 1, 40001), (33, 3, 400)])
def test_threaded_grid_sample_equals_a_single_batch_item(target, monkeypatch):
    """A 3D CPU sampling cut into one batch item per thread (ATen runs one
    thread per item) returns F.grid_sample's values exactly, and the same
    gradients (the field's up to summation order), for any target shape,
    including lengths that do not divide evenly."""
    import torch.nn.functional as F

    from synthtools import warp
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(warp, "_SPLIT_MIN_POINTS", 1000)
        gen = torch.Generator().manual_seed(0)
        field = torch.rand((1, 3, 9, 10, 11), generator=gen, requires_grad=True)
        norm = (torch.rand((1, *target, 3), generator=gen) * 2.4 - 1.2).requires_grad_(True)
        assert warp._batch_split(field, norm) == 2
        for padding in ("zeros", "border"):
            got = warp.grid_sample(field, norm, padding=padding)
            want = F.grid_sample(field, norm, padding_mode=padding, align_corners=True)
            assert got.shape == want.shape and torch.equal(got, want)
            weights = torch.rand(want.shape, generator=gen)
            g_got = torch.autograd.grad((got * weights).sum(), (field, norm))
            g_want = torch.autograd.grad((want * weights).sum(), (field, norm))
            torch.testing.assert_close(g_got[0], g_want[0])
            assert torch.equal(g_got[1], g_want[1])
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("n", [1, 2, 7, 100_003])
def test_upper_quantile_equals_torch_quantile(n):
    from synthtools.infer import upper_quantile
    x = torch.rand(n, generator=torch.Generator().manual_seed(n)) ** 3 * 1000
    for q in (0.9, 0.995, 1.0):
        torch.testing.assert_close(upper_quantile(x, q), torch.quantile(x, q), rtol=1e-6, atol=0)
