"""2.5D training and inference (``recipe.slab``): a 2D network that reads
each slice with its neighbours as channels. The neighbours must be the
right slices, in the same order in training and at inference, and a slab
network started from a single-slice one must compute what it computed."""
from __future__ import annotations

import json

import pytest
import torch

from synthtools.infer import content_range, predict, slab_batches
from synthtools.nets.unet import UNet
from synthtools.training.generator.synth import SynthConfig, Synthesizer, generator
from synthtools.training.loop import load_init, train
from synthtools.training.recipes import get_recipe, load_config
from synthtools.weights import Model


def slab_cfg(label_dir, **extra):
    base = {"recipe.voxsize": 4.0, "recipe.ndim": 2, "recipe.slab": 1, "recipe.shape": [16, 16],
            "model.features": [8, 16, 32], "model.convs": 1, "model.norm": "instance",
            "model.deep_supervision": 0, "train.workers": 0, "train.label_maps": str(label_dir),
            "train.batch": 1, "train.val_every": 0, "train.log_every": 1, "train.threads": 1,
            "train.init": "", "validation.cases": []}
    return load_config("segment", {**base, **extra})


def identity_recipe(label_dir, **extra):
    """A slab recipe whose generator changes nothing: one intensity per label."""
    recipe = get_recipe(slab_cfg(label_dir, **extra))
    cfg = SynthConfig.identity().with_label_values(recipe.labels.values)
    cfg.crop_labels = True
    recipe.synth = Synthesizer(cfg, num_labels=len(recipe.labels))
    return recipe


def random_index_map(recipe, shape=(16, 16, 16), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, len(recipe.labels), shape, generator=g)


def is_function_of(values: torch.Tensor, labels: torch.Tensor) -> bool:
    """Each label shows one value (the identity generator's picture of ``labels``)."""
    pairs = torch.unique(torch.stack([labels.flatten().double(), values.flatten().double()]), dim=1)
    return pairs.shape[1] == torch.unique(labels).numel()


def test_synthesizer_shift_moves_the_output_grid_centre():
    index = torch.randint(0, 5, (10, 12, 14), generator=torch.Generator().manual_seed(1))
    synth = Synthesizer(SynthConfig.identity(), num_labels=5)
    for k in (1, 4, 8):
        s = synth(index, (1.0, 1.0, 1.0), generator(0), out_shape=(3, 12, 14), out_voxsize=(1.0,) * 3,
                  shift=(k - 4.5, 0.0, 0.0))
        assert torch.equal(s.labels, index[k - 1:k + 2])


@pytest.mark.parametrize("draw", ["3d", "2d"])
def test_slab_sample_reads_the_neighbouring_slices_in_order(label_dir, monkeypatch, draw):
    recipe = identity_recipe(label_dir, **{"recipe.flip_prob": 0.0, "recipe.slab_draw": draw})
    index = random_index_map(recipe)
    padded = torch.nn.functional.pad(index, (1, 1, 1, 1, 1, 1))   # outside the map: background
    for axis, k in ((0, 7), (1, 0), (2, 15)):
        monkeypatch.setattr(recipe, "random_slice", lambda *a, _r=(axis, k): _r)
        sample = recipe.make_sample(index, (4.0, 4.0, 4.0), generator(3))
        assert sample["image"].shape == (3, 16, 16) and sample["target"].shape == (16, 16)
        assert torch.equal(sample["target"], recipe.to_channel[index.select(axis, k)])
        for j in range(3):
            # channel j shows slice k - 1 + j (index k + j of the padded map)
            assert is_function_of(sample["image"][j], padded.select(axis, k + j)[1:-1, 1:-1])
        if 0 < k < 15:   # (an edge slab's outer channel is empty: a function of anything)
            assert not is_function_of(sample["image"][0], padded.select(axis, k + 2)[1:-1, 1:-1])


@pytest.mark.parametrize("draw", ["3d", "2d"])
@pytest.mark.parametrize("axis", [0, 1])
def test_flipped_slab_mirrors_its_channels_and_swaps_the_labels(label_dir, monkeypatch, axis, draw):
    """A left-right mirror of a sagittal slab (axis 0 is left-right) reverses
    its slices; of a coronal or axial slab, it mirrors each slice."""
    plain = identity_recipe(label_dir, **{"recipe.flip_prob": 0.0, "recipe.slab_draw": draw})
    flipped = identity_recipe(label_dir, **{"recipe.flip_prob": 1.0, "recipe.slab_draw": draw})
    index = random_index_map(plain)
    for r in (plain, flipped):
        monkeypatch.setattr(r, "random_slice", lambda *a: (axis, 8))
    a = plain.make_sample(index, (4.0,) * 3, generator(5))
    b = flipped.make_sample(index, (4.0,) * 3, generator(5))
    swap = plain.to_channel[plain.flip_index]   # index -> twin's channel
    if axis == 0:
        assert torch.equal(b["image"], a["image"].flip(0))
        assert torch.equal(b["target"], swap[index.select(0, 8)])
    else:
        assert torch.equal(b["image"], a["image"].flip(1))
        assert torch.equal(b["target"], swap[index.select(axis, 8)].flip(0))


@pytest.mark.parametrize("axis", [0, 2])
def test_real_slab_sample_takes_the_neighbours_and_zeros_past_the_edge(label_dir, monkeypatch, axis):
    recipe = get_recipe(slab_cfg(label_dir, **{"recipe.flip_prob": 0.0}))
    index = random_index_map(recipe)
    image = index.float()
    padded = torch.nn.functional.pad(image, (1, 1, 1, 1, 1, 1))   # zeros past the grid, as inference
    for k in (5, 0, 15):
        monkeypatch.setattr(recipe, "random_slice", lambda *a, _k=k: (axis, _k))
        sample = recipe.real_sample((image, index), generator(0))
        want = torch.stack([padded.select(axis, k + j)[1:-1, 1:-1] for j in range(3)])
        assert torch.equal(sample["image"], want)
        assert torch.equal(sample["target"], recipe.to_channel[index.select(axis, k)])


def test_slab_inference_reads_the_same_neighbours_as_a_3d_kernel():
    """A 1x1 2D convolution over a 3-slice slab is a (1, 1, 3) 3D kernel
    along the slicing axis with zero padding: same order, same edges."""
    torch.manual_seed(0)

    class Pointwise(torch.nn.Module):
        ndim = 2

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return self.conv(x)

    net = Pointwise()
    x = torch.rand(1, 9, 8, 7)
    for axis in (0, 1, 2):
        model = Model(net, {"inference": {"slice_axes": [axis], "slab": 1, "bf16": False}}, None)
        kernel = net.conv.weight.data[:, :, 0, 0]                       # (2, 3)
        shape = [2, 1, 1, 1, 1]
        shape[2 + axis] = 3
        pad = [0, 0, 0]
        pad[axis] = 1
        want = torch.nn.functional.conv3d(x[None], kernel.reshape(shape), net.conv.bias.data, padding=pad)[0]
        torch.testing.assert_close(predict(model, x), want, rtol=1e-5, atol=1e-5)


def test_slices_that_see_only_zeros_are_run_once_and_the_output_is_unchanged():
    """A zero-padded head: the slices whose slab is all zero get the
    all-zero slab's output computed once, and the fused output is exactly
    what running every slice gives (instance norm included)."""
    torch.manual_seed(0)
    net = UNet(2, 3, 4, features=(4, 8), convs=1, norm="instance").eval()
    x = torch.zeros(1, 16, 12, 20)
    x[0, 4:11, 2:10, 5:13] = torch.rand(7, 8, 8) + 0.1
    x[0, :, :, 8] = 0                                    # an empty slice inside the content stays in
    model = Model(net, {"inference": {"slice_axes": [0, 1, 2], "slab": 1, "bf16": False}}, None)
    want = 0
    for axis in (0, 1, 2):
        ys = [net(xb).permute(1, 2, 3, 0) for xb in slab_batches(x.movedim(1 + axis, -1), 1)]
        want = want + torch.cat(ys, -1).movedim(-1, 1 + axis)
    seen = []
    hook = net.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    with torch.no_grad():
        got = predict(model, x)
    hook.remove()
    torch.testing.assert_close(got, (want / 3).detach(), rtol=0, atol=1e-6)
    # content slices (with their slab) 3-11, 1-10, 4-13 of 16, 12, 20: 9 + 10 + 10, plus one blank per axis
    assert sum(seen) == 9 + 10 + 10 + 3
    assert content_range(x.movedim(3, -1), 1) == (4, 14) and content_range(x.movedim(3, -1), 0) == (5, 13)
    assert content_range(torch.zeros(1, 3, 3, 5), 1) == (0, 0)


def test_slab_network_started_from_a_single_slice_one_computes_its_output():
    torch.manual_seed(0)
    single = UNet(2, 1, 4, features=(4, 8, 16), convs=1, norm="instance", deep_supervision=1)
    slab = UNet(2, 3, 4, features=(4, 8, 16), convs=1, norm="instance", deep_supervision=1)
    load_init(slab, single.state_dict())
    assert slab.state_dict()["down.0.0.weight"][:, [0, 2]].abs().max() == 0
    x = torch.rand(1, 16, 16, 16)
    meta = {"slice_axes": [0, 1, 2], "bf16": False}
    want = predict(Model(single.eval(), {"inference": meta}, None), x)
    got = predict(Model(slab.eval(), {"inference": {**meta, "slab": 1}}, None), x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError):   # any other mismatch stays an error
        load_init(UNet(2, 3, 5, features=(4, 8, 16), convs=1, norm="instance", deep_supervision=1),
                  single.state_dict())


def test_wider_slab_network_from_a_narrow_single_slice_one_predicts_the_same():
    """train.init_widen with recipe.slab: the neighbours are embedded, then
    the channels widened; the fused three-axis prediction is unchanged."""
    torch.manual_seed(2)
    single = UNet(2, 1, 4, features=(4, 8, 16), convs=2, norm="instance", deep_supervision=1)
    for p in single.parameters():
        p.data.normal_(0, 0.3)
    wide = UNet(2, 3, 4, features=(6, 12, 24), convs=2, norm="instance", deep_supervision=1)
    load_init(wide, single.state_dict(), widen=True)
    x = torch.rand(1, 16, 16, 16)
    meta = {"slice_axes": [0, 1, 2], "bf16": False}
    want = predict(Model(single.eval(), {"inference": meta}, None), x)
    got = predict(Model(wide.eval(), {"inference": {**meta, "slab": 1}}, None), x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_slab_recipe_records_it_and_builds_a_multichannel_network(label_dir):
    recipe = get_recipe(slab_cfg(label_dir, **{"recipe.slab": 2}))
    assert recipe.build_model().config["in_channels"] == 5
    assert recipe.metadata()["inference"]["slab"] == 2
    assert "slab" not in get_recipe(slab_cfg(label_dir, **{"recipe.slab": 0})).metadata()["inference"]
    with pytest.raises(ValueError, match="slab"):
        get_recipe(slab_cfg(label_dir, **{"recipe.ndim": 3, "recipe.shape": [16, 16, 16]}))
    with pytest.raises(ValueError, match="slab_draw"):
        get_recipe(slab_cfg(label_dir, **{"recipe.slab_draw": "4d"}))


@pytest.mark.parametrize("draw", ["3d", "2d"])
def test_sanity_gate_tiny_slab_segmenter_fits_one_sample(label_dir, tmp_path, draw):
    """Issue 29's gate for the 2.5D network at CI size."""
    cfg = slab_cfg(label_dir, **{"recipe.slab_draw": draw, "train.optimizer": "adamw", "train.lr": 3e-3, "train.warmup": 20,
                                 "model.deep_supervision": 1, "train.bf16": False, "train.batch": 4,
                                 "recipe.voxsize": 8.0})
    train(get_recipe(cfg), tmp_path / "s", steps=300, sanity=True, log=lambda *a: None)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "s" / "log.jsonl").read_text().splitlines()]
    assert losses[0] > 1.0 and min(losses) < 0.1


def test_feature_diagnostic_reads_slabs_like_inference():
    from synthtools.training.diagnostics import features
    torch.manual_seed(0)
    single = UNet(2, 1, 4, features=(4, 8, 16), convs=1, norm="instance").eval()
    slab = UNet(2, 3, 4, features=(4, 8, 16), convs=1, norm="instance").eval()
    load_init(slab, single.state_dict())
    x = torch.rand(16, 16, 20)
    for a, b in zip(features(single, x), features(slab, x)):
        assert a.shape == b.shape and a.shape[-3:] in ((16, 16, 20), (8, 8, 20), (4, 4, 20))
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
