"""Generator invariants on real arrays (small synthetic label maps so the
suite stays fast; one test reads a shared training label map when present)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from synthtools.training.generator import corrupt, noise, spatial
from synthtools.training.generator.labels import LabelSet, load_priors_mapping, synthetic_label_map, SYNTHSEG_LABELS
from synthtools.training.generator.synth import SynthConfig, Synthesizer, generator
from synthtools.evaluation import data_root


def spheres(shape=(40, 44, 36), values=(0, 1, 2, 3, 4)) -> torch.Tensor:
    """Nested ellipsoids as a uint8 index map (2D or 3D)."""
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = np.sqrt(sum(g ** 2 for g in grids))
    out = np.zeros(shape, np.uint8)
    for k, v in enumerate(values[1:], start=1):
        out[r < 1.0 - 0.2 * k] = v
    return torch.from_numpy(out)


@pytest.mark.parametrize("shape", [(40, 44, 36), (64, 56)])
def test_same_seed_same_sample_and_label_values(shape):
    idx = spheres(shape)
    s = Synthesizer(SynthConfig(), num_labels=5)
    vox = (1.0,) * len(shape)
    a, b, c = s(idx, vox, generator(7)), s(idx, vox, generator(7)), s(idx, vox, generator(8))
    assert torch.equal(a.image, b.image) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.image, c.image)
    assert a.image.shape == (1, *shape) and a.labels.shape == shape
    assert set(a.labels.unique().tolist()) <= set(idx.unique().tolist())
    assert 0 <= float(a.image.min()) and float(a.image.max()) <= 1


def test_identity_settings_reproduce_labels_and_gmm_image():
    idx = spheres()
    s = Synthesizer(SynthConfig.identity(), num_labels=5)
    out = s(idx, (1, 1, 1), generator(3))
    assert torch.equal(out.labels, idx)
    # The identity image is the normalised GMM image: same means per label.
    mu, _ = s.config.gmm.lookup(5, generator(3))
    expected = noise.normalize(mu[idx.long()][None, None])[0]
    # Reproduce the random stream: spatial + FOV draw first, so compare per label.
    for j in range(5):
        vals = out.image[0][idx == j]
        assert torch.allclose(vals, vals[0].expand_as(vals))  # one intensity per label, no corruption
    order_img = [float(out.image[0][idx == j][0]) for j in range(5)]
    assert len(set(round(v, 6) for v in order_img)) == 5
    assert out.image.min() == 0 and out.image.max() == 1
    assert expected.shape == out.image.shape


def test_affine_only_warp_keeps_label_values_and_is_invertible():
    idx = spheres()
    cfg = SynthConfig(warp=spatial.RandomWarp(strength=(0, 0)))
    out = Synthesizer(cfg, num_labels=5)(idx, (1, 1, 1), generator(1))
    assert set(out.labels.unique().tolist()) <= {0, 1, 2, 3, 4}
    assert out.transform.field is None


def test_svf_warp_is_diffeomorphic():
    # Table II's strongest warp on a 1 mm head-sized grid, sampled at 4 mm.
    warp = spatial.RandomWarp(strength=(20, 20), points=(2, 16), svf=True)
    for seed in range(4):
        t = spatial.sample_transform((256,) * 3, (1, 1, 1), generator(seed), None, warp, (64,) * 3, (4,) * 3)
        det = t.jacobian_determinant()
        assert float(det.min()) > 0, f"folding for seed {seed}"


def test_direct_warp_can_fold_but_svf_does_not():
    # Strong, high-frequency direct displacements fold; the same field as an SVF does not.
    direct = spatial.RandomWarp(strength=(8, 8), points=(16, 16), svf=False, max_strain=None)
    svf = spatial.RandomWarp(strength=(8, 8), points=(16, 16), svf=True, max_strain=None)
    det_d = spatial.sample_transform((48, 48, 48), (2, 2, 2), generator(0), None, direct).jacobian_determinant()
    det_s = spatial.sample_transform((48, 48, 48), (2, 2, 2), generator(0), None, svf).jacobian_determinant()
    assert float(det_d.min()) < 0 < float(det_s.min())


def test_zero_bias_is_identity_and_bias_bounded():
    x = torch.rand(1, 20, 22, 24)
    assert torch.equal(corrupt.BiasField(strength=(0, 0))(x, generator(0)), x)
    b = corrupt.BiasField(strength=(0.5, 0.5)).field((20, 22, 24), generator(0))
    assert float(b.min()) >= 0.5 - 1e-6 and float(b.max()) <= 1 + 1e-6


@pytest.mark.parametrize("kind", noise.KINDS)
@pytest.mark.parametrize("shape", [(24, 20, 16), (32, 30)])
def test_noise_in_unit_range_and_vector_fields(kind, shape):
    f = noise.smooth_noise(kind, shape, generator(0), batch=2, channels=len(shape), max_points=6)
    assert f.shape == (2, len(shape), *shape)
    assert float(f.min()) >= 0 and float(f.max()) <= 1
    assert torch.allclose(f.flatten(2).amin(-1), torch.zeros(2, len(shape)), atol=1e-6)
    # Smooth: neighbouring voxels differ much less than the full range.
    assert float((f[..., 1:] - f[..., :-1]).abs().mean()) < 0.1


def test_smoothed_noise_kernel_length():
    assert noise.gaussian_kernel(2.0).numel() == 13  # ceil(3*2)*2+1
    assert abs(float(noise.gaussian_kernel(1.3).sum()) - 1) < 1e-6


@pytest.mark.parametrize("p", [0.0, 0.1, 0.25])
def test_fov_mask_removes_requested_proportion(p):
    shape = (40, 30, 20)
    for axis in range(3):
        m = corrupt.fov_mask(shape, p, axis, "low")
        removed = 1 - float(m.float().mean())
        assert abs(removed - round(p * shape[axis]) / shape[axis]) < 1e-6
        assert m.shape == shape


def test_blur_noise_gamma_downsample_shapes_and_ranges():
    x = torch.rand(1, 30, 32, 28)
    g = generator(0)
    assert corrupt.Blur((2, 2))(x, (1, 1, 1), g).shape == x.shape
    assert torch.equal(corrupt.Noise((0, 0))(x, g), x)
    y = corrupt.Gamma((0.5, 1.5))(x * 5 + 3, g)
    assert float(y.min()) == 0 and float(y.max()) == 1
    d = corrupt.Downsample((4, 4))(x, (1, 1, 1), g)
    assert d.shape == x.shape and not torch.equal(d, x)


def test_maximal_config_sets_upper_bounds():
    cfg = SynthConfig().maximal()
    assert cfg.affine.rotation == (30.0, 30.0) and cfg.bias.strength == (0.5, 0.5) and cfg.noise.std == (0.1, 0.1)


def test_synthetic_label_map_and_labelset():
    m = synthetic_label_map((24, 24, 24), generator(0), num_labels=(5, 5))
    assert m.dtype == torch.uint8 and set(m.unique().tolist()) <= set(range(5))
    ls = LabelSet()
    idx = ls.to_index(np.array([0, 2, 41, 999, 530]))
    assert ls.values[idx].tolist() == [0, 2, 41, 0, 530]
    flip = ls.flip_lut()
    assert ls.values[flip.numpy()[ls.to_index(np.array([2, 41, 16])).astype(int)]].tolist() == [41, 2, 16]
    seg = ls.synthseg_lut()
    assert set(seg.tolist()) == set(SYNTHSEG_LABELS)


def test_priors_mapping_matches_code():
    pri = data_root() / "label_maps" / "priors"
    if not (pri / "generation_labels.npy").exists():
        pytest.skip("shared priors not available")
    mapping = load_priors_mapping(pri / "generation_labels.npy", pri / "synthseg_segmentation_labels_2.0.npy")
    ls = LabelSet()
    code = dict(zip(ls.values.tolist(), ls.synthseg_lut().tolist()))
    assert mapping == code


def test_real_label_map_sample_at_2mm():
    path = data_root() / "label_maps" / "training_seg_01.nii.gz"
    if not path.exists():
        pytest.skip("shared label maps not available")
    from synthtools.training.generator.dataset import load_index_map
    ls = LabelSet()
    idx, vox = load_index_map(str(path), ls)
    out = Synthesizer(SynthConfig(), num_labels=len(ls))(idx, vox, generator(0), out_shape=(64, 64, 64),
                                                         out_voxsize=(3, 3, 3))
    assert out.image.shape == (1, 64, 64, 64)
    assert set(out.labels.unique().tolist()) <= set(range(len(ls)))


def test_same_anatomy_pair_ground_truth_aligns_labels():
    from synthtools.training.generator.pairs import same_anatomy_pair, two_anatomy_pair
    idx = spheres((40, 44, 36), values=(0, 1, 2, 3, 4, 5))
    cfg = SynthConfig(affine=spatial.RandomAffine(translation=(-5, 5), rotation=(-15, 15)),
                      warp=spatial.RandomWarp(strength=(0, 4), points=(2, 4)))
    synth = Synthesizer(cfg, num_labels=6)
    pair = same_anatomy_pair(synth, synth, idx, (1, 1, 1), generator(5))
    assert pair.fixed_to_moving is not None and pair.fixed_to_moving.shape == (3, 40, 44, 36)
    # Exact check: Phi_m(fixed_to_moving(x)) == Phi_f(x) in label-map voxels.
    src_f = pair.fixed.transform.coords()
    src_m = pair.moving.transform.coords()
    back = spatial.sample(src_m[None], pair.fixed_to_moving.movedim(0, -1)[None])[0]
    inside = (pair.fixed_to_moving >= 1).all(0) & (pair.fixed_to_moving <= torch.tensor([38, 42, 34]).view(3, 1, 1, 1)).all(0)
    err = (back - src_f).norm(dim=0)[inside]
    # Affine parts are exact; the SVF inverse exp(-v) matches exp(v) to a
    # fraction of a voxel (discrete scaling and squaring).
    assert float(err.median()) < 0.4 and float(err.quantile(0.95)) < 1.0
    # Labels: thin shells resampled twice with nearest neighbour still mostly agree.
    moved = spatial.nearest(pair.moving.labels, pair.fixed_to_moving)
    fg = pair.fixed.labels > 0
    assert (moved[fg] == pair.fixed.labels[fg]).float().mean() > 0.85
    # Shared pose: same labels, different images, identity correspondence.
    shared = same_anatomy_pair(synth, synth, idx, (1, 1, 1), generator(6), shared_pose=True)
    assert torch.equal(shared.fixed.labels, shared.moving.labels)
    assert not torch.equal(shared.fixed.image, shared.moving.image)
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in (40, 44, 36)],
                                      indexing="ij"))
    assert float((shared.fixed_to_moving - grid).abs().median()) < 0.4
    other = two_anatomy_pair(synth, idx, spheres((40, 44, 36), values=(0, 2, 1, 4, 3, 5)), (1, 1, 1), (1, 1, 1),
                             generator(7))
    assert other.fixed_to_moving is None


def test_ct_like_gmm_makes_bone_brightest_and_brain_narrow():
    from synthtools.training.generator.intensity import RandomGMM
    from synthtools.training.generator.labels import GENERATION_LABELS
    values = torch.as_tensor(GENERATION_LABELS)
    gmm = RandomGMM(ct_prob=1.0, values=GENERATION_LABELS)
    brain = (values > 0) & (values < 500)
    bone = values == 515
    for seed in range(20):
        mu, _ = gmm.lookup(len(values), generator(seed))
        assert mu[bone].min() > mu[~bone].max()              # bone is the brightest label
        assert float(mu[brain].max() - mu[brain].min()) <= 0.15 + 1e-6   # a CT brain window
        assert float(mu.min()) >= 0.0
    # ct_prob = 0 draws exactly what the plain GMM draws (old seeds keep their samples)
    plain, _ = RandomGMM().lookup(len(values), generator(3))
    off, _ = RandomGMM(values=GENERATION_LABELS).lookup(len(values), generator(3))
    assert torch.equal(plain, off)
    with pytest.raises(ValueError, match="label values"):
        RandomGMM(ct_prob=1.0).lookup(len(values), generator(0))


def test_mr_physics_gmm_gives_the_contrasts_of_real_sequences():
    from synthtools.training.generator.intensity import RandomGMM
    from synthtools.training.generator.labels import GENERATION_LABELS
    from synthtools.training.generator.mr_contrast import TISSUE, random_settings, signal
    values = torch.as_tensor(GENERATION_LABELS)
    idx = {v: int((values == v).nonzero()) for v in (2, 3, 24, 515)}   # WM, cortex, CSF, skull
    gmm = RandomGMM(mr_prob=1.0, values=GENERATION_LABELS)
    for seed in range(30):
        mu, _ = gmm.lookup(len(values), generator(seed))
        assert float(mu.min()) >= 0.0 and float(mu.max()) == pytest.approx(1.0)
        assert mu[idx[515]] < 0.1                      # bone has almost no signal in any sequence
        assert mu[0] == 0.0                            # air
    assert torch.equal(gmm.lookup(len(values), generator(5))[0], gmm.lookup(len(values), generator(5))[0])
    # The signal equations order the tissues as the scanners do.
    t1, t2, pd = (torch.tensor([TISSUE[t][k] for t in ("wm", "gm", "csf")], dtype=torch.float64) for k in range(3))
    for seed in range(10):
        wm, gm, csf = signal(t1, t2, pd, "spgr", random_settings("spgr", generator(seed)))
        assert wm > gm > csf                           # T1-weighted
        wm, gm, csf = signal(t1, t2, pd, "t2_se", random_settings("t2_se", generator(seed)))
        assert csf > gm > wm                           # T2-weighted
        wm, gm, csf = signal(t1, t2, pd, "flair", random_settings("flair", generator(seed)))
        assert gm > wm > csf and csf < 0.3 * wm        # FLAIR: CSF (almost) nulled
    # mr_prob = 0 leaves the plain draws untouched.
    plain, _ = RandomGMM().lookup(len(values), generator(3))
    off, _ = RandomGMM(mr_prob=0.0, values=GENERATION_LABELS).lookup(len(values), generator(3))
    assert torch.equal(plain, off)
    with pytest.raises(ValueError, match="label values"):
        RandomGMM(mr_prob=1.0).lookup(len(values), generator(0))
