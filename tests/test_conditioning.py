"""The segmentation network's conditioning: normalisation, deep supervision,
the learning-rate schedule, the single-sample sanity gate, inference on
windows or slices, the contrast-consistency metric and the GPU burst command
(run here on the CPU)."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from synthtools.nets.unet import UNet
from synthtools.weights import Model, load_model, save_model
from synthtools.training.config import TrainSection
from synthtools.training.loop import lr_at, make_optimizer, train
from synthtools.training.recipes import get_recipe, load_config
from synthtools.training.recipes.segment import deep_supervision_loss, segmentation_loss


def tiny_seg_cfg(label_dir, **extra):
    base = {"recipe.voxsize": 8.0, "recipe.shape": [16, 16, 16], "model.features": [8, 16, 32],
            "model.convs": 1, "model.norm": "instance", "train.workers": 0, "train.label_maps": str(label_dir),
            "recipe.ndim": 3, "train.batch": 1, "model.deep_supervision": 0,
            "train.val_every": 0, "train.log_every": 1, "train.threads": 1, "train.init": "",
            "validation.cases": []}
    return load_config("segment", {**base, **extra})


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainSection(lr=1e-3, warmup=100, schedule="cosine", steps=1100, lr_min=1e-5)
    assert lr_at(0, cfg) == pytest.approx(1e-5)
    assert lr_at(50, cfg) == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5))
    assert lr_at(100, cfg) == pytest.approx(1e-3)
    assert lr_at(600, cfg) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)   # half-way down the cosine
    assert lr_at(1100, cfg) == pytest.approx(1e-5) and lr_at(5000, cfg) == pytest.approx(1e-5)
    lrs = [lr_at(s, cfg) for s in range(100, 1101, 50)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    poly = dataclasses.replace(cfg, schedule="poly")
    assert lr_at(600, poly) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 ** 0.9)
    assert lr_at(10, TrainSection(lr=2e-4)) == 2e-4   # the default: constant, no warm-up
    assert lr_at(600, dataclasses.replace(cfg, lr_min=None)) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)  # lr / 100
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, TrainSection(schedule="step"))


def test_adamw_decays_convolution_weights_only():
    net = UNet(3, 1, 2, features=(4, 8), convs=1, norm="instance")
    opt = make_optimizer(net, TrainSection(optimizer="adamw", weight_decay=0.05, lr=1e-3))
    decayed, free = opt.param_groups
    assert decayed["weight_decay"] == 0.05 and free["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in free["params"])
    with pytest.raises(ValueError, match="optimizer"):
        make_optimizer(net, TrainSection(optimizer="lbfgs"))


def test_instance_norm_unet_output_depends_on_the_image_alone(tmp_path):
    torch.manual_seed(0)
    net = UNet(3, 1, 3, features=(4, 8, 16), convs=2, norm="instance", deep_supervision=1).eval()
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        alone = net(x)
        together = net(torch.cat([x, 10 * torch.rand(1, 1, 16, 16, 16)]))[:1]
        # Instance statistics: scaling the intensities changes nothing.
        rescaled = net(3 * x)
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone, rescaled, rtol=1e-3, atol=1e-3)
    assert alone.shape == (1, 3, 16, 16, 16)
    net.train()
    outs = net(x)   # training mode: every supervised level
    assert [tuple(o.shape) for o in outs] == [(1, 3, 16, 16, 16), (1, 3, 8, 8, 8)]
    meta = {"task": "segment", "input": {"voxsize": 8.0, "orientation": "LIA", "multiple": 4},
            "output": {"type": "softmax", "labels": [0, 2, 3]}}
    model = load_model(save_model(net.eval(), meta, tmp_path / "in"))
    assert model.net.config["norm"] == "instance" and model.net.config["deep_supervision"] == 1
    with torch.no_grad():
        torch.testing.assert_close(model.net(x).float(), alone, rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="deep_supervision"):
        UNet(3, 1, 3, features=(4, 8), deep_supervision=1)


def test_deep_supervision_loss_weights_every_level():
    target = torch.randint(0, 3, (1, 8, 8, 8))
    perfect = torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float() * 40
    coarse_target = target[:, ::2, ::2, ::2]
    coarse_perfect = torch.nn.functional.one_hot(coarse_target, 3).movedim(-1, 1).float() * 40
    assert float(deep_supervision_loss([perfect, coarse_perfect], target, "dice+ce")) < 1e-3
    wrong = torch.zeros_like(coarse_perfect)
    full = float(segmentation_loss(perfect, target, "dice"))
    mixed = float(deep_supervision_loss([perfect, wrong], target, "dice"))
    # Weights 1 and 1/2, normalised: the coarse level's loss counts a third.
    assert mixed == pytest.approx((full + 0.5 * float(segmentation_loss(wrong, coarse_target, "dice"))) / 1.5)
    assert float(deep_supervision_loss(perfect, target)) == pytest.approx(full)


@pytest.mark.parametrize("ndim", [3, 2])
def test_sanity_gate_tiny_instance_norm_segmenter_fits_one_sample(ndim, label_dir, tmp_path):
    """The gate of issue 29 at CI size, for the 3D network and for the
    bundled 2D one (slices of 16x16, batch 4): one fixed sample, the
    recipe's loss (soft Dice + cross-entropy) below 0.1 within 300 steps."""
    cfg = tiny_seg_cfg(label_dir, **{"train.optimizer": "adamw", "train.lr": 3e-3, "train.warmup": 20,
                                     "model.deep_supervision": 1, "train.bf16": False, "recipe.ndim": ndim,
                                     "train.batch": 4 if ndim == 2 else 1, "train.channels_last": ndim == 3})
    train(get_recipe(cfg), tmp_path / "s", steps=300, sanity=True, log=lambda *a: None)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "s" / "log.jsonl").read_text().splitlines()]
    assert losses[0] > 1.0 and min(losses) < 0.1


class _Pointwise(torch.nn.Module):
    """A per-voxel network (1x1 convolution): its output at a voxel depends
    on that voxel alone, so windowed and slice-wise inference must equal a
    whole-volume pass exactly."""

    def __init__(self, ndim: int):
        super().__init__()
        self.ndim = ndim
        self.conv = {2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[ndim](1, 2, 1)

    def forward(self, x):
        return self.conv(x)


def test_windowed_inference_blends_windows_into_the_whole_volume():
    from synthtools.infer import patch_starts, predict
    torch.manual_seed(0)
    net = _Pointwise(3)
    x = torch.rand(1, 40, 24, 16)
    whole = predict(Model(net, {"inference": {}}, None), x)
    windowed = predict(Model(net, {"inference": {"patch": [16, 16, 16]}}, None), x)
    torch.testing.assert_close(windowed, whole, rtol=1e-5, atol=1e-5)
    assert patch_starts(40, 16) == [0, 8, 16, 24] and patch_starts(16, 16) == [0] and patch_starts(8, 16) == [0]


def test_slice_inference_fuses_three_orientations():
    from synthtools.infer import predict
    torch.manual_seed(0)
    net2d, net3d = _Pointwise(2), _Pointwise(3)
    net3d.conv.weight.data = net2d.conv.weight.data[..., None]
    net3d.conv.bias.data = net2d.conv.bias.data
    x = torch.rand(1, 16, 12, 8)
    want = predict(Model(net3d, {}, None), x)
    for axes in ([2], [0, 1, 2]):
        got = predict(Model(net2d, {"inference": {"slice_axes": axes}}, None), x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_instance_norm_recipe_records_its_inference_window(label_dir):
    recipe = get_recipe(tiny_seg_cfg(label_dir))
    assert recipe.metadata()["inference"]["patch"] == [16, 16, 16]
    plain = get_recipe(tiny_seg_cfg(label_dir, **{"model.norm": None}))
    assert "patch" not in plain.metadata()["inference"]
    assert recipe.metadata()["inference"]["bf16"] is False


def test_2d_recipe_records_three_axis_fusion_in_bf16(label_dir):
    meta = get_recipe(tiny_seg_cfg(label_dir, **{"recipe.ndim": 2})).metadata()["inference"]
    assert meta["slice_axes"] == [0, 1, 2] and meta["bf16"] is True and "patch" not in meta


def test_contrast_consistency_is_one_for_identical_labels_and_drops_with_a_shift(tmp_path):
    import nibabel as nib
    from synthtools.evaluation import ConsistencySet, score_consistency
    from synthtools.metrics import tissue_consistency
    lab = np.zeros((24, 24, 24), np.int32)
    lab[4:20, 4:20, 4:20] = 24    # CSF
    lab[6:18, 6:18, 6:18] = 3     # cortex
    lab[8:16, 8:16, 8:16] = 2     # white matter
    assert tissue_consistency(lab, lab) == 1.0
    shifted = np.roll(lab, 1, axis=0)
    assert 0.5 < tissue_consistency(lab, shifted) < 0.95
    # Through the scoring path: three "contrasts" on one grid, labels from a fake segmenter.
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    for name, value in (("t1", 1.0), ("t2", 2.0), ("pd", 3.0)):
        img = (lab > 0) * value + 0.5   # a constant image is refused as empty
        nib.save(nib.Nifti1Image(img.astype(np.float32), affine), str(tmp_path / f"{name}.nii.gz"))
    cset = ConsistencySet("toy", (("T1", "t1.nii.gz"), ("T2", "t2.nii.gz"), ("PD", "pd.nii.gz")))

    def predict(vol):   # T1 exact, T2 shifted by one voxel, PD exact
        return shifted if float(vol.data.max()) == 2.5 else lab
    scores = score_consistency(predict, [cset], root=tmp_path)
    assert scores["consistency_toy_PD"] == 1.0
    assert scores["consistency_toy_T2"] == pytest.approx(tissue_consistency(lab, shifted))
    assert scores["consistency_mean"] == pytest.approx((1.0 + scores["consistency_toy_T2"]) / 2)


def test_consistency_ceiling_is_one_on_one_grid_and_below_one_across_slice_grids(tmp_path):
    """The perfect segmenter behind consistency_ceiling: on the anatomy's own
    grid it returns the anatomy; on 4 mm slices it returns each slab's
    majority class, so a 3 mm- and a 4 mm-slice scan of one anatomy disagree."""
    import nibabel as nib
    from synthtools.evaluation import CEILING_ANATOMY, ConsistencySet, _perfect_labels, consistency_ceiling
    from synthtools.io import Volume
    classes = np.zeros((40, 40, 40), np.int16)
    classes[5:35, 5:35, 5:35] = 1
    for z in range(6, 34):                          # thin GM/WM layers along z, 1-2 mm each
        classes[6:34, 6:34, z] = 2 if z % 3 else 3
    anatomy = Volume(classes.astype(np.float32), np.eye(4))
    own = _perfect_labels(anatomy, np.eye(4), anatomy)
    assert np.array_equal(own, np.array([0, 24, 3, 2])[classes])
    thick = Volume(np.zeros((40, 40, 10), np.float32), np.diag([1.0, 1.0, 4.0, 1.0]))
    slabs = _perfect_labels(thick, np.eye(4), anatomy)
    assert slabs.shape == (40, 40, 10)
    assert np.all(slabs[20, 20, 2:8] == 3)          # GM is 2 of every 3 mm: the majority of each slab
    # Through the scoring path: T1 on 3 mm slices, T2 on 4 mm, PD on T1's grid.
    (tmp_path / CEILING_ANATOMY).parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(classes, np.eye(4)), str(tmp_path / CEILING_ANATOMY))
    for name, zoom in (("t1", 3.0), ("t2", 4.0), ("pd", 3.0)):
        n = int(40 / zoom)
        img = np.ones((40, 40, n), np.float32) + np.arange(n)   # not constant
        nib.save(nib.Nifti1Image(img, np.diag([1.0, 1.0, zoom, 1.0])), str(tmp_path / f"{name}.nii.gz"))
    cset = ConsistencySet("toy", (("T1", "t1.nii.gz"), ("T2", "t2.nii.gz"), ("PD", "pd.nii.gz")))
    ceiling = consistency_ceiling([cset], root=tmp_path)
    assert ceiling["consistency_toy_PD"] == 1.0
    assert ceiling["consistency_toy_T2"] < 0.95


def test_burst_continues_a_run_in_place_on_the_cpu(label_dir, tmp_path):
    """The GPU burst command, dry-run on the CPU at a tiny size: it reads
    the run's own config, resumes its checkpoint and writes it back."""
    from synthtools.training.cli import main
    run = tmp_path / "run"
    cfg = tiny_seg_cfg(label_dir, **{"train.optimizer": "adamw", "train.warmup": 2, "train.schedule": "cosine",
                                     "train.steps": 20, "train.device": "cpu"})
    train(get_recipe(cfg), run, steps=3, log=lambda *a: None)
    saved = (run / "config.toml").read_text()
    assert "device" not in saved and 'norm = "instance"' in saved
    main(["burst", str(run), "--minutes", "5", "--steps", "5", "--device", "cpu"])
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["step"] == 5
    assert math.isclose(state["opt"]["param_groups"][0]["lr"], lr_at(4, cfg.train), rel_tol=1e-6)
    with pytest.raises(SystemExit):
        main(["burst", str(tmp_path), "--minutes", "1", "--device", "cpu"])   # not a run folder


def test_compact_checkpoint_resumes_with_a_rewarm(label_dir, tmp_path):
    """The committed form of a run: fp16 weights and EMA, no optimizer;
    training resumes from it, rebuilding Adam and easing the rate back in."""
    from synthtools.training.loop import REWARM_STEPS, compact_checkpoint, rewarm
    cfg = tiny_seg_cfg(label_dir, **{"train.optimizer": "adamw", "train.ema": 0.9})
    run = tmp_path / "run"
    train(get_recipe(cfg), run, steps=3, log=lambda *a: None)
    full = torch.load(run / "checkpoint.pt", weights_only=True)
    sizes = compact_checkpoint(run / "checkpoint.pt")
    assert sizes["after"] < 0.5 * sizes["before"]
    small = torch.load(run / "checkpoint.pt", weights_only=True)
    assert "opt" not in small and small["step"] == 3
    assert all(v.dtype == torch.float16 for v in small["ema"].values() if v.is_floating_point())
    for k, v in full["model"].items():
        torch.testing.assert_close(small["model"][k].float(), v.float(), rtol=1e-3, atol=1e-3)
    said = []
    train(get_recipe(cfg), run, steps=5, log=said.append)
    assert any("optimizer state rebuilt" in s for s in said)
    after = torch.load(run / "checkpoint.pt", weights_only=True)
    assert after["step"] == 5 and "opt" in after
    assert after["opt"]["param_groups"][0]["lr"] == pytest.approx(lr_at(4, cfg.train) * rewarm(4, 3))
    assert rewarm(3, 3) == pytest.approx(0.01) and rewarm(3 + REWARM_STEPS, 3) == 1.0 and rewarm(7, None) == 1.0


def test_bundled_segment_recipe_is_the_fused_2d_design():
    recipe = get_recipe(load_config("segment"))
    net = recipe.build_model()
    assert recipe.ndim == 2 and net.ndim == 2 and net.config["norm"] == "instance"
    assert net.config["deep_supervision"] == 2 and recipe.shape == (128, 128)
    assert recipe.metadata()["inference"]["slice_axes"] == [0, 1, 2]
    assert lr_at(0, recipe.cfg.train) < lr_at(500, recipe.cfg.train) == pytest.approx(2e-3)


def test_final_checkpoint_survives_the_dataloader_worker_dying_on_sigterm(tmp_path, monkeypatch):
    """scancel/pkill signal the whole process group: the DataLoader worker
    dies too and torch raises inside the final save; it is retried."""
    import synthtools.training.loop as loop
    calls = []
    real = loop._save_checkpoint

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.")
        return real(*a, **k)
    monkeypatch.setattr(loop, "_save_checkpoint", flaky)
    net = UNet(3, 1, 2, features=(4, 8), convs=1)
    opt = torch.optim.Adam(net.parameters())
    loop._final_checkpoint(tmp_path / "c.pt", net, opt, 7, 1.0, None, None)
    assert len(calls) == 2 and torch.load(tmp_path / "c.pt", weights_only=True)["step"] == 7
    monkeypatch.setattr(loop, "_save_checkpoint", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk")))
    with pytest.raises(RuntimeError, match="disk"):
        loop._final_checkpoint(tmp_path / "d.pt", net, opt, 7, 1.0, None, None)
