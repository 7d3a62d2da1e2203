"""Intensity refinement of segmentation posteriors (synthtools.seg.refine)."""
from __future__ import annotations

import pytest
import torch

from synthtools.seg.refine import refine_posteriors


def _line(boundary_prior: float = 60.0):
    """A 1D 'scan' of 300 voxels: background 0..29 (two intensities, like air
    and scalp), structure A 30..149 (0.3), structure B 150..299 (0.8), with
    noise; and a smooth prior whose A/B boundary sits at ``boundary_prior``
    voxels instead of 150 (a network that is off by several voxels)."""
    g = torch.Generator().manual_seed(0)
    pos = torch.arange(300, dtype=torch.float32)
    truth = torch.where(pos < 30, 0, torch.where(pos < 150, 1, 2))
    image = torch.tensor([0.05, 0.3, 0.8])[truth] + 0.03 * torch.randn(300, generator=g)
    image[:15] = 0.95 + 0.02 * torch.randn(15, generator=g)   # bright "scalp" in the background
    inside = torch.sigmoid((pos - 30) / 3)
    b = torch.sigmoid((pos - boundary_prior) / 15)
    prior = torch.stack([1 - inside, inside * (1 - b), inside * b], 1)
    return prior, image, truth


def test_boundary_moves_to_the_image_edge_for_any_contrast():
    prior, image, truth = _line(boundary_prior=175.0)
    before = (prior.argmax(1) == truth).float().mean()
    for img in (image, 1 - image, image ** 3 * 500 + 7):   # inverted, non-linear, other units
        post = refine_posteriors(prior, img)
        assert post.shape == prior.shape and torch.allclose(post.sum(1), torch.ones(300), atol=1e-5)
        assert post.min() >= 0
        after = (post.argmax(1) == truth).float().mean()
        assert before < 0.93 and after > 0.98, (before, after)


def test_an_image_without_contrast_leaves_the_prior_decision():
    prior, _, _ = _line()
    post = refine_posteriors(prior, torch.full((300,), 0.5))
    assert torch.equal(post.argmax(1), prior.argmax(1))


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="expected"):
        refine_posteriors(torch.ones(5, 3) / 3, torch.ones(4))


def test_prior_power_weighs_the_prior_against_the_image():
    """power 1 is the plain refinement; a smaller power lets the image move
    a wrong boundary further; the prior is not modified unless in place;
    a power <= 0 is refused."""
    prior, image, truth = _line(boundary_prior=175.0)
    noisy = image + 0.12 * torch.randn(300, generator=torch.Generator().manual_seed(1))
    kept = prior.clone()
    plain = refine_posteriors(prior, noisy)
    assert torch.allclose(refine_posteriors(prior, noisy, prior_power=1.0), plain)
    flat = refine_posteriors(prior, noisy, prior_power=0.3)
    assert torch.equal(prior, kept)
    assert torch.allclose(flat.sum(1), torch.ones(300), atol=1e-5)
    # Where the prior is wrong (A/B boundary at 175 instead of 150), the flatter prior follows the image more.
    wrong = slice(150, 175)
    assert (flat[wrong].argmax(1) == truth[wrong]).sum() >= (plain[wrong].argmax(1) == truth[wrong]).sum()
    assert float(flat[wrong, 2].mean()) > float(plain[wrong, 2].mean())
    buffer = prior.clone()
    inplace = refine_posteriors(buffer, noisy, prior_power=0.3, inplace=True)
    assert inplace.data_ptr() == buffer.data_ptr() and torch.allclose(inplace, flat, atol=1e-6)
    with pytest.raises(ValueError, match="prior_power"):
        refine_posteriors(prior, noisy, prior_power=0.0)


def test_fit_on_a_subsample_and_in_place(monkeypatch):
    """A large image's model is fitted on a regular subsample and written into
    the prior's memory: the answer stays that of the full fit."""
    import synthtools.seg.refine as refine
    prior, image, truth = _line(boundary_prior=175.0)
    full = refine_posteriors(prior, image)
    monkeypatch.setattr(refine, "FIT_VOXELS", 60)      # every 5th voxel
    monkeypatch.setattr(refine, "CHUNK_VOXELS", 64)    # several chunks, the last one short
    buffer = prior.clone()
    sub = refine_posteriors(buffer, image, inplace=True)
    assert sub.data_ptr() == buffer.data_ptr()
    assert (sub.argmax(1) == truth).float().mean() > 0.98
    assert (sub.argmax(1) == full.argmax(1)).float().mean() > 0.99


def test_twins_share_a_gaussian_so_the_prior_alone_splits_them():
    """Left/right twins (one group) get the same likelihood everywhere: their
    posterior ratio is their prior ratio, whatever the image says."""
    from synthtools.seg import twin_groups
    from synthtools.training.generator.labels import SYNTHSEG_LABELS
    groups = twin_groups(SYNTHSEG_LABELS)
    ch = {v: k for k, v in enumerate(SYNTHSEG_LABELS)}
    assert groups[ch[41]] == groups[ch[2]] == ch[2] and groups[ch[16]] == ch[16]
    g = torch.Generator().manual_seed(1)
    prior = torch.rand(500, 3, generator=g) + 0.05
    prior /= prior.sum(1, keepdim=True)
    image = torch.where(torch.arange(500) < 250, 0.2, 0.9) + 0.05 * torch.randn(500, generator=g)
    post = refine_posteriors(prior, image, groups=[0, 1, 1])
    torch.testing.assert_close(post[:, 1] / post[:, 2], prior[:, 1] / prior[:, 2], rtol=1e-4, atol=0)
    free = refine_posteriors(prior, image)
    assert not torch.allclose(free[:, 1] / free[:, 2], prior[:, 1] / prior[:, 2], rtol=1e-2)


def _slab_phantom(field_strength: float):
    """A 3D 'scan' (40 x 40 x 40 voxels of 2 mm): background outside a box,
    inside it slabs of structure A (0.4) and B (0.6) alternating every 4
    voxels along x, with noise, times a field 1 + s * z (z from -1 to 1):
    at s = 0.4, A at the top is brighter than B at the bottom. The prior
    knows the box and leans (0.65) toward the right structure."""
    g = torch.Generator().manual_seed(2)
    ijk = torch.stack(torch.meshgrid(*[torch.arange(40)] * 3, indexing="ij"), -1).reshape(-1, 3)
    inside = ((ijk >= 4) & (ijk < 36)).all(1)
    b_slab = (ijk[:, 0] // 4) % 2 == 1
    truth = torch.where(inside, torch.where(b_slab, 2, 1), 0)
    image = torch.tensor([0.05, 0.4, 0.6])[truth] + 0.02 * torch.randn(len(truth), generator=g)
    z = ijk[:, 2].float() / 39 * 2 - 1
    image = image * (1 + field_strength * z)
    lean = torch.where(b_slab, 0.65, 0.35)
    prior = torch.stack([torch.where(inside, 0.02, 0.98),
                         torch.where(inside, 0.98 * (1 - lean), 0.01),
                         torch.where(inside, 0.98 * lean, 0.01)], 1)
    return prior, image.clamp_min(1e-3), truth, ijk.float() * 2.0


def test_a_bias_field_is_fitted_and_removed():
    prior, image, truth, coords = _slab_phantom(0.4)
    inside = truth > 0
    plain = (refine_posteriors(prior, image).argmax(1) == truth)[inside].float().mean()
    fitted = (refine_posteriors(prior, image, coords=coords).argmax(1) == truth)[inside].float().mean()
    assert plain < 0.9 and fitted > 0.99, (plain, fitted)
    # The same scan without the field: the field model changes (almost) nothing.
    prior, flat, truth, coords = _slab_phantom(0.0)
    a, b = refine_posteriors(prior, flat), refine_posteriors(prior, flat, coords=coords)
    assert (a.argmax(1) == truth).float().mean() > 0.99 and (b.argmax(1) == truth).float().mean() > 0.99
    assert (a - b).abs().max() < 0.05


def test_no_field_for_images_with_many_non_positive_values():
    """Hounsfield units (or zero-mean images) are not a coil's product: the
    field is skipped and the answer is the plain one."""
    prior, image, truth, coords = _slab_phantom(0.0)
    shifted = image - 0.5
    torch.testing.assert_close(refine_posteriors(prior, shifted, coords=coords), refine_posteriors(prior, shifted))
    with pytest.raises(ValueError, match="coords"):
        refine_posteriors(prior, image, coords=coords[:, :2])


def test_posteriors_hold_no_subnormal_floats():
    """Classes far from a voxel's intensity get a floor of e^-80 relative to
    the winner, not subnormal floats (float32 products over them ran many
    times slower); the argmax is unchanged by the floor."""
    from synthtools.seg.refine import _normalised_exp_
    logp = torch.tensor([[0.0, -50.0, -95.0, -300.0], [-1.0, -2.0, -200.0, -90.0]])
    post = _normalised_exp_(logp.clone())
    tiny = torch.finfo(torch.float32).tiny
    assert bool((post >= tiny).all())
    torch.testing.assert_close(post.sum(1), torch.ones(2))
    assert post.argmax(1).tolist() == [0, 0]


def test_known_background_voxels_keep_the_background_model_off_tissue():
    """A sharp prior leaves few background voxels in the refined region, some
    of them tissue at the brain's edge (prior 0.6 background): the background
    histogram fitted on them alone reaches into the tissue's intensities and
    keeps those voxels. Counting the voxels known to be background (outside
    the region: dark air) restores its real distribution, and the image
    takes the edge voxels back; an empty sample changes nothing."""
    g = torch.Generator().manual_seed(0)
    truth = torch.cat([torch.zeros(20), torch.ones(150), 2 * torch.ones(150)]).long()
    image = torch.tensor([0.05, 0.3, 0.8])[truth] + 0.03 * torch.randn(320, generator=g)
    prior = torch.tensor([[0.9, 0.05, 0.05]] * 20 + [[0.6, 0.35, 0.05]] * 50 + [[0.1, 0.85, 0.05]] * 100
                         + [[0.05, 0.05, 0.9]] * 150)
    edge = slice(20, 70)
    alone = refine_posteriors(prior, image)
    known = refine_posteriors(prior, image, background_sample=0.02 + 0.01 * torch.randn(2000, generator=g))
    assert (alone.argmax(1)[edge] == 1).float().mean() < 0.8
    assert (known.argmax(1)[edge] == 1).float().mean() > 0.98
    assert (known.argmax(1) == truth).float().mean() > 0.99
    assert torch.equal(refine_posteriors(prior, image, background_sample=torch.empty(0)), alone)


def test_a_models_refine_background_choice_is_read_and_checked():
    from synthtools.seg.segmenter import refine_background
    from synthtools.weights import Model, ModelError
    def model(inference):
        return Model(torch.nn.Identity(), {"inference": inference}, path="m")
    assert refine_background(model({})) == "region"   # the shipped network's setting
    assert refine_background(model({"refine_background": "all"})) == "all"
    with pytest.raises(ModelError, match="refine_background must be one of region, all"):
        refine_background(model({"refine_background": "everything"}))


def test_csf_compartments_share_one_gaussian():
    """Every CSF compartment is in one group, twins stay paired, tissue stays apart."""
    from synthtools.seg import CSF_LABELS, intensity_groups
    from synthtools.training.generator.labels import SYNTHSEG_LABELS
    groups = intensity_groups(SYNTHSEG_LABELS)
    ch = {v: k for k, v in enumerate(SYNTHSEG_LABELS)}
    assert len({groups[ch[v]] for v in CSF_LABELS}) == 1
    assert groups[ch[41]] == groups[ch[2]] != groups[ch[4]]
    assert groups[ch[3]] == groups[ch[42]] != groups[ch[2]]
    assert groups[ch[0]] == ch[0] and groups[ch[16]] == ch[16]


def test_a_small_fluid_compartment_keeps_its_voxels_when_tied():
    """A small compartment (S) whose soft prior also covers partial-volume voxels
    (between fluid and tissue): fitted alone, its Gaussian drifts to them and its
    fluid voxels go to the large compartment (V) of the same fluid; tied to V,
    the prior decides."""
    g = torch.Generator().manual_seed(3)
    counts = {"bg": 1000, "V": 2000, "S": 50, "near": 300, "T": 3000}
    means = {"bg": 0.0, "V": 0.1, "S": 0.1, "near": 0.4, "T": 0.7}
    rows = {"bg": [0.98, 0.01, 0.0, 0.01], "V": [0.01, 0.9, 0.04, 0.05], "S": [0.01, 0.02, 0.6, 0.37],
            "near": [0.01, 0.02, 0.6, 0.37], "T": [0.01, 0.04, 0.0, 0.95]}
    image = torch.cat([means[k] + 0.02 * torch.randn(n, generator=g) for k, n in counts.items()]).clamp_min(0)
    prior = torch.cat([torch.tensor(rows[k]).expand(n, 4) for k, n in counts.items()]).clamp_min(1e-4)
    prior = prior / prior.sum(1, keepdim=True)
    s = slice(counts["bg"] + counts["V"], counts["bg"] + counts["V"] + counts["S"])
    apart = refine_posteriors(prior.clone(), image).argmax(1)[s]
    tied = refine_posteriors(prior.clone(), image, groups=[0, 1, 1, 3]).argmax(1)[s]
    assert (apart == 2).float().mean() < 0.5 and (tied == 2).float().mean() > 0.9


def test_in_place_channel_softmax_matches_torch_softmax_on_every_block():
    """The blockwise in-place softmax of the segmenter gives torch's softmax
    over channels, also for a last block shorter than the step."""
    from synthtools.seg.segmenter import _softmax_
    torch.manual_seed(0)
    logits = torch.randn(5, 7, 3, 4) * 20
    want = torch.softmax(logits, dim=0)
    got = _softmax_(logits, step=3)
    assert got is logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    torch.testing.assert_close(got.sum(0), torch.ones(7, 3, 4))
