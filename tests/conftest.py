"""Shared fixtures: tiny skull-strip and segmentation models, synthetic head
images, and the bad-input matrix every command-line tool must reject."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
import torch

from synthtools.nets.unet import UNet
from synthtools.weights import save_model
from synthtools.training.generator.labels import SYNTHSEG_LABELS

# Head phantom, in mm from the head centre: brain ellipsoid radii, then a CSF
# gap and a skull shell around it (distinct radii so axis flips show).
BRAIN_RADII = np.array([24.0, 28.0, 20.0])
CSF_MM = 3.0
SKULL_MM = 5.0
GRID_CENTER = np.array([3.0, -5.0, 8.0])    # world mm of the image grid centre
HEAD_CENTER = GRID_CENTER + [6.0, -4.0, 5.0]  # off-centre, so flips show too
INTENSITY = {"background": 0.0, "brain": 100.0, "csf": 10.0, "skull": 30.0}


def strip_metadata() -> dict:
    """Skull-strip model metadata, as the recipe writes it, at 4 mm for speed."""
    return {
        "task": "skullstrip",
        "input": {"voxsize": 4.0, "orientation": "LIA", "multiple": 2,
                  "normalization": "min to 0, 99.5th percentile to 1, clipped"},
        "output": {"type": "signed_distance_mm", "band_mm": 5.0, "sign": "negative inside", "csf": True},
        "inference": {"bf16": False},
    }


def tiny_unet() -> UNet:
    return UNet(3, 1, 1, features=(4, 8), convs=1)


def threshold_unet() -> UNet:
    """A hand-set tiny UNet computing sdt = 5 - 10 * box3(intensity): negative
    (inside) where the normalised intensity is above 0.5, so on the phantom
    the brain is inside, CSF and skull outside (skull at about +2 mm)."""
    net = tiny_unet()
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.down[0][0].weight[0, 0, 1, 1, 1] = 1.0          # channel 0 copies the input
        net.up[0][0].weight[0, 8, :, :, :] = 1.0 / 27.0     # box filter of that skip channel
        net.head.weight[0, 0] = -10.0
        net.head.bias[0] = 5.0
    return net


def random_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return tiny_unet()


@pytest.fixture(scope="session")
def tiny_strip_model(tmp_path_factory) -> Path:
    """Folder of a deterministic tiny skull-strip model whose mask is the
    bright (brain) part of the phantom."""
    return save_model(threshold_unet(), strip_metadata(), tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def random_strip_model(tmp_path_factory) -> Path:
    """Folder of a seeded random tiny skull-strip model (mask may be junk)."""
    return save_model(random_unet(), strip_metadata(), tmp_path_factory.mktemp("models") / "random")


def seg_metadata() -> dict:
    """Segmentation model metadata, as the recipe writes it, at 4 mm for speed."""
    from synthtools.seg.lut import names_for
    return {
        "task": "segment",
        "input": {"voxsize": 4.0, "orientation": "LIA", "multiple": 2,
                  "normalization": "min to 0, 99.5th percentile to 1, clipped"},
        "output": {"type": "softmax", "labels": list(SYNTHSEG_LABELS), "names": names_for(SYNTHSEG_LABELS)},
        "inference": {"bf16": False},
    }


# Label value -> centre of its normalised-intensity band for the hand-set
# model. On the phantom (normalised: background 0, CSF ~0.1, skull ~0.3,
# brain ~0.95) the big tissues get 0/24/3/2 and partial-volume edges the rest.
SEG_BANDS = {0: 0.0, 24: 0.1, 16: 0.2, 3: 0.3, 42: 0.45, 4: 0.6, 43: 0.75, 2: 0.95}
SEG_SHARPNESS = 1000.0


def band_seg_unet() -> UNet:
    """A hand-set tiny 33-output UNet labelling by intensity band: the logit
    of label j is k * (2 c_j u - c_j^2) = k * u^2 - k * (u - c_j)^2 for the
    normalised intensity u, so the softmax picks the nearest band centre c_j
    (SEG_BANDS); labels without a band get a logit of -30 (never chosen).
    It depends on intensity only: left-right symmetric by construction."""
    net = UNet(3, 1, len(SYNTHSEG_LABELS), features=(4, 8), convs=1)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.down[0][0].weight[0, 0, 1, 1, 1] = 1.0     # channel 0 copies the input
        net.up[0][0].weight[0, 8, 1, 1, 1] = 1.0       # ... through the skip connection
        net.head.bias[:] = -30.0
        for j, v in enumerate(SYNTHSEG_LABELS):
            if v in SEG_BANDS:
                c = SEG_BANDS[v]
                net.head.weight[j, 0] = 2 * SEG_SHARPNESS * c
                net.head.bias[j] = -SEG_SHARPNESS * c * c
    return net


def random_seg_unet(seed: int = 0) -> UNet:
    """A seeded random tiny 33-output UNet: not left-right symmetric. Head
    scaled up so the posteriors are not all near 1/33."""
    torch.manual_seed(seed)
    net = UNet(3, 1, len(SYNTHSEG_LABELS), features=(4, 8), convs=1)
    with torch.no_grad():
        net.head.weight *= 100.0
    return net


@pytest.fixture(scope="session")
def tiny_seg_model(tmp_path_factory) -> Path:
    """Folder of the deterministic intensity-band segmentation model."""
    # float32 weights: float16 would blur the band edges of the large logits.
    return save_model(band_seg_unet(), seg_metadata(), tmp_path_factory.mktemp("models") / "seg",
                      dtype=torch.float32)


@pytest.fixture(scope="session")
def random_seg_model(tmp_path_factory) -> Path:
    """Folder of a seeded random (asymmetric) segmentation model."""
    return save_model(random_seg_unet(), seg_metadata(), tmp_path_factory.mktemp("models") / "seg_random")


def rotation(degrees) -> np.ndarray:
    """3x3 rotation: successive rotations about axes 0, 1, 2 (degrees)."""
    rot = np.eye(3)
    for axis, deg in enumerate(degrees):
        t = np.deg2rad(deg)
        cos, sin = np.cos(t), np.sin(t)
        i, j = [a for a in range(3) if a != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = cos, -sin, sin, cos
        rot = r @ rot
    return rot


def oblique_affine(voxsize=(2.0, 2.0, 2.0), shape=(40, 44, 36), degrees=(12.0, -9.0, 7.0)) -> np.ndarray:
    """Rotated voxel->world affine whose grid centre is GRID_CENTER."""
    rot = rotation(degrees)
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(voxsize)
    aff[:3, 3] = GRID_CENTER - aff[:3, :3] @ ((np.array(shape) - 1) / 2)
    return aff


def head_phantom(affine: np.ndarray, shape, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Intensity image (float) and brain mask (bool) of the phantom on a grid."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    world = idx @ affine[:3, :3].T + affine[:3, 3] - HEAD_CENTER
    # Ellipsoidal "radius" in brain units, and the same scaled for the shells.
    r = np.sqrt(np.sum((world / BRAIN_RADII) ** 2, -1))
    scale = BRAIN_RADII.min()
    brain = r <= 1
    csf = ~brain & (r <= 1 + CSF_MM / scale)
    skull = ~brain & ~csf & (r <= 1 + (CSF_MM + SKULL_MM) / scale)
    img = np.full(shape, INTENSITY["background"])
    img[brain], img[csf], img[skull] = INTENSITY["brain"], INTENSITY["csf"], INTENSITY["skull"]
    img += np.random.default_rng(seed).normal(0, 2.0, shape)
    return np.clip(img, 0, None), brain


@pytest.fixture
def make_head(tmp_path) -> Callable[..., Path]:
    """Factory writing a phantom head image; returns its path.

    ``make_head(name, shape=, voxsize=, dtype=, frames=, qcode=, scode=)``;
    4D images repeat the phantom with a different noise draw per frame.
    """
    def make(name: str = "head.nii.gz", shape=(40, 44, 36), voxsize=(2.0, 2.0, 2.0),
             dtype=np.uint16, frames: int | None = None, qcode: int = 1, scode: int = 2,
             folder: Path | None = None) -> Path:
        affine = oblique_affine(voxsize, shape)
        if frames is None:
            data = head_phantom(affine, shape)[0]
        else:
            data = np.stack([head_phantom(affine, shape, seed=t)[0] for t in range(frames)], -1)
        data = data.astype(dtype)
        img = nib.Nifti1Image(data, affine)
        img.set_qform(affine, code=qcode)
        img.set_sform(affine, code=scode)
        img.header.set_xyzt_units("mm", "sec")
        path = (folder or tmp_path) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, path)
        return path

    return make


@pytest.fixture
def head_path(make_head) -> Path:
    """A 40x44x36, 2 mm, oblique uint16 phantom head."""
    return make_head()


# --------------------------------------------- bad inputs, for every tool --

def write_image(path: Path, arr: np.ndarray, affine=None) -> Path:
    nib.save(nib.Nifti1Image(arr, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine), str(path))
    return path


def write_text(path: Path, text: str = "hello\n") -> Path:
    path.write_text(text)
    return path


def copy_to(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)
    return dst


def nan_image() -> np.ndarray:
    arr = np.random.rand(20, 20, 20).astype(np.float32)
    arr[3, 4, 5] = np.nan
    return arr


# Cases every tool ('<tool> IN OUT', '-i', '-o', '--snapshot', '-t', '--model')
# rejects with one error line and no output. Each: (setup(tmp, head, model)
# -> argv, expected exit code, text in the error). Exit codes: 1 for a bad
# input file (image, list, model), 2 for a bad command line.
BAD_INPUT_CASES = {
    "missing input": (lambda t, h, m: [t / "nope.nii.gz", t / "out" / "s.nii.gz"], 1, "file not found"),
    "not an image": (lambda t, h, m: [write_text(t / "x.nii.gz"), t / "out" / "s.nii.gz"], 1, "not a readable"),
    "input extension": (lambda t, h, m: [write_text(t / "x.txt.png"), t / "out" / "s.nii.gz"], 1, "unsupported"),
    "2D image": (lambda t, h, m: [write_image(t / "flat.nii.gz", np.ones((20, 20, 1), np.float32)),
                                  t / "out" / "s.nii.gz"], 1, "2D"),
    "NaNs": (lambda t, h, m: [write_image(t / "nan.nii.gz", nan_image()), t / "out" / "s.nii.gz"], 1, "NaN"),
    "empty image": (lambda t, h, m: [write_image(t / "zero.nii.gz", np.zeros((20, 20, 20), np.float32)),
                                     t / "out" / "s.nii.gz"], 1, "empty"),
    "absurd voxel size": (lambda t, h, m: [write_image(t / "big.nii.gz",
                                                       np.random.rand(20, 20, 20).astype(np.float32),
                                                       np.diag([100.0, 100.0, 100.0, 1.0])),
                                           t / "out" / "s.nii.gz"], 1, "voxel size"),
    "output extension": (lambda t, h, m: [h, t / "out" / "s.png"], 2, "extension"),
    "missing output folder": (lambda t, h, m: [h, t / "missing" / "s.nii.gz"], 2, "does not exist"),
    "input is output": (lambda t, h, m: [h, h], 2, "overwrite an input"),
    "no output": (lambda t, h, m: ["-i", h], 2, "no output"),
    "same input twice": (lambda t, h, m: ["-i", h, h, "-o", t / "out"], 2, "more than once"),
    "same stem twice": (lambda t, h, m: ["-i", h, copy_to(h, t / "b" / h.name), "-o", t / "out"], 2,
                        "both write"),
    "many inputs, file output": (lambda t, h, m: ["-i", h, h, "-o", t / "out" / "s.nii.gz"], 2, "folder"),
    "folder is a file": (lambda t, h, m: ["-i", h, "-o", f"{write_text(t / 'afile')}/"], 2, "not a folder"),
    "empty list": (lambda t, h, m: ["-i", write_text(t / "list.txt", "\n# none\n"), "-o", t / "out/"], 1,
                   "empty"),
    "snapshot extension": (lambda t, h, m: [h, t / "out" / "s.nii.gz", "--snapshot", t / "out" / "x.jpg"], 2,
                           ".png"),
    "threads": (lambda t, h, m: [h, t / "out" / "s.nii.gz", "-t", "0"], 2, "threads"),
    "unknown option": (lambda t, h, m: [h, t / "out" / "s.nii.gz", "--frobnicate"], 2, "unrecognized"),
    "too many positionals": (lambda t, h, m: [h, h, t / "out" / "s.nii.gz"], 2, "positional"),
    "missing model": (lambda t, h, m: [h, t / "out" / "s.nii.gz", "--model", t / "no_model"], 1,
                      "no such model"),
}


def is_bookkeeping(name: str) -> bool:
    """A resumable batch's hidden files: done-markers (``.<output>.done.json``)
    and a shared table's lock (``.<table>.lock``)."""
    return name.startswith(".") and name.endswith((".done.json", ".lock"))


def files_under(root: Path) -> set[str]:
    """Relative paths of the files below ``root`` (batch bookkeeping aside)."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not is_bookkeeping(p.name)}


def assert_same_geometry(out: Path, ref: Path, spatial_only: bool = False) -> None:
    """Same grid and NIfTI geometry fields (qform/sform and codes) as ``ref``;
    ``spatial_only``: compare the first three dimensions only (4D outputs)."""
    a, b = nib.load(str(out)), nib.load(str(ref))
    assert (a.shape[:3] if spatial_only else a.shape) == b.shape
    qa, qca = a.header.get_qform(coded=True)
    qb, qcb = b.header.get_qform(coded=True)
    sa, sca = a.header.get_sform(coded=True)
    sb, scb = b.header.get_sform(coded=True)
    assert (int(qca), int(sca)) == (int(qcb), int(scb))
    assert np.array_equal(qa, qb) and np.array_equal(sa, sb)
    for key in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "srow_x", "srow_y", "srow_z", "xyzt_units"):
        assert np.array_equal(a.header[key], b.header[key]), key
    pixdim = slice(1, 4) if spatial_only else slice(None)
    assert np.array_equal(a.header["pixdim"][pixdim], b.header["pixdim"][pixdim])


@pytest.fixture(scope="module")
def one_thread():
    """CLIs set torch's global thread count (-t); keep tests on one thread
    and restore what the session had."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------ training label maps

def write_label_map(path, shape=(48, 48, 48), voxsize: float = 4.0):
    """A head-like map: background, scalp (502), CSF (24), cortex (3/42), WM (2/41)."""
    g = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = np.sqrt(sum(x ** 2 for x in g))
    lab = np.zeros(shape, np.int32)
    lab[r < 0.95] = 502
    lab[r < 0.8] = 24
    lab[r < 0.7] = 3
    lab[r < 0.5] = 2
    right = g[0] > 0
    lab[(lab == 3) & right] = 42
    lab[(lab == 2) & right] = 41
    nib.save(nib.Nifti1Image(lab, np.diag([voxsize, voxsize, voxsize, 1.0])), str(path))
    return path


@pytest.fixture
def label_dir(tmp_path):
    d = tmp_path / "maps"
    d.mkdir()
    write_label_map(d / "a.nii.gz")
    return d
