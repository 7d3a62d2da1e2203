"""FreeSurfer's SynthStrip (.pt) and SynthSeg 2.0 / robust 2.0 (Keras .h5)
weight files through our tools (issue 33), verified without the real files:

- the layout tables below list every tensor of the published architectures,
  written out by hand from ``mri_synthstrip`` (``StripModel``) and
  ``mri_synthseg`` (``unet``/``conv_enc``/``conv_dec``); files built from
  them load, anything else is refused with a one-line error naming the
  first missing / extra / mis-shaped tensor;
- numerical parity against Keras itself (``tests/keras_reference.py`` run
  with a TensorFlow Python: ``SYNTHTOOLS_TF_PYTHON``, or this one if it
  imports tensorflow; skipped with the reason otherwise) and, for the torch
  path, against a SynthStrip module written here from the published facts;
- the CLIs end to end with such files: native geometry, provenance,
  placeholders of pipeline wrappers, ``--check``.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import assert_same_geometry, strip_metadata, threshold_unet  # (tests/ is on sys.path)
from synthtools.cli import seg as seg_cli
from synthtools.cli import strip as strip_cli
from synthtools.freesurfer import (load_freesurfer_seg, load_freesurfer_strip, read_keras_h5, resolve_model_arg,
                                   synthseg_net_and_state)
from synthtools.freesurfer_seg import align_to_ras, pad_to, resample_1mm
from synthtools.freesurfer_strip import fit_shape, reorient, target_shape
from synthtools.nets.freesurfer import SYNTHSEG_LABELS, SynthStripNet, load_strict
from synthtools.weights import ModelError, save_model
from helpers import run_cli  # noqa: E402

h5py = pytest.importorskip("h5py", reason="h5py is the optional extra synthtools[freesurfer]")
HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.usefixtures("one_thread")

# ------------------------------------------------------------ layout tables --
# SynthStrip: (state-dict module, out channels, in channels); every conv is
# 3x3x3 with a bias. Features 16, 32, 64 x 5 (16 * 2**k clipped at 64);
# decoder inputs = previous output + the skip of that level.
SYNTHSTRIP_TABLE = """
encoder.0.0 16 1
encoder.0.1 16 16
encoder.1.0 32 16
encoder.1.1 32 32
encoder.2.0 64 32
encoder.2.1 64 64
encoder.3.0 64 64
encoder.3.1 64 64
encoder.4.0 64 64
encoder.4.1 64 64
encoder.5.0 64 64
encoder.5.1 64 64
decoder.0.0 64 64
decoder.0.1 64 64
decoder.1.0 64 128
decoder.1.1 64 64
decoder.2.0 64 128
decoder.2.1 64 64
decoder.3.0 64 128
decoder.3.1 64 64
decoder.4.0 64 128
decoder.4.1 64 64
decoder.5.0 32 96
decoder.5.1 32 32
remaining.0 16 48
remaining.1 16 16
remaining.2 1 16
"""

# SynthSeg U-Net of one network, Keras layer names without the prefix:
# convolutions (kernel, in, out) and batch norms (features). IN = input
# channels, OUT = labels, K = kernel size; features 24 * 2**level.
SYNTHSEG_UNET_TABLE = """
conv_downarm_0_0 K IN 24
conv_downarm_0_1 K 24 24
bn_down_0 24
conv_downarm_1_0 K 24 48
conv_downarm_1_1 K 48 48
bn_down_1 48
conv_downarm_2_0 K 48 96
conv_downarm_2_1 K 96 96
bn_down_2 96
conv_downarm_3_0 K 96 192
conv_downarm_3_1 K 192 192
bn_down_3 192
conv_downarm_4_0 K 192 384
conv_downarm_4_1 K 384 384
bn_down_4 384
conv_uparm_5_0 K 576 192
conv_uparm_5_1 K 192 192
bn_up_0 192
conv_uparm_6_0 K 288 96
conv_uparm_6_1 K 96 96
bn_up_1 96
conv_uparm_7_0 K 144 48
conv_uparm_7_1 K 48 48
bn_up_2 48
conv_uparm_8_0 K 72 24
conv_uparm_8_1 K 24 24
bn_up_3 24
likelihood 1 24 OUT
"""

# The robust denoiser l2l: 16 features, kernel 5, skips on the two coarsest
# decoder levels only (skip_n_concatenations=2), G label groups in and out.
L2L_TABLE = """
conv_downarm_0_0 5 G 16
conv_downarm_0_1 5 16 16
bn_down_0 16
conv_downarm_1_0 5 16 32
conv_downarm_1_1 5 32 32
bn_down_1 32
conv_downarm_2_0 5 32 64
conv_downarm_2_1 5 64 64
bn_down_2 64
conv_downarm_3_0 5 64 128
conv_downarm_3_1 5 128 128
bn_down_3 128
conv_downarm_4_0 5 128 256
conv_downarm_4_1 5 256 256
bn_down_4 256
conv_uparm_5_0 5 384 128
conv_uparm_5_1 5 128 128
bn_up_0 128
conv_uparm_6_0 5 192 64
conv_uparm_6_1 5 64 64
bn_up_1 64
conv_uparm_7_0 5 64 32
conv_uparm_7_1 5 32 32
bn_up_2 32
conv_uparm_8_0 5 32 16
conv_uparm_8_1 5 16 16
bn_up_3 16
likelihood 1 16 G
"""
GROUPS = 5   # SynthSeg tutorial 7's S1 groups; the real file's count is read from it


def strip_table() -> dict[str, tuple[int, ...]]:
    out = {}
    for row in SYNTHSTRIP_TABLE.strip().splitlines():
        name, cout, cin = row.split()
        out[f"{name}.conv.weight"] = (int(cout), int(cin), 3, 3, 3)
        out[f"{name}.conv.bias"] = (int(cout),)
    return out


def keras_table(table: str, prefix: str, **subs: int) -> dict[str, dict[str, tuple[int, ...]]]:
    """Keras layer name -> {variable: Keras shape} for one network."""
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for row in table.strip().splitlines():
        name, *nums = [subs.get(t, t) for t in row.split()]
        nums = [int(n) for n in nums]
        layer = f"{prefix}_{name}"
        if name.startswith("bn_"):
            f = nums[0]
            out[layer] = {v: (f,) for v in ("gamma", "beta", "moving_mean", "moving_variance")}
        else:
            k, cin, cout = nums
            out[layer] = {"kernel": (k, k, k, cin, cout), "bias": (cout,)}
    return out


def synthseg_tables(robust: bool) -> dict[str, dict[str, tuple[int, ...]]]:
    labels = len(SYNTHSEG_LABELS)
    if not robust:
        return keras_table(SYNTHSEG_UNET_TABLE, "unet", K=3, IN=1, OUT=labels)
    return {**keras_table(SYNTHSEG_UNET_TABLE, "unet", K=3, IN=1, OUT=GROUPS),
            **keras_table(L2L_TABLE, "l2l", G=GROUPS),
            **keras_table(SYNTHSEG_UNET_TABLE, "unet2", K=3, IN=1 + GROUPS, OUT=labels)}


def random_layers(table, seed=0) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = {}
    for layer, vars_ in table.items():
        out[layer] = {}
        for var, shape in vars_.items():
            if var == "kernel":
                a = rng.normal(0, 1.5 / np.sqrt(np.prod(shape[:-1])), shape)
            elif var in ("gamma", "moving_variance"):
                a = rng.uniform(0.5, 1.5, shape)
            else:
                a = rng.normal(0, 0.1, shape)
            out[layer][var] = a.astype(np.float32)
    return out


def write_keras2_h5(path: Path, layers, model_save: bool = False) -> Path:
    """An HDF5 file in Keras 2's layout (as FreeSurfer ships): ``layer_names``,
    one group per layer with ``weight_names``; ``model_save`` nests it in a
    ``model_weights`` group as ``model.save`` does."""
    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights") if model_save else f
        root.attrs["layer_names"] = np.array([n.encode() for n in layers])
        root.attrs["backend"] = b"tensorflow"
        for name, vars_ in layers.items():
            g = root.create_group(name)
            names = [f"{name}/{v}:0" for v in vars_]
            g.attrs["weight_names"] = np.array([n.encode() for n in names])
            for n, v in zip(names, vars_.values()):
                g.create_dataset(n, data=v)
    return path


def strip_checkpoint(path: Path, state: dict, **extra) -> Path:
    torch.save({"model_state_dict": state, "epoch": 1, **extra}, path)
    return path


def random_strip_state(seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in strip_table().items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        scale = 1.5 / np.sqrt(fan_in) if len(shape) > 1 else 0.05
        out[k] = torch.randn(shape, generator=g) * scale
    return out


@pytest.fixture(scope="module")
def strip_pt(tmp_path_factory) -> Path:
    return strip_checkpoint(tmp_path_factory.mktemp("fs") / "synthstrip.1.pt", random_strip_state())


@pytest.fixture(scope="module")
def seg_h5(tmp_path_factory) -> Path:
    return write_keras2_h5(tmp_path_factory.mktemp("fs") / "synthseg_2.0.h5", random_layers(synthseg_tables(False)))


# -------------------------------------------------------- 1. layout tables --

def test_synthstrip_layout_table_is_the_modules():
    net = SynthStripNet()
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert ours == strip_table()
    assert len(ours) == 54


@pytest.mark.parametrize("robust", [False, True], ids=["synthseg_2.0", "robust_2.0"])
def test_synthseg_layout_tables_load_through_the_keras_path(robust, tmp_path):
    path = write_keras2_h5(tmp_path / "w.h5", random_layers(synthseg_tables(robust)))
    net, state, is_robust = synthseg_net_and_state(path)
    assert is_robust == robust
    load_strict(net, state, "SynthSeg")
    want = sum(len(v) for v in synthseg_tables(robust).values())
    assert len(state) == want == (222 if robust else 74)
    if robust:
        assert net.unet.layers["likelihood"].out_channels == GROUPS
        assert net.unet2.layers["conv_downarm_0_0"].in_channels == 1 + GROUPS


def test_synthseg_label_list_is_the_shipped_models():
    from synthtools.training.generator.labels import SYNTHSEG_LABELS as OURS
    assert list(SYNTHSEG_LABELS) == sorted(OURS) and len(SYNTHSEG_LABELS) == 33


def test_keras_kernels_are_transposed_not_flipped(tmp_path):
    layers = random_layers(synthseg_tables(False))
    path = write_keras2_h5(tmp_path / "w.h5", layers, model_save=True)   # also: the model.save nesting
    net, state, _ = synthseg_net_and_state(path)
    k = layers["unet_conv_downarm_1_0"]["kernel"]                      # (3, 3, 3, 24, 48)
    w = state["unet.layers.conv_downarm_1_0.weight"].numpy()           # (48, 24, 3, 3, 3)
    assert w[7, 5, 0, 1, 2] == k[0, 1, 2, 5, 7]
    bn = layers["unet_bn_up_2"]
    assert np.array_equal(state["unet.layers.bn_up_2.running_var"].numpy(), bn["moving_variance"])
    assert np.array_equal(state["unet.layers.bn_up_2.weight"].numpy(), bn["gamma"])


@pytest.mark.parametrize("change, expect", [
    ("drop", "tensor 'encoder.3.1.conv.bias' is missing"),
    ("extra", "unexpected tensor 'head.weight'"),
    ("shape", "tensor 'decoder.5.0.conv.weight' has shape [32, 95, 3, 3, 3]"),
])
def test_strict_synthstrip_loading_names_the_first_problem(change, expect, tmp_path):
    state = random_strip_state()
    if change == "drop":
        del state["encoder.3.1.conv.bias"]
    elif change == "extra":
        state["head.weight"] = torch.zeros(1)
    else:
        state["decoder.5.0.conv.weight"] = torch.zeros(32, 95, 3, 3, 3)
    path = strip_checkpoint(tmp_path / "synthstrip.1.pt", state)
    with pytest.raises(ModelError) as exc:
        load_freesurfer_strip(path)
    msg = str(exc.value)
    assert expect in msg and "\n" not in msg


def test_strict_synthseg_loading_names_the_first_problem(tmp_path):
    layers = random_layers(synthseg_tables(False))
    layers["unet_bn_down_2"]["moving_mean"] = np.zeros(95, np.float32)
    with pytest.raises(ModelError, match=r"unet.layers.bn_down_2.running_mean' has shape \[95\]"):
        load_freesurfer_seg(write_keras2_h5(tmp_path / "a.h5", layers))
    layers = random_layers(synthseg_tables(False))
    del layers["unet_likelihood"]
    with pytest.raises(ModelError, match=r"unet.layers.likelihood.weight' is missing \(and 1 more\)"):
        load_freesurfer_seg(write_keras2_h5(tmp_path / "b.h5", layers))


def test_wrong_kinds_are_refused(tmp_path, strip_pt, seg_h5):
    with pytest.raises(ModelError, match="not a FreeSurfer SynthStrip checkpoint"):
        load_freesurfer_strip(seg_h5)
    with pytest.raises(ModelError, match="not a Keras HDF5 weight file"):
        load_freesurfer_seg(strip_pt)
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ModelError, match="no 'model_state_dict'"):
        load_freesurfer_strip(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ModelError, match="not a readable torch checkpoint"):
        load_freesurfer_strip(tmp_path / "junk.pt")
    qc = keras_table("conv_downarm_0_0 5 10 24", "qc")
    with pytest.raises(ModelError, match="networks found: qc"):
        load_freesurfer_seg(write_keras2_h5(tmp_path / "synthseg_qc_2.0.h5", random_layers(qc)))
    with h5py.File(tmp_path / "k3.weights.h5", "w") as f:   # Keras 3's layout: layers by class name
        f.create_group("vars")
        f.create_dataset("layers/conv3d/vars/0", data=np.zeros((3, 3, 3, 1, 24), np.float32))
    with pytest.raises(ModelError, match="Keras 3 '.weights.h5' layout"):
        read_keras_h5(tmp_path / "k3.weights.h5")


class NotData:
    """Stands for any Python object a pickle could carry (and run)."""


def test_checkpoint_with_numbers_loads_and_with_objects_is_refused(tmp_path):
    state = random_strip_state()
    strip_checkpoint(tmp_path / "a.pt", state, epoch=np.int64(7), loss=np.float64(0.25))
    assert load_freesurfer_strip(tmp_path / "a.pt").meta["freesurfer"]["kind"] == "synthstrip"
    strip_checkpoint(tmp_path / "b.pt", state, trainer=NotData())
    with pytest.raises(ModelError, match=r"holds Python objects besides tensors \(.*NotData\); refused"):
        load_freesurfer_strip(tmp_path / "b.pt")


# ------------------------------------------------ 2. numerical parity: torch --

class PublishedStrip(nn.Module):
    """SynthStrip as the published StripModel describes it, written
    independently of synthtools' module: flat lists of convolutions."""

    def __init__(self):
        super().__init__()
        rows = [r.split() for r in SYNTHSTRIP_TABLE.strip().splitlines()]
        self.encoder = nn.ModuleList(nn.ModuleList() for _ in range(6))
        self.decoder = nn.ModuleList(nn.ModuleList() for _ in range(6))
        self.remaining = nn.ModuleList()
        for name, cout, cin in rows:
            part, *idx = name.split(".")
            conv = nn.Module()
            conv.conv = nn.Conv3d(int(cin), int(cout), 3, 1, 1)
            target = getattr(self, part)
            (target[int(idx[0])] if len(idx) == 2 else target).append(conv)

    def forward(self, x):
        history = [x]
        for convs in self.encoder:
            for c in convs:
                x = F.leaky_relu(c.conv(x), 0.2)
            history.append(x)
            x = nn.MaxPool3d(2)(x)
        for convs in self.decoder:
            for c in convs:
                x = F.leaky_relu(c.conv(x), 0.2)
            x = torch.cat([nn.Upsample(scale_factor=2, mode="nearest")(x), history.pop()], 1)
        for i, c in enumerate(self.remaining):
            x = c.conv(x)
            x = F.leaky_relu(x, 0.2) if i < len(self.remaining) - 1 else x
        return x


def test_torch_parity_with_the_published_synthstrip(tmp_path):
    torch.manual_seed(0)
    ref = PublishedStrip().eval()
    for p in ref.parameters():
        p.data.mul_(3.0)   # keep activations O(1) through 27 layers
    path = strip_checkpoint(tmp_path / "synthstrip.1.pt", ref.state_dict(), optimizer_state_dict={})
    ours = load_freesurfer_strip(path)
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        a, b = ref(x), ours.net(x)
    diff = (a - b).abs().max().item()
    print(f"torch parity: max |diff| {diff:.2e} (output range {a.min():.3f}..{a.max():.3f})")
    assert a.std() > 1e-3 and diff <= 1e-5


# ------------------------------------------------ 2. numerical parity: Keras --

def tf_python() -> str | None:
    """A Python with TensorFlow: $SYNTHTOOLS_TF_PYTHON, or this one."""
    env = os.environ.get("SYNTHTOOLS_TF_PYTHON")
    if env:
        return env if shutil.which(env) or Path(env).is_file() else None
    try:
        import tensorflow  # noqa: F401
    except Exception:
        return None
    return sys.executable


@pytest.mark.parametrize("mode", ["seg", "robust"])
def test_keras_parity(mode, tmp_path):
    python = tf_python()
    if python is None:
        pytest.skip("TensorFlow not importable here and SYNTHTOOLS_TF_PYTHON not set "
                    "(a Python with tensorflow-cpu and tf-keras)")
    run = subprocess.run([python, str(HERE / "keras_reference.py"), str(tmp_path), mode, "keras2", "32"],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    net, state, robust = synthseg_net_and_state(tmp_path / "weights.h5")
    assert robust == (mode == "robust")
    load_strict(net, state, mode)
    net.eval()
    x = np.load(tmp_path / "input.npy")
    y = np.load(tmp_path / "output.npy")

    def ours(module, inp):   # channels-last numpy in and out, as Keras
        with torch.no_grad():
            return module(torch.from_numpy(inp).permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1).numpy()

    if mode == "seg":
        diffs = {"unet": float(np.abs(ours(net.unet, x) - y).max())}
    else:
        # Each network on the very input Keras gave it: the one-hot argmax between
        # stages turns float round-off at near-ties into different groups, so the
        # chain is compared by agreement and each network by its values.
        s1, s2 = np.load(tmp_path / "stage1.npy"), np.load(tmp_path / "stage2.npy")
        one_hot = (lambda p: np.eye(p.shape[-1], dtype=np.float32)[p.argmax(-1)])
        diffs = {"unet": float(np.abs(ours(net.unet, x) - s1).max()),
                 "l2l": float(np.abs(ours(net.l2l, one_hot(s1)) - s2).max()),
                 "unet2": float(np.abs(ours(net.unet2, np.concatenate([x, one_hot(s2)], -1)) - y).max())}
    chain = ours(lambda t: net(t, blur=False), x)
    agree = float((chain.argmax(-1) == y.argmax(-1)).mean())
    print(f"keras parity ({mode}, {y.shape[1]}^3 voxels, {y.shape[-1]} labels): max |diff| per network "
          + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
          + f"; whole chain max |diff| {np.abs(chain - y).max():.2e}, argmax agreement {agree:.6f}")
    assert max(diffs.values()) <= 1e-4
    assert agree >= (0.999 if mode == "seg" else 0.95)


def test_published_blur_is_a_normalised_3x3x3_gaussian():
    from synthtools.nets.freesurfer import published_blur
    p = torch.zeros(1, 2, 9, 9, 9)
    p[0, 0, 4, 4, 4] = 1.0
    p[0, 1] = 1.0
    b = published_blur(p)
    assert torch.isclose(b[0, 0].sum(), torch.tensor(1.0))
    assert (b[0, 0] > 0).sum() == 27                        # window of 3 voxels
    g = np.exp(-1 / (2 * 0.25))
    assert b[0, 0, 4, 4, 5] / b[0, 0, 4, 4, 4] == pytest.approx(g, rel=1e-5)
    assert b[0, 1, 4, 4, 4] == pytest.approx(1.0) and b[0, 1, 0, 0, 0] < 1.0   # zero padding at borders


# ------------------------------------------------------------ preprocessing --

def world_of(affine, ijk):
    return affine[:3, :3] @ np.asarray(ijk, float) + affine[:3, 3]


@pytest.mark.parametrize("func", ["reorient", "align"])
def test_axis_reorderings_are_exact_and_keep_world_positions(func):
    from conftest import oblique_affine
    rng = np.random.default_rng(1)
    data = rng.random((7, 9, 11)).astype(np.float32)
    aff = oblique_affine(voxsize=(1.0, 1.2, 0.9), shape=data.shape, degrees=(5, -4, 3))
    aff[:3, :3] = aff[:3, :3][:, [2, 0, 1]] * [1, -1, 1]        # scramble the axes
    out, new = reorient(data, aff, "LIA") if func == "reorient" else align_to_ras(data, aff)
    code = "".join(nib.aff2axcodes(new))
    assert code == ("LIA" if func == "reorient" else "RAS")
    for ijk in [(0, 0, 0), (6, 8, 10), (3, 1, 7)]:
        w = world_of(aff, ijk)
        new_ijk = np.rint(np.linalg.solve(new[:3, :3], w - new[:3, 3])).astype(int)
        assert out[tuple(new_ijk)] == data[ijk]


def test_synthstrip_conform_matches_surfa_voxel_for_voxel():
    """FreeSurfer's mri_synthstrip conforms with surfa; ours must give the same
    grid and values. (surfa 0.6.3 fails on numpy 2 when the axes need
    swapping, so the input is already in LIA axis order, rotated, anisotropic.)"""
    sf = pytest.importorskip("surfa")
    from synthtools.freesurfer_strip import resize_to_1mm
    rng = np.random.default_rng(0)
    data = np.zeros((30, 26, 34), np.float32)
    data[5:25, 4:20, 6:30] = rng.random((20, 16, 24)) + 0.5
    aff = np.array([[-1.5, 0, 0, 10], [0, 0, 0.8, -20], [0, -1.3, 0, 30], [0, 0, 0, 1.0]])
    th = np.deg2rad(4)
    aff[:3, :3] = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]]) @ aff[:3, :3]
    ref = sf.Volume(data, geometry=sf.ImageGeometry(shape=data.shape, vox2world=aff))
    ref = ref.conform(voxsize=1.0, dtype="float32", method="nearest", orientation="LIA")
    x, a = resize_to_1mm(*reorient(data, aff, "LIA"))
    assert x.shape == ref.shape and np.allclose(a, ref.geom.vox2world.matrix, atol=1e-9)
    assert np.array_equal(x, ref.data)
    shaped = ref.reshape((64, 40, 20))
    ours, ours_aff = fit_shape(x, a, (64, 40, 20))
    assert np.array_equal(ours, shaped.data) and np.allclose(ours_aff, shaped.geom.vox2world.matrix, atol=1e-9)


def test_fit_shape_follows_surfa_reshape_centering():
    data = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    out, aff = fit_shape(data, np.eye(4), (8, 4, 7))
    # pad 3 -> old voxel 0 at index trunc(1.5) = 1; crop 2 -> old voxel 1 at index 0
    assert out[1, 0, 0] == data[0, 1, 0] and out[0].sum() == 0 and out[6:].sum() == 0
    assert np.allclose(world_of(aff, (1, 0, 0)), world_of(np.eye(4), (0, 1, 0)))
    assert target_shape((100, 200, 400)) == (192, 256, 320)


def test_synthseg_resampling_values_follow_the_published_interpolation():
    """resample_volume of mri_synthseg, restated with scipy's RegularGridInterpolator:
    blur sigma 0.25/factor where the voxels shrink, linear samples at
    start + k/factor (start = -(factor-1)/(2 factor)) clipped to the image."""
    from scipy.interpolate import RegularGridInterpolator
    from scipy.ndimage import gaussian_filter
    aff = np.diag([0.7, 2.5, 1.3, 1.0])
    data = np.random.default_rng(2).random((23, 9, 14)).astype(np.float32)
    factor = np.array([0.7, 2.5, 1.3])
    sig = np.where(factor > 1, 0.0, 0.25 / factor)
    blurred = gaussian_filter(data, sig)
    axes = []
    for n, f in zip(data.shape, factor):
        start = -(f - 1) / (2 * f)
        axes.append(np.clip(start + np.arange(int(np.ceil(n * f))) / f, 0, n - 1))
    grid = np.meshgrid(*axes, indexing="ij")
    ref = RegularGridInterpolator([np.arange(n) for n in data.shape], blurred)(np.stack(grid, -1))
    ours, _ = resample_1mm(data, aff)
    assert ours.shape == ref.shape and np.abs(ours - ref).max() < 1e-5


def test_synthseg_resampling_grid_keeps_world_positions():
    aff = np.diag([0.5, 2.0, 1.0, 1.0])
    aff[:3, 3] = [10, -20, 5]
    data = np.random.default_rng(0).random((20, 6, 8)).astype(np.float32)
    out, new = resample_1mm(data, aff)
    assert out.shape == (10, 12, 8)
    assert np.allclose(np.sqrt((new[:3, :3] ** 2).sum(0)), 1.0)
    # the resampled grid spans the same field of view: voxel edges at the same place
    assert np.allclose(world_of(new, (-0.5, -0.5, -0.5)), world_of(aff, (-0.5, -0.5, -0.5)))
    padded, paff, inner = pad_to(out, new, (32, 32, 32))
    assert np.array_equal(padded[inner], out)
    assert np.allclose(world_of(paff, [s.start for s in inner]), world_of(new, (0, 0, 0)))


# ------------------------------------------------------------ CLI, end to end --


def test_synthstrip_with_a_freesurfer_checkpoint(strip_pt, head_path, tmp_path, capsys):
    code, out, err = run_cli(strip_cli, head_path, "-m", tmp_path / "m.nii.gz", "-d", tmp_path / "d.nii.gz",
                             "--model", strip_pt, capsys=capsys)
    assert code == 0, err
    assert f"model {strip_pt} on cpu" in out
    for name in ("m.nii.gz", "d.nii.gz"):
        assert_same_geometry(tmp_path / name, head_path)
    mask = np.asanyarray(nib.load(tmp_path / "m.nii.gz").dataobj)
    assert set(np.unique(mask)) <= {0, 1}
    model = load_freesurfer_strip(strip_pt)
    assert model.meta["provenance"] == "FreeSurfer weights" and model.meta["weights"] == "synthstrip.1.pt"
    assert model.meta["sha256"] == hashlib.sha256(strip_pt.read_bytes()).hexdigest()
    assert model.meta["source"] == str(strip_pt.resolve())


def test_synthseg_with_a_freesurfer_h5(seg_h5, head_path, tmp_path, capsys):
    code, out, err = run_cli(seg_cli, head_path, tmp_path / "s.nii.gz", "--vol", tmp_path / "v.csv",
                             "--qc", tmp_path / "q.csv", "--post", tmp_path / "p.nii.gz", "--model", seg_h5,
                             capsys=capsys)
    assert code == 0, err
    assert_same_geometry(tmp_path / "s.nii.gz", head_path)
    labels = np.asanyarray(nib.load(tmp_path / "s.nii.gz").dataobj)
    assert set(np.unique(labels)) <= set(SYNTHSEG_LABELS)
    post = np.asanyarray(nib.load(tmp_path / "p.nii.gz").dataobj)
    assert post.shape == labels.shape + (33,)
    assert np.allclose(post.sum(-1), 1.0, atol=1e-4)
    assert np.array_equal(np.asarray(SYNTHSEG_LABELS)[post.argmax(-1)], labels)
    header = (tmp_path / "v.csv").read_text().splitlines()[0].split(",")
    assert header[0] == "subject" and header[-1] == "Total-Intracranial" and len(header) == 34
    assert (tmp_path / "q.csv").read_text().count("\n") == 2


@pytest.mark.parametrize("value", ["<undefined>", "", "/nonexistent/freesurfer/models/synthstrip.1.pt"])
def test_placeholder_model_values_use_the_shipped_model(value, head_path, tmp_path, monkeypatch, capsys):
    models = tmp_path / "models"
    save_model(threshold_unet(), strip_metadata(), models / "synthstrip")   # stands in for the shipped model
    monkeypatch.setenv("SYNTHTOOLS_MODELS", str(models))
    code, out, err = run_cli(strip_cli, head_path, "-m", tmp_path / "m.nii.gz", "--model", value, capsys=capsys)
    assert code == 0, err
    assert "synthstrip: note:" in err and "using the shipped model" in err
    assert f"model {models / 'synthstrip'} on cpu" in out
    assert resolve_model_arg("x", "/opt/fs/models/my_own.pt") == "/opt/fs/models/my_own.pt"


def test_bad_freesurfer_file_is_one_line_and_writes_nothing(head_path, tmp_path, capsys):
    state = random_strip_state()
    state["remaining.2.conv.weight"] = torch.zeros(2, 16, 3, 3, 3)
    bad = strip_checkpoint(tmp_path / "synthstrip.1.pt", state)
    code, out, err = run_cli(strip_cli, head_path, "-m", tmp_path / "m.nii.gz", "--model", bad, capsys=capsys)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err   # a bad model file is bad input
    assert "remaining.2.conv.weight' has shape [2, 16, 3, 3, 3]" in err
    assert not (tmp_path / "m.nii.gz").exists()
    code, _, err = run_cli(seg_cli, head_path, tmp_path / "s.nii.gz", "--model", bad, capsys=capsys)
    assert code == 1 and "not a Keras HDF5 weight file" in err and err.count("\n") == 1


def test_check_prints_layout_and_checksum(strip_pt, tmp_path, capsys):
    code, out, err = run_cli(strip_cli, "--model", strip_pt, "--check", capsys=capsys)
    assert code == 0, err
    assert "layout: 54/54 tensors match the published SynthStrip layout" in out
    assert "output: brain mask of the bundled example (320, 320, 36): sha256 " in out
    again = run_cli(strip_cli, "--model", strip_pt, "--check", capsys=capsys)[1]
    assert again == out                                     # deterministic checksum
    state = random_strip_state()
    del state["decoder.2.1.conv.bias"]
    bad = strip_checkpoint(tmp_path / "bad.pt", state)
    code, out, _ = run_cli(strip_cli, "--model", bad, "--check", capsys=capsys)
    assert code == 1 and "53/54 tensors match" in out and "decoder.2.1.conv.bias' is missing" in out
