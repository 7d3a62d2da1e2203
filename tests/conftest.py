"""Shared fixtures: tiny skull-strip models and synthetic head images."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
import torch

from synthtools.nets.unet import UNet
from synthtools.weights import save_model

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


def oblique_affine(voxsize=(2.0, 2.0, 2.0), shape=(40, 44, 36), degrees=(12.0, -9.0, 7.0)) -> np.ndarray:
    """Rotated voxel->world affine whose grid centre is GRID_CENTER."""
    rot = np.eye(3)
    for axis, deg in enumerate(degrees):
        t = np.deg2rad(deg)
        c, s = np.cos(t), np.sin(t)
        i, j = [a for a in range(3) if a != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rot = r @ rot
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
