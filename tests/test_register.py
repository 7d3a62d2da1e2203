"""Registration: closed-form barycentre fits (exact recovery, rigid
orthogonality, symmetry), SVF integration (positive Jacobian), hand-set
networks (identity and translation), tiny trainings of the rigid, affine and
deform recipes whose exports ``synthmorph register`` runs end to end, -H,
and the Lesjak reference convention (skipped without ../shared/data)."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from synthtools.io import Volume, load_volume
from synthtools.morph import Affine, Warp, as_geometry, read_transform, update_header
from synthtools.morph.refine import PATCHES
from synthtools.morph.register import register_deform, register_linear
from synthtools.nets.registration import (BarycenterAffine, SVFNet, barycenters, fit_affine, fit_rigid,
                                          fit_symmetric_affine)
from synthtools.warp import centered_vox2mm, identity_grid, integrate_svf, jacobian_determinant, warp_image
from synthtools.weights import Model, load_model

from conftest import rotation, write_label_map  # noqa: E402  (tests/ is on sys.path)
from helpers import affine_of, one_error_line, synthmorph, tiny_reg_cfg  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def known_affine(seed=0, rigid=False) -> torch.Tensor:
    """A pull-back with rotation up to 20 degrees, scaling/shear, translation."""
    rng = np.random.default_rng(seed)
    m = np.eye(4)
    lin = rotation(rng.uniform(-20, 20, 3))
    if not rigid:
        lin = lin @ np.diag(rng.uniform(0.85, 1.15, 3)) @ (np.eye(3) + np.triu(rng.uniform(-0.1, 0.1, (3, 3)), 1))
    m[:3, :3] = lin
    m[:3, 3] = rng.uniform(-5, 5, 3)
    return torch.tensor(m)


# ---------------------------------------------------------------- closed-form fits

def test_point_fits_recover_known_transforms_exactly():
    torch.manual_seed(0)
    src = torch.randn(2, 10, 3, dtype=torch.float64) * 30
    w = torch.rand(2, 10, dtype=torch.float64)
    a = torch.stack([known_affine(1), known_affine(2)])
    dst = src @ a[:, :3, :3].transpose(1, 2) + a[:, None, :3, 3]
    assert torch.allclose(fit_affine(src, dst, w), a, atol=1e-4)
    assert torch.allclose(fit_symmetric_affine(src, dst, w), a, atol=1e-10)
    r = torch.stack([known_affine(3, rigid=True), known_affine(4, rigid=True)])
    dst = src @ r[:, :3, :3].transpose(1, 2) + r[:, None, :3, 3]
    assert torch.allclose(fit_rigid(src, dst, w), r, atol=1e-10)


def gaussian_maps(centres: torch.Tensor, shape, vox2mm: torch.Tensor, pull: torch.Tensor, sigma=3.0):
    """Feature maps (1, K, *shape): Gaussian blobs at ``centres`` (mm) seen
    through the pull-back ``pull`` (grid mm -> blob frame mm)."""
    idx = identity_grid(shape, dtype=torch.float64)[0]
    mm = idx @ vox2mm[:3, :3].T + vox2mm[:3, 3]
    p = mm @ pull[:3, :3].T + pull[:3, 3]
    d2 = ((p[..., None, :] - centres) ** 2).sum(-1)               # (*S, K)
    return torch.exp(-d2 / (2 * sigma ** 2)).movedim(-1, 0)[None]


def test_barycentre_fit_recovers_affine_from_blob_feature_maps():
    """Blobs moved by a known affine: the fit returns it, even with the
    moving maps on another grid (shape and voxel size)."""
    rng = np.random.default_rng(5)
    centres = torch.tensor(rng.uniform(-10, 10, (8, 3)))
    a = known_affine(6)
    fixed_v2m = centered_vox2mm((32, 32, 32), 2.0, torch.float64)
    moving_v2m = centered_vox2mm((40, 36, 42), 1.8, torch.float64)
    # Fixed blob k sits at c_k; the moving one at A c_k (its density pulled back by inv(A)).
    feat_f = gaussian_maps(centres, (32, 32, 32), fixed_v2m, torch.eye(4, dtype=torch.float64))
    feat_m = gaussian_maps(centres, (36, 30, 34), moving_v2m, torch.linalg.inv(a))
    cf, mf = barycenters(feat_f, fixed_v2m[None])
    cm, mm = barycenters(feat_m, moving_v2m[None])
    assert torch.allclose(cf[0], centres, atol=1e-6)
    assert torch.allclose(mm / mf, torch.linalg.det(a[:3, :3]).expand(1, 8), rtol=1e-5)  # mass scales with det
    for kind in ("affine", "symmetric"):
        net = BarycenterAffine(keypoints=8, features=(4, 8), convs=1, symmetric=kind == "symmetric")
        est = net.fit(feat_f, feat_m, fixed_v2m[None], moving_v2m[None])[0]
        assert torch.allclose(est, a, atol=1e-5), kind


def test_rigid_fit_is_a_rotation_and_symmetric_fit_inverts_exactly():
    torch.manual_seed(1)
    src = torch.randn(3, 12, 3, dtype=torch.float64) * 20
    dst = src.clone()
    dst[..., 0] = -dst[..., 0]                                    # a reflection: no rotation fits exactly
    dst = dst + torch.randn_like(dst) * 3
    w = torch.rand(3, 12, dtype=torch.float64)
    r = fit_rigid(src, dst, w)
    rot = r[:, :3, :3]
    assert torch.allclose(rot @ rot.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(3, 3, 3), atol=1e-10)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(3, dtype=torch.float64))
    eye = torch.eye(4, dtype=torch.float64).expand(3, 4, 4)
    assert torch.allclose(r @ fit_rigid(dst, src, w), eye, atol=1e-10)
    # Noisy correspondences: forward = inverse of backward, to rounding.
    assert torch.allclose(fit_symmetric_affine(src, dst, w) @ fit_symmetric_affine(dst, src, w), eye, atol=1e-10)


@pytest.mark.parametrize("rigid", [False, True])
def test_network_is_symmetric_for_random_weights(rigid):
    torch.manual_seed(2)
    net = BarycenterAffine(keypoints=8, features=(4, 8), convs=1, rigid=rigid).eval()
    fixed, moving = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 12, 16, 20)
    vf, vm = centered_vox2mm((16, 16, 16), 3.0), centered_vox2mm((12, 16, 20), 2.5)
    with torch.no_grad():
        fwd = net(fixed, moving, vf, vm)[0].double()
        bwd = net(moving, fixed, vm, vf)[0].double()
    assert torch.allclose(fwd @ bwd, torch.eye(4, dtype=torch.float64), atol=1e-4)
    if rigid:
        assert torch.allclose(torch.linalg.det(fwd[:3, :3]), torch.tensor(1.0, dtype=torch.float64), atol=1e-5)


# ---------------------------------------------------------------- SVF

def test_svf_network_integrates_to_a_diffeomorphism():
    torch.manual_seed(3)
    net = SVFNet(features=(4, 8), convs=1, steps=7).eval()
    with torch.no_grad():
        net.head.weight.normal_(0, 0.2)                           # strong random fields, not the near-zero init
        x = torch.rand(2, 1, 16, 16, 16)
        vel = net(x[:1], x[1:], torch.tensor([0.3]))
        disp = net.displacement(vel)
        # A smooth velocity (what training produces), for the inverse check.
        coarse = torch.randn(1, 3, 4, 4, 4, generator=torch.Generator().manual_seed(3))
        smooth = 0.6 * torch.nn.functional.interpolate(coarse, size=(16, 16, 16), mode="trilinear",
                                                       align_corners=True)
        fwd, back = net.displacement(smooth), net.displacement(smooth, inverse=True)
    assert float(disp.abs().max()) > 1.0                          # voxels: a real deformation
    coords = identity_grid((16, 16, 16))[0] + disp[0].movedim(0, -1)
    assert float(jacobian_determinant(coords).min()) > 0
    # exp(-v) inverts exp(v): u(x) + u_inv(x + u(x)) ~ 0 (to the interpolation error of
    # scaling and squaring, largest where the field is steep).
    comp = fwd + warp_image(back, fwd, padding="border")
    assert float(fwd.abs().max()) > 1.0
    assert float(comp.abs().mean()) < 0.02 and float(comp[..., 3:-3, 3:-3, 3:-3].abs().max()) < 0.3
    # lambda changes the output through FiLM once the FiLM layers are trained.
    with torch.no_grad():
        for film in net.film:
            film.out.weight.normal_(0, 0.5)
        assert not torch.allclose(net(x[:1], x[1:], 0.0), net(x[:1], x[1:], 1.0))


def test_generator_uses_the_same_warp_helpers():
    from synthtools.training.generator import spatial
    assert spatial.integrate_svf is integrate_svf and spatial.jacobian_determinant is jacobian_determinant


# ---------------------------------------------------------------- hand-set networks

THRESHOLDS = (0.05, 0.2, 0.35, 0.5, 0.65, 0.8)


def window_net(rigid=False) -> BarycenterAffine:
    """Feature k = ReLU(intensity - t_k): nested bright regions, so the
    barycentres move exactly with the image content."""
    net = BarycenterAffine(keypoints=len(THRESHOLDS), features=(4, 8), convs=1, rigid=rigid)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.unet.down[0][0].weight[0, 0, 1, 1, 1] = 1.0          # channel 0 copies the input
        net.unet.up[0][0].weight[0, 8, 1, 1, 1] = 1.0            # ... through the skip connection
        net.unet.head.weight[:, 0] = 1.0
        net.unet.head.bias[:] = -torch.tensor(THRESHOLDS)
    return net.eval()


def reg_meta(kind: str, voxsize=4.0) -> dict:
    return {"task": "register", "input": {"voxsize": voxsize, "orientation": "LIA", "multiple": 2},
            "output": {"type": kind}, "inference": {"bf16": False}}


def blobs_image(affine, shape) -> np.ndarray:
    """Four blobs of distinct intensity at non-coplanar world positions."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    w = idx @ affine[:3, :3].T + affine[:3, 3]
    img = np.zeros(shape, np.float32)
    for value, centre in ((30, (-12, 0, 0)), (55, (10, 8, -4)), (80, (2, -12, 8)), (100, (4, 6, 14))):
        img += value * np.exp(-np.sum((w - centre) ** 2, -1) / (2 * 6.0 ** 2))
    return img


GRID = affine_of(rotation((6, -4, 9)) * 2.0, (1.0, -2.0, 3.0), (30, 32, 28))


@pytest.mark.parametrize("kind", ["affine", "rigid"])
def test_handset_network_finds_identity_and_header_translation(kind):
    model = Model(window_net(rigid=kind == "rigid"), reg_meta(kind), Path("."))
    fixed = Volume(blobs_image(GRID, (30, 32, 28)), GRID)
    t = register_linear(model, fixed, fixed)
    assert np.allclose(t.matrix, np.eye(4), atol=1e-4)
    # Same voxels, header shifted by d: the pull-back fixed -> moving is that shift.
    shift = np.eye(4)
    shift[:3, 3] = (7.0, -5.0, 3.0)
    moving = Volume(fixed.data, shift @ GRID)
    t = register_linear(model, moving, fixed)
    assert np.allclose(t.matrix, shift, atol=1e-3)
    # -i: an initial transform is composed with the network's answer.
    t = register_linear(model, fixed, fixed, init=Affine(shift))
    assert np.allclose(t.matrix, np.eye(4), atol=1e-3)


def test_second_pass_refines_a_rotation_and_composes_with_init():
    """A header rotation of 25 degrees: the one-pass answer is approximate
    (blobs leave the coarse grid's support differently); the second pass,
    run on the re-posed moving image, is closer. Passes compose with -i."""
    model = Model(window_net(rigid=True), reg_meta("rigid"), Path("."))
    fixed = Volume(blobs_image(GRID, (30, 32, 28)), GRID)
    turn = np.eye(4)
    turn[:3, :3] = rotation((25, -10, 15))
    turn[:3, 3] = (4.0, -3.0, 2.0)
    moving = Volume(fixed.data, turn @ GRID)

    def err(t):   # max corner error (mm) over a 40 mm cube
        pts = np.array(np.meshgrid(*[[-20.0, 20.0]] * 3)).reshape(3, -1)
        return float(np.abs(t.matrix[:3, :3] @ pts - turn[:3, :3] @ pts + (t.matrix - turn)[:3, 3:]).max())

    one, two = register_linear(model, moving, fixed, passes=1), register_linear(model, moving, fixed, passes=2)
    assert err(two) < 0.5 * err(one)
    model.meta["inference"]["passes"] = 2   # the model's default
    assert np.allclose(register_linear(model, moving, fixed).matrix, two.matrix)
    # Both passes composed after an initial transform.
    init = register_linear(model, moving, fixed, passes=1)
    assert np.allclose(register_linear(model, moving, fixed, init=init, passes=1).matrix, two.matrix, atol=1e-6)
    with pytest.raises(ValueError):
        register_linear(model, moving, fixed, passes=0)
    # Refinement on the feature maps polishes the barycentre answer further
    # and keeps it rigid.
    polished = register_linear(model, moving, fixed, passes=2, refine=(30, 20))
    lncc = register_linear(model, moving, fixed, passes=2, refine=(30, 20, 20), refine_metric="lncc")
    assert err(lncc) < 0.5 * err(two)
    assert err(polished) < 0.5 * err(two)
    lin = polished.matrix[:3, :3]
    assert np.allclose(lin @ lin.T, np.eye(3), atol=1e-5)


def test_zero_velocity_network_gives_identity_warp():
    net = SVFNet(features=(4, 8), convs=1).eval()
    with torch.no_grad():
        net.head.weight.zero_()
    model = Model(net, reg_meta("svf"), Path("."))
    fixed = Volume(blobs_image(GRID, (30, 32, 28)), GRID)
    reg = register_deform(model, fixed, fixed, inverse=True)
    assert isinstance(reg.transform, Warp) and reg.transform.grid.same_grid(as_geometry(fixed))
    assert float(np.abs(reg.transform.disp).max()) < 1e-4
    assert float(np.abs(reg.inverse.disp).max()) < 1e-4


def test_deform_result_is_the_composition_of_affine_and_network_warp():
    """The native-grid warp (and its inverse) equal transforms.compose of
    the prior affine and the network's conformed-grid field."""
    from synthtools.conform import resample
    from synthtools.infer import normalize_intensities
    from synthtools.morph import Geometry, compose, invert
    from synthtools.space import ModelSpace
    torch.manual_seed(0)
    net = SVFNet(features=(4, 8), convs=1).eval()
    with torch.no_grad():
        net.head.weight.normal_(0, 0.3)
    model = Model(net, reg_meta("svf"), Path("."))
    fixed = Volume(head(FIXED_AFF, (32, 34, 30)), FIXED_AFF)
    moving = Volume(head(MOVING_AFF, (36, 30, 24)), MOVING_AFF)
    m = known_affine(3).numpy()
    reg = register_deform(model, moving, fixed, Affine(m), 0.4, inverse=True)
    cf = ModelSpace.of(model).conform(fixed.data, fixed.affine)
    mov = resample(moving.data, np.linalg.inv(m) @ moving.affine, cf.affine, cf.shape)
    with torch.no_grad():
        v = net(normalize_intensities(torch.from_numpy(mov))[None, None], normalize_intensities(cf.data)[None, None],
                torch.tensor([0.4]))
        fwd, back = (net.displacement(v, inverse=i)[0].numpy().transpose(1, 2, 3, 0) @ cf.affine[:3, :3].T
                     for i in (False, True))
    g = Geometry(cf.shape, cf.affine)
    ref = compose(Affine(m), Warp(fwd, g), grid=as_geometry(fixed))
    ref_inv = compose(Warp(back, g), invert(Affine(m)), grid=as_geometry(moving))
    assert np.abs(reg.transform.disp).max() > 5
    assert np.allclose(reg.transform.disp, ref.disp, atol=1e-3)
    assert np.allclose(reg.inverse.disp, ref_inv.disp, atol=1e-3)


def test_svf_network_keeps_its_activation_scale():
    # With PyTorch's default init the decoder output was ~10x smaller than the
    # input (no normalisation layers), which stalled the head's learning.
    from synthtools.nets.unet import run_levels
    torch.manual_seed(0)
    net = SVFNet(features=(16, 32, 32, 32), convs=2)
    x = torch.rand(1, 2, 32, 32, 32)
    with torch.no_grad():
        out = run_levels(x, net.down, net.up)[-1]
    assert 0.5 < float(out.std() / x.std()) < 10


def test_displacement_error_is_the_mm_distance_to_the_true_position():
    from synthtools.training.recipes.register import displacement_error
    target = identity_grid((6, 7, 8))[0].movedim(-1, 0)[None] + torch.tensor([0.5, 0.0, 0.0]).view(1, 3, 1, 1, 1)
    mask = torch.zeros(1, 1, 6, 7, 8, dtype=torch.bool)
    mask[..., 1:4, :, :] = True
    exact = torch.zeros(1, 3, 6, 7, 8)
    exact[:, 0] = 0.5
    assert float(displacement_error(exact, target, mask, voxsize=4.0)) < 1e-6
    # Off by 0.5 voxel = 2 mm everywhere: Charbonnier sqrt(2^2 + 1) - 1 (eps = 1 mm).
    err = displacement_error(torch.zeros(1, 3, 6, 7, 8), target, mask, voxsize=4.0)
    assert abs(float(err) - (5 ** 0.5 - 1)) < 1e-5
    # Only the mask counts.
    exact[..., 5, :, :] = 10.0
    assert float(displacement_error(exact, target, mask, voxsize=4.0)) < 1e-6


def test_supervised_deform_pairs_carry_the_true_correspondence(tmp_path):
    from synthtools.training.recipes import get_recipe
    from synthtools.training.recipes.register import soft_dice
    write_label_map(tmp_path / "a.nii.gz")
    # the whole head: nothing moves in from outside the grid
    recipe = get_recipe(tiny_reg_cfg("deform_warmup", tmp_path).override({"recipe.shape": [48, 48, 48],
                                                                           "recipe.voxsize": 4.0}))
    index_map, voxsize = recipe.dataset().label_map(str(tmp_path / "a.nii.gz"))
    gains = []
    for seed in range(3):
        s = recipe.make_sample(index_map, voxsize, torch.Generator().manual_seed(seed))
        assert s["target"].shape == (3, 48, 48, 48) and not recipe.sample_problems(s)
        disp = (s["target"] - identity_grid((48, 48, 48))[0].movedim(-1, 0))[None]
        onehot = [torch.nn.functional.one_hot(s[k].long(), recipe.num_classes).movedim(-1, 0)[None, 1:].float()
                  for k in ("moving_labels", "fixed_labels")]
        before = soft_dice(onehot[0], onehot[1])
        after = soft_dice(warp_image(onehot[0], disp, mode="nearest"), onehot[1])
        gains.append(float(after - before))
    # Following the true correspondence aligns the two label maps (0.65-0.71
    # -> 0.91: nearest-neighbour resampling at 4 mm limits it).
    assert min(gains) > 0.15
    with pytest.raises(ValueError, match="one label map"):
        recipe.make_sample(index_map, voxsize, torch.Generator().manual_seed(0), (index_map, voxsize))


def test_supervised_deform_warmup_trains_and_its_loss_falls_on_one_pair(tmp_path):
    from synthtools.training.loop import train
    from synthtools.training.recipes import get_recipe
    write_label_map(tmp_path / "a.nii.gz")
    recipe = get_recipe(tiny_reg_cfg("deform_warmup", tmp_path).override({"train.lr": 1e-3}))
    train(recipe, tmp_path / "run", steps=40, sanity=True, log=lambda *a: None)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert all(np.isfinite(losses)) and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_feature_svf_network_keeps_its_encoder_frozen_and_matches_svf_interface():
    from synthtools.nets.registration import FeatureSVFNet
    torch.manual_seed(0)
    enc = BarycenterAffine(3, 1, 6, features=(4, 8), convs=1, symmetric=True)
    net = FeatureSVFNet(dict(type="barycenter_affine", **enc.config), features=(4, 8), convs=1, steps=5)
    net.encoder.load_state_dict(enc.state_dict())
    before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    assert net.multiple == 2
    moving, fixed = torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8)
    with torch.no_grad():
        net.svf.head.weight.normal_(0, 0.1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    vel = net(moving, fixed, torch.tensor([0.5]))
    assert vel.shape == (1, 3, 8, 8, 8)
    vel.square().mean().backward()
    opt.step()
    assert all(p.grad is None for p in net.encoder.parameters())
    assert all(torch.equal(v, before[k]) for k, v in net.encoder.state_dict().items())
    # The U-Net sees the encoder's maps at the model's grid: the encoder's
    # maps of the image upsampled x2, averaged back over 2^3 blocks.
    up = torch.nn.functional.interpolate(moving, scale_factor=2, mode="trilinear", align_corners=False)
    with torch.no_grad():
        ref = torch.nn.functional.avg_pool3d(enc.feature_maps(up), 2)
        assert torch.allclose(net.encode(moving), ref, atol=1e-6)
    assert net.displacement(vel.detach()).shape == vel.shape


def test_feature_deform_recipe_trains_from_the_affine_model_and_exports(pair, tmp_path):
    from synthtools.training.loop import export, train
    from synthtools.training.recipes import get_recipe
    write_label_map(tmp_path / "a.nii.gz")
    recipe = get_recipe(tiny_reg_cfg("deform_features", tmp_path).override({"train.init": "synthmorph-affine"}))
    train(recipe, tmp_path / "run", steps=2, log=lambda *a: None, check=False)
    folder = export(recipe, tmp_path / "run", tmp_path / "model", "synthmorph-deform-test", which="last")
    model = load_model(folder)
    affine = load_model("synthmorph-affine")
    # The shipped encoder is the affine model's feature network, untouched by training.
    enc = model.net.encoder.state_dict()
    assert all(torch.allclose(enc[k], v, atol=1e-3 * (1 + v.abs().max())) for k, v in affine.net.state_dict().items())
    moving, fixed = (load_volume(p) for p in pair)
    reg = register_deform(model, moving, fixed)
    assert reg.transform.disp.shape[:3] == fixed.shape[:3] and np.isfinite(reg.transform.disp).all()


# ---------------------------------------------------------------- tiny training + CLI

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """Each recipe trained 3 steps and exported: {name: model folder}."""
    from synthtools.training.loop import export, train
    from synthtools.training.recipes import get_recipe
    root = tmp_path_factory.mktemp("reg_models")
    maps = root / "maps"
    maps.mkdir()
    write_label_map(maps / "a.nii.gz")
    write_label_map(maps / "b.nii.gz", (44, 48, 40))
    out = {}
    for name in ("rigid", "affine", "deform"):
        recipe = get_recipe(tiny_reg_cfg(name, maps))
        run = root / f"run_{name}"
        # The generator preflight (4 samples) once per sample kind: rigid shares affine's.
        result = train(recipe, run, steps=3, log=lambda *a: None, check=name != "rigid")
        assert result["step"] == 3
        losses = [json.loads(x)["loss"] for x in (run / "log.jsonl").read_text().splitlines()]
        assert len(losses) == 3 and all(np.isfinite(losses))
        out[name] = export(recipe, run, root / f"synthmorph-{name}", f"synthmorph-{name}")
    return out


def head(affine, shape) -> np.ndarray:
    """Head-like image: bright ellipsoid, darker shell, an off-centre blob."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    w = idx @ affine[:3, :3].T + affine[:3, 3]
    r = np.sqrt(np.sum((w / [30.0, 34.0, 26.0]) ** 2, -1))
    img = np.where(r < 1, 80.0, np.where(r < 1.2, 30.0, 0.0))
    img += 60 * np.exp(-np.sum((w - [8, 10, 5]) ** 2, -1) / 60.0)
    return img.astype(np.float32)


FIXED_AFF = affine_of(rotation((5, 0, -8)) * 2.5, (2.0, -1.0, 4.0), (32, 34, 30))
MOVING_AFF = affine_of(rotation((-10, 6, 4)) @ np.diag([2.0, 2.2, 3.0]), (6.0, 2.0, -3.0), (36, 30, 24))


@pytest.fixture
def pair(tmp_path):
    fixed = tmp_path / "fixed.nii.gz"
    moving = tmp_path / "moving.nii.gz"
    nib.save(nib.Nifti1Image(head(FIXED_AFF, (32, 34, 30)), FIXED_AFF), str(fixed))
    nib.save(nib.Nifti1Image((head(MOVING_AFF, (36, 30, 24)) * 10).astype(np.int16), MOVING_AFF), str(moving))
    return moving, fixed


def same_grid(path: Path, ref: Path) -> bool:
    a, b = nib.load(str(path)), nib.load(str(ref))
    return a.shape[:3] == b.shape[:3] and np.allclose(a.affine, b.affine, atol=1e-4)


def test_exported_models_metadata(trained):
    for name, folder in trained.items():
        model = load_model(folder)
        meta = json.loads((folder / "metadata.json").read_text())
        assert meta["task"] == "register" and meta["recipe"] == name and meta["steps"] == 3
        assert meta["output"]["type"] == {"deform": "svf"}.get(name, name)
        assert isinstance(model.net, SVFNet if name == "deform" else BarycenterAffine)


@pytest.mark.parametrize("mode", ["rigid", "affine"])
def test_cli_linear_registration_end_to_end(mode, trained, pair, tmp_path, capsys):
    moving, fixed = pair
    out = tmp_path / "out"
    out.mkdir()
    code, err = synthmorph("register", "-m", mode, moving, fixed, "-o", out / "moved.nii.gz", "-O",
                           out / "fixed_in_moving.nii.gz", "-t", out / "t.lta", "-T", out / "inv.txt",
                           "--model", trained[mode], "-j", "1", capsys=capsys)
    assert code == 0, err
    assert same_grid(out / "moved.nii.gz", fixed) and same_grid(out / "fixed_in_moving.nii.gz", moving)
    assert nib.load(str(out / "moved.nii.gz")).get_data_dtype() == np.int16   # the moving image's type
    t, inv = read_transform(out / "t.lta"), read_transform(out / "inv.txt")
    assert np.allclose(t.matrix @ inv.matrix, np.eye(4), atol=1e-5)
    assert t.fixed.same_grid(load_volume(fixed)) and t.moving.same_grid(load_volume(moving))
    if mode == "rigid":
        assert np.allclose(t.matrix[:3, :3] @ t.matrix[:3, :3].T, np.eye(3), atol=1e-5)
    # The moved image is exactly `synthmorph apply` of the written transform.
    code, err = synthmorph("apply", out / "t.lta", moving, out / "applied.nii.gz", capsys=capsys)
    assert code == 0, err
    assert np.array_equal(nib.load(str(out / "applied.nii.gz")).get_fdata(),
                          nib.load(str(out / "moved.nii.gz")).get_fdata())


def test_cli_header_only_keeps_voxels(trained, pair, tmp_path, capsys):
    moving, fixed = pair
    code, err = synthmorph("register", "-m", "affine", moving, fixed, "-o", tmp_path / "moved.nii.gz", "-O",
                           tmp_path / "fim.nii.gz", "-t", tmp_path / "t.lta", "-H", "--model", trained["affine"],
                           capsys=capsys)
    assert code == 0, err
    mov, out = nib.load(str(moving)), nib.load(str(tmp_path / "moved.nii.gz"))
    assert np.array_equal(np.asanyarray(out.dataobj), np.asanyarray(mov.dataobj))
    t = read_transform(tmp_path / "t.lta")
    assert np.allclose(out.affine, update_header(t, mov.affine), atol=1e-4)
    fim = nib.load(str(tmp_path / "fim.nii.gz"))
    assert np.array_equal(np.asanyarray(fim.dataobj), np.asanyarray(nib.load(str(fixed)).dataobj))
    assert np.allclose(fim.affine, t.matrix @ nib.load(str(fixed)).affine, atol=1e-4)


@pytest.mark.parametrize("mode", ["deform", "joint"])
def test_cli_deformable_registration_end_to_end(mode, trained, pair, tmp_path, capsys):
    moving, fixed = pair
    extra = ["--affine-model", trained["affine"]] if mode == "joint" else []
    code, err = synthmorph("register", "-m", mode, moving, fixed, "-o", tmp_path / "moved.nii.gz", "-O",
                           tmp_path / "fim.nii.gz", "-t", tmp_path / "w.nii.gz", "-T", tmp_path / "inv.mgz",
                           "-r", "0.3", "--model", trained["deform"], *extra, capsys=capsys)
    assert code == 0, err
    assert same_grid(tmp_path / "moved.nii.gz", fixed) and same_grid(tmp_path / "fim.nii.gz", moving)
    w, inv = read_transform(tmp_path / "w.nii.gz"), read_transform(tmp_path / "inv.mgz")
    assert isinstance(w, Warp) and w.grid.same_grid(load_volume(fixed))
    assert isinstance(inv, Warp) and inv.grid.same_grid(load_volume(moving))
    assert np.isfinite(w.disp).all() and np.isfinite(inv.disp).all()
    code, err = synthmorph("apply", tmp_path / "w.nii.gz", moving, tmp_path / "applied.nii.gz", capsys=capsys)
    assert code == 0, err
    assert np.allclose(nib.load(str(tmp_path / "applied.nii.gz")).get_fdata(),
                       nib.load(str(tmp_path / "moved.nii.gz")).get_fdata(), atol=1)


def test_cli_rejects_a_model_of_the_wrong_kind(trained, pair, tmp_path, capsys):
    moving, fixed = pair
    code, err = synthmorph("register", "-m", "rigid", moving, fixed, "-o", tmp_path / "o.nii.gz", "--model",
                           trained["deform"], capsys=capsys)
    assert code == 1 and "needs a rigid model" in one_error_line(err)
    code, err = synthmorph("register", "-m", "affine", moving, fixed, "-o", tmp_path / "o.nii.gz",
                           "--affine-model", trained["affine"], capsys=capsys)
    assert code == 2 and "only used with -m joint" in one_error_line(err)
    assert not (tmp_path / "o.nii.gz").exists()


def test_cli_joint_on_an_image_without_brain_is_a_one_line_error(tmp_path, capsys):
    """Uniform noise as the fixed image: the shipped affine model finds no
    brain for the deformable fit; one error line, exit 1, no output."""
    noise = tmp_path / "noise.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((64, 64, 64)).astype(np.float32), np.eye(4)),
             str(noise))
    code, err = synthmorph("register", "-m", "joint", noise, noise, "-o", tmp_path / "o.nii.gz", "-t",
                           tmp_path / "w.nii.gz", "-q", capsys=capsys)   # -q: no progress lines
    assert code == 1 and "no brain found in the fixed image" in one_error_line(err)
    assert not (tmp_path / "o.nii.gz").exists() and not (tmp_path / "w.nii.gz").exists()


# ---------------------------------------------------------------- validation data

def test_lesjak_reference_convention():
    """The dataset's common-space brain mask, pulled into a raw grid with
    the composed reference, reproduces that scan's derived mask exactly."""
    from synthtools.morph.transforms import apply_transform, as_geometry
    from synthtools.evaluation import LJ, REG_CASES, data_root, lesjak_common_to_scan, reference_transform
    root = data_root()
    scan = "study2_T2W"
    files = [root / f"{LJ}common_space/brainmask.nii.gz", root / f"{LJ}derived/{scan}_brainmask_derived.nii.gz"]
    if not all(f.is_file() for f in files) or not REG_CASES[0].available():
        pytest.skip("Lesjak validation data not available")
    common = load_volume(files[0], dtype=None)
    ref = load_volume(files[1], dtype=None)
    # common -> scan is the pull-back from the common grid; the scan's mask is
    # the common mask pulled through its inverse.
    mask = apply_transform(Affine(np.linalg.inv(lesjak_common_to_scan(scan))), common, as_geometry(ref), order=0)
    assert np.array_equal(mask > 0, ref.data > 0)
    t = reference_transform(REG_CASES[0])                          # study1 T2W -> T1W: nearly the identity
    assert np.abs(t.matrix - np.eye(4)).max() < 2.0


def test_patch_ncc2_is_contrast_agnostic_and_drops_when_misaligned():
    """Local NCC^2 of a smooth image with itself, an inverted copy, and a
    copy under any positive scaling and offset is 1; with a shifted copy it
    is much lower; with noise near 0."""
    from synthtools.morph.refine import patch_ncc2
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.avg_pool1d(torch.rand(1, 1, 20000, generator=gen), 25, 1, 12)[0, 0]

    def p(v):   # 159 cubes of 125 points
        return v[:19875].reshape(-1, 125)

    for other in (x, 1 - x, 3 * x + 7):
        assert abs(float(patch_ncc2(p(x), p(other))) - 1) < 1e-3   # eps 1e-9 of near-flat cubes
    assert float(patch_ncc2(p(x), p(torch.roll(x, 40)))) < 0.5
    assert float(patch_ncc2(p(x), p(torch.rand(20000, generator=gen)))) < 0.1


@pytest.mark.parametrize("radius", [0, 1, 2, 4])
def test_dilate_cube_equals_max_pooling(radius):
    from synthtools.morph.refine import dilate_cube
    mask = torch.rand((9, 12, 3), generator=torch.Generator().manual_seed(radius)) > 0.9
    want = torch.nn.functional.max_pool3d(mask.float()[None, None], 2 * radius + 1, stride=1,
                                          padding=radius)[0, 0] > 0
    assert torch.equal(dilate_cube(mask, radius), want)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["rigid", "affine"])
def test_shipped_model_recovers_a_known_pose_across_contrast(mode):
    """The shipped model on the bundled clinical FLAIR (4 mm slices): the
    moving image is the scan with inverted contrast, resampled on its own
    grid through a known rigid transform (10-12 degrees, ~10 mm). The
    recovered transform moves the corners of a 100 mm cube around the head's
    centre by less than 0.75 mm from the truth (measured: rigid 0.06,
    affine 0.44; 1.5 mm was the bar with the mutual-information refinement);
    no registration is off by ~20 mm there."""
    from synthtools.conform import resample
    from synthtools.data import example_scan
    fixed = load_volume(example_scan())
    model = load_model(f"synthmorph-{mode}")
    centre = fixed.affine[:3, :3] @ ((np.array(fixed.shape) - 1) / 2) + fixed.affine[:3, 3]
    truth = np.eye(4)
    truth[:3, :3] = rotation((8, -6, 5))
    truth[:3, 3] = centre - truth[:3, :3] @ centre + np.array([6.0, -5.0, 4.0])
    data = np.asarray(fixed.data, np.float32)
    inverted = np.where(data > 0, data.max() - data, 0).astype(np.float32)
    moving = Volume(resample(inverted, truth @ fixed.affine, fixed.affine, fixed.shape), fixed.affine)
    t = register_linear(model, moving, fixed)
    corners = np.array(np.meshgrid(*[[-50.0, 50.0]] * 3)).reshape(3, -1) + centre[:, None]
    err = np.linalg.norm((t.matrix - truth)[:3, :3] @ corners + (t.matrix - truth)[:3, 3:], axis=0)
    assert err.max() < 0.75, err


@pytest.mark.slow
def test_joint_mode_skips_only_the_native_refinement_level(monkeypatch):
    """In joint mode the affine step drops its last (native-grid) level:
    the deformable fit absorbs that residual. ``native_level=False`` equals
    the model's refinement with 0 native steps, and differs from the full
    refinement (so the level really is skipped, not ignored)."""
    from synthtools.data import example_scan
    from synthtools.morph import register as reg_module
    model = load_model("synthmorph-affine")
    levels = tuple(model.meta["inference"]["refine"])
    assert model.meta["inference"]["refine_metric"] == "lncc" and levels[-1] > 0
    fixed = load_volume(example_scan())
    pose = np.eye(4)
    pose[:3, 3] = (3.0, -2.0, 1.5)
    moving = Volume(np.asarray(fixed.data), pose @ fixed.affine)
    fast = register_linear(model, moving, fixed, native_level=False).matrix
    explicit = register_linear(model, moving, fixed, refine=levels[:-1] + (0,)).matrix
    full = register_linear(model, moving, fixed).matrix
    assert np.allclose(fast, explicit, atol=1e-9)
    assert not np.allclose(fast, full, atol=1e-6)

    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return Affine(np.eye(4))
    monkeypatch.setattr(reg_module, "register_linear", spy)
    monkeypatch.setattr(reg_module, "register_deform", lambda *a, **k: "deformed")
    assert reg_module.register(moving, fixed, "joint", {"linear": model, "deform": model}) == "deformed"
    assert seen.get("native_level") is False and seen.get("passes") == 1   # one network pass too
    assert seen.get("refine_patches") == reg_module.JOINT_REFINE_PATCHES < PATCHES
    assert seen["side"].bf16 == (reg_module.JOINT_BF16 and reg_module.cpu_has_bf16())
    seen.clear()
    reg_module.register(moving, fixed, "affine", {"linear": model})
    assert seen.get("native_level", True) is True   # a linear registration keeps the full refinement
    assert seen.get("passes") is None               # ... and the model's own number of passes
    assert seen.get("refine_patches", PATCHES) == PATCHES and seen.get("side") is None   # float32 maps


def test_bf16_feature_maps_keep_the_brain_and_its_barycentres():
    """Joint mode's bf16 feature maps (where the CPU has bf16) give the
    same brain mask as float32 to within 1 % of its voxels and channel
    barycentres within 0.5 voxel on the bundled scan."""
    from synthtools.data import example_scan
    from synthtools.morph.refine import brain_mask
    from synthtools.morph.register import _features, cpu_has_bf16, fixed_side
    if not cpu_has_bf16():
        pytest.skip("this CPU has no bf16 support")
    model = load_model("synthmorph-affine")
    x = fixed_side(model, load_volume(example_scan())).image
    f32, f16 = _features(model, x), _features(model, x, bf16=True)
    assert f16.dtype == torch.float32 and f16.shape == f32.shape
    m32, m16 = brain_mask(f32, 0.5, 2), brain_mask(f16, 0.5, 2)
    assert float((m32 != m16).sum()) < 0.01 * float(m32.sum())
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in x.shape], indexing="ij"))
    mass32, mass16 = f32.sum((1, 2, 3)), f16.sum((1, 2, 3))
    keep = mass32 > 100     # channels with real mass
    c32 = torch.einsum("kxyz,axyz->ka", f32, grid)[keep] / mass32[keep, None]
    c16 = torch.einsum("kxyz,axyz->ka", f16, grid)[keep] / mass16[keep, None]
    assert float((c32 - c16).norm(dim=1).max()) < 0.5


def test_refinement_adam_steps_as_torch_adam():
    """The refinement's own Adam (no torch.optim import) takes torch's steps."""
    from synthtools.morph.refine import _Adam
    a = torch.linspace(-1, 1, 12).requires_grad_(True)
    b = a.detach().clone().requires_grad_(True)
    ours, theirs = _Adam(a, 0.01), torch.optim.Adam([b], lr=0.01)
    for _ in range(30):
        for x, step in ((a, ours.step), (b, theirs.step)):
            x.grad = None
            ((x ** 3).sum() + (x * torch.arange(12.0)).sum()).backward()
            step()
    torch.testing.assert_close(a.detach(), b.detach(), atol=1e-6, rtol=0)
    assert float((a.detach() - torch.linspace(-1, 1, 12)).abs().min()) > 0.05   # it really moved
