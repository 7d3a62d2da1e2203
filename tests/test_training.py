"""Tiny end-to-end training runs: every recipe trains a few steps on a small
synthetic label map, checkpoints, resumes and exports a loadable model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from synthtools.weights import load_model
from synthtools.training.loop import average_weights, export, lr_at, train
from synthtools.training.recipes import get_recipe
from helpers import tiny_cfg  # (tests/ is on sys.path)


@pytest.mark.parametrize("name", ["skullstrip", "segment"])
def test_tiny_training_resumes_and_exports(name, label_dir, tmp_path):
    recipe = get_recipe(tiny_cfg(name, label_dir))
    run = tmp_path / "run"
    out = train(recipe, run, steps=3, log=lambda *a: None)
    assert out["step"] == 3 and (run / "checkpoint.pt").exists()
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    out = train(recipe, run, steps=5, log=lambda *a: None)   # resume continues the step count
    assert out["step"] == 5
    recipe = get_recipe(recipe.cfg.override({"train.lr": 1e-5}))   # a resumed run follows the config's rate
    train(recipe, run, steps=6, log=lambda *a: None)
    saved = torch.load(run / "checkpoint.pt", weights_only=True)["opt"]["param_groups"]
    # (the schedule's value at the last step taken, step 5: constant, or a warm-up/decay of lr)
    assert all(g["lr"] == pytest.approx(lr_at(5, recipe.cfg.train)) for g in saved)
    assert recipe.cfg.train.schedule != "constant" or saved[0]["lr"] == 1e-5
    assert [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    dest = export(recipe, run, tmp_path / "model", name)
    model = load_model(dest)
    meta = json.loads((dest / "metadata.json").read_text())
    assert meta["steps"] == 6 and meta["recipe"] == name and len(meta["sha256"]) == 64
    # Shipped weights are half precision and hold no optimizer state.
    state = torch.load(dest / "weights.pt", weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values())
    assert model.net.config["features"] == [4, 8]
    # A run continued from earlier runs counts their steps and minutes too.
    (run / "lineage.json").write_text(json.dumps({"runs": [{"run": "a", "steps": 100, "minutes": 2.5},
                                                          {"run": "b", "steps": 20, "minutes": 0.5}]}))
    meta2 = json.loads((export(recipe, run, tmp_path / "model2", name) / "metadata.json").read_text())
    assert meta2["steps"] == 126 and meta2["run_steps"] == 6 and meta2["lineage"]["runs"][1]["run"] == "b"
    assert meta2["training_minutes"] == pytest.approx(meta["training_minutes"] + 3.0, abs=0.11)
    (run / "lineage.json").write_text(json.dumps({"runs": [{"run": "a"}]}))
    with pytest.raises(ValueError, match="steps"):
        export(recipe, run, tmp_path / "model3", name)


def test_exported_weight_average_lies_between_the_two_checkpoints(label_dir, tmp_path):
    recipe = get_recipe(tiny_cfg("skullstrip", label_dir))
    a, b = tmp_path / "a", tmp_path / "b"
    train(recipe, a, steps=2, log=lambda *x: None)
    recipe = get_recipe(recipe.cfg.override({"train.seed": 5}))   # another start: weights far apart
    train(recipe, b, steps=2, log=lambda *x: None)
    wa = torch.load(a / "checkpoint.pt", weights_only=True)["ema"]
    wb = torch.load(b / "checkpoint.pt", weights_only=True)["ema"]
    dest = export(recipe, a, tmp_path / "soup", "soup", which="last", average=b / "checkpoint.pt",
                  average_weight=0.25)
    soup = torch.load(dest / "weights.pt", weights_only=True)
    key = next(k for k in wa if k.endswith("weight"))
    expect = 0.75 * wa[key].float() + 0.25 * wb[key].float()
    assert not torch.allclose(wa[key].float(), wb[key].float())
    torch.testing.assert_close(soup[key].float(), expect, atol=2e-3, rtol=1e-2)   # fp16 shipped
    meta = json.loads((dest / "metadata.json").read_text())
    assert meta["averaged_with"]["weight"] == 0.25 and meta["averaged_with"]["step"] == 2
    assert meta["validation"] == {}   # the run's logged validation was not of the average
    assert average_weights(wa, wb, 0.0)[key].equal(wa[key])
    with pytest.raises(ValueError, match="different keys"):
        average_weights(wa, {k: v for k, v in wb.items() if k != key}, 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        average_weights(wa, wb, 1.5)


def test_sample_targets(label_dir):
    from synthtools.training.generator.dataset import load_index_map
    from synthtools.training.generator.synth import generator
    rs = get_recipe(tiny_cfg("skullstrip", label_dir))
    idx, vox = load_index_map(str(label_dir / "a.nii.gz"), rs.labels)
    s = rs.make_sample(idx, vox, generator(0))
    # One signed-distance channel per brain definition: with CSF, without.
    assert s["image"].shape == (1, 16, 16, 16) and s["target"].shape == (2, 16, 16, 16)
    assert float(s["target"].min()) >= -5 and float(s["target"].max()) <= 5
    assert (s["target"] < 0).any() and (s["target"] > 0).any()  # brain inside, head outside
    # The brain without CSF lies inside the brain with CSF: its distance is never smaller.
    assert (s["target"][1] >= s["target"][0]).all() and (s["target"][1] > s["target"][0]).any()
    sg = get_recipe(tiny_cfg("segment", label_dir))
    t = sg.make_sample(idx, vox, generator(1))["target"]
    assert t.dtype == torch.int64 and int(t.max()) < 33


def test_sanity_mode_overfits_one_sample(label_dir, tmp_path):
    recipe = get_recipe(tiny_cfg("skullstrip", label_dir).override({"train.lr": 3e-3}))
    train(recipe, tmp_path / "s", steps=150, sanity=True, log=lambda *a: None)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "s" / "log.jsonl").read_text().splitlines()]
    assert (tmp_path / "s" / "sanity_image.nii.gz").exists()
    assert min(losses[-10:]) < 0.2 * losses[0]


def test_preflight_stops_on_garbage(label_dir):
    from synthtools.training.loop import GeneratorCheckError, preflight
    cfg = tiny_cfg("skullstrip", label_dir).override({"generator.fov.proportion": [1.0, 1.0]})   # crops everything away
    with pytest.raises(GeneratorCheckError, match="no brain"):
        preflight(get_recipe(cfg))
    preflight(get_recipe(tiny_cfg("skullstrip", label_dir)))  # sane settings pass


def test_ema_is_the_running_average_of_the_weights():
    from synthtools.training.loop import EMA
    net = torch.nn.Linear(2, 1)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = EMA(net, decay=0.5)
    for value in (4.0, 8.0):
        with torch.no_grad():
            net.weight.fill_(value)
        ema.update(net)
    # 0 -> 0.5*0 + 0.5*4 = 2 -> 0.5*2 + 0.5*8 = 5
    assert torch.allclose(ema.state["weight"], torch.full((1, 2), 5.0))
    with pytest.raises(ValueError):
        EMA(net, decay=1.0)


def test_best_validation_weights_are_kept_and_exported(label_dir, tmp_path):
    """best.pt holds the weights of the best validation (here the 2nd of 3),
    export ships them by default, and a resumed run still knows that score."""
    from synthtools.training.loop import shipped_state
    recipe = get_recipe(tiny_cfg("skullstrip", label_dir).override({"train.val_every": 2, "train.ema": 0.9}))
    scores = iter([0.5, 0.9, 0.7, 0.8])
    recipe.validate = lambda net: {"case": next(scores)}
    run = tmp_path / "run"
    train(recipe, run, steps=6, log=lambda *a: None)
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["step"] == 4 and best["score"] == pytest.approx(0.9)
    last = torch.load(run / "checkpoint.pt", weights_only=True)
    assert last["best"] == pytest.approx(0.9) and "ema" in last
    # The EMA, not the raw weights, is what was validated and saved.
    assert not all(torch.equal(last["ema"][k], last["model"][k]) for k in last["model"])
    train(recipe, run, steps=8, log=lambda *a: None)          # 0.8 < 0.9: best.pt unchanged
    assert torch.load(run / "best.pt", weights_only=True)["step"] == 4
    assert shipped_state(run, "best")["step"] == 4 and shipped_state(run, "last")["step"] == 8
    dest = export(recipe, run, tmp_path / "model", "skullstrip")
    meta = json.loads((dest / "metadata.json").read_text())
    assert meta["steps"] == 4 and meta["weights_from"] == "best.pt" and meta["validation"] == {"case": 0.9}


def test_best_validation_of_an_error_metric_is_the_smallest(label_dir, tmp_path):
    """Registration validates an error in mm: best.pt keeps the lowest."""
    from synthtools.training.recipes.register import LinearRecipe
    from helpers import tiny_reg_cfg
    recipe = get_recipe(tiny_reg_cfg("rigid", label_dir).override({"train.val_every": 2}))
    assert isinstance(recipe, LinearRecipe) and not recipe.higher_is_better
    scores = iter([3.0, 1.5, 2.0])
    recipe.validate = lambda net: {"case": next(scores)}
    run = tmp_path / "run"
    train(recipe, run, steps=6, log=lambda *a: None)
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["step"] == 4 and best["score"] == pytest.approx(1.5)


def test_partial_init_transfers_matching_tensors_only():
    """A skull-stripper (2 outputs) starts a segmenter (33 outputs): every
    tensor of the same name and shape is copied, the head keeps its own
    initialisation; without ``partial`` the mismatch is an error."""
    from synthtools.nets.unet import UNet
    from synthtools.training.loop import load_init
    torch.manual_seed(0)
    src = UNet(3, 1, 2, features=[4, 8], convs=1)
    dst = UNet(3, 1, 33, features=[4, 8], convs=1)
    head_before = dst.state_dict()["head.weight"].clone()
    kept = load_init(dst, {k: v.half() for k, v in src.state_dict().items()}, partial=True)
    assert kept == ["head.bias", "head.weight"]
    for k, v in src.state_dict().items():
        if not k.startswith("head."):
            torch.testing.assert_close(dst.state_dict()[k], v.half().float())
    torch.testing.assert_close(dst.state_dict()["head.weight"], head_before)
    with pytest.raises(RuntimeError):
        load_init(UNet(3, 1, 33, features=[4, 8], convs=1), src.state_dict())
    with pytest.raises(ValueError):
        load_init(dst, {"nothing.like.it": torch.zeros(1)}, partial=True)


def test_init_accepts_a_shipped_model_name(tmp_path):
    from synthtools.weights import resolve
    from synthtools.training.loop import init_file
    assert init_file("synthstrip") == resolve("synthstrip") / "weights.pt"
    f = tmp_path / "w.pt"
    f.write_bytes(b"")
    assert init_file(str(f)) == f
    with pytest.raises(FileNotFoundError):
        init_file(str(tmp_path / "missing.pt"))


def test_dice_plus_ce_revives_a_channel_the_softmax_has_shut():
    """A structure whose logit sits far below the others gets almost no soft
    Dice gradient (the softmax is saturated), but a full cross-entropy one:
    the reason for ``recipe.loss = "dice+ce"``."""
    from synthtools.training.recipes.segment import segmentation_loss
    target = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    target[0, 2:5, 2:5, 2:5] = 2
    grads = {}
    for kind in ("dice", "dice+ce"):
        logits = torch.zeros(1, 3, 8, 8, 8)
        logits[:, 2] = -12.0      # channel 2: "dead"
        logits.requires_grad_(True)
        segmentation_loss(logits, target, kind).backward()
        grads[kind] = -logits.grad[0, 2][target[0] == 2].mean().item()   # push up inside the structure
    assert grads["dice"] > 0 and grads["dice"] < 1e-5
    assert grads["dice+ce"] > 1e3 * grads["dice"]


def test_batch_dice_charges_a_false_positive_in_a_sample_without_the_structure():
    """Two slices; channel 2 (9 voxels) is in slice 0 only, and the network
    also predicts it in slice 1. Per-sample Dice charges that only through
    slice 1's background (9 of its 64 voxels missed); the batch Dice sums
    over both slices, so channel 2 itself loses a third of its Dice."""
    from synthtools.training.recipes.segment import soft_dice_loss
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    target[0, 2:5, 2:5] = 2
    logits = torch.full((2, 3, 8, 8), -20.0)
    logits[:, 0] = 20.0
    logits[0, 0, 2:5, 2:5], logits[0, 2, 2:5, 2:5] = -20.0, 20.0     # slice 0: exact
    exact = logits.clone()
    logits[1, 0, 2:5, 2:5], logits[1, 2, 2:5, 2:5] = -20.0, 20.0     # slice 1: a false positive
    for over_batch in (False, True):
        assert float(soft_dice_loss(exact, target, over_batch=over_batch)) < 1e-4
    # per sample: (slice 0: ch 0, ch 2 exact; slice 1: ch 0 Dice 110/119) / 3 entries
    assert float(soft_dice_loss(logits, target)) == pytest.approx(9 / 119 / 3, abs=1e-4)
    # over the batch: ch 2 Dice 2*9/(18+9); ch 0 Dice 2*110/(110+119); mean of the 2 present
    assert float(soft_dice_loss(logits, target, over_batch=True)) == pytest.approx((1 / 3 + 9 / 229) / 2, abs=1e-4)


def test_segment_recipe_rejects_an_unknown_loss(label_dir):
    cfg = tiny_cfg("segment", label_dir).override({"recipe.loss": "focal"})
    with pytest.raises(ValueError, match="recipe.loss"):
        get_recipe(cfg)


def test_widened_unet_computes_what_the_narrow_one_did():
    """A wider U-Net started from a narrow one's weights gives the same
    output (any input), and its new channels get gradients at once."""
    from synthtools.nets.unet import UNet
    from synthtools.training.loop import load_init
    torch.manual_seed(0)
    # float64: the check is exact up to rounding, not up to float32's 1e-7 of ~1e3 outputs
    narrow = UNet(3, 1, 5, features=(4, 6, 8), convs=2).double()
    for p in narrow.parameters():   # non-zero biases too, so nothing passes by luck
        p.data.normal_(0, 0.3)
    wide = UNet(3, 1, 5, features=(6, 9, 12), convs=2).double()
    x = torch.randn(2, 1, 16, 12, 8, dtype=torch.float64)
    assert not torch.allclose(wide(x), narrow(x), atol=1e-3)
    assert load_init(wide, narrow.state_dict(), widen=True) == []
    torch.testing.assert_close(wide(x), narrow(x), rtol=1e-9, atol=1e-9)
    wide(x).square().mean().backward()
    # The head's weights from the new level-0 channels start at zero but learn.
    assert torch.all(wide.head.weight[:, 4:] == 0)
    assert wide.head.weight.grad[:, 4:].abs().sum() > 0
    with pytest.raises(ValueError, match="cannot narrow"):
        load_init(narrow, wide.state_dict(), widen=True)
    with pytest.raises(ValueError, match="depths differ"):
        load_init(UNet(3, 1, 5, features=(6, 9), convs=2), narrow.state_dict(), widen=True)


@pytest.mark.parametrize("ndim", [2, 3])
def test_widened_instance_norm_unet_with_deep_supervision_keeps_every_output(ndim):
    """The segmenter's kind of U-Net (instance norm, deep supervision heads,
    a 2.5D input): widened, every output (full resolution and each head) is
    the narrow network's; batch-norm networks are refused."""
    from synthtools.nets.unet import UNet
    from synthtools.training.loop import load_init
    torch.manual_seed(1)
    kw = dict(convs=2, norm="instance", deep_supervision=2)
    narrow = UNet(ndim, 3, 5, features=(4, 6, 8, 10), **kw).double()
    for p in narrow.parameters():   # scales and shifts away from 1 and 0 too
        p.data.normal_(0, 0.3)
    wide = UNet(ndim, 3, 5, features=(6, 9, 12, 16), **kw).double()
    x = torch.randn(2, 3, *(16,) * ndim, dtype=torch.float64)
    load_init(wide, narrow.state_dict(), widen=True)
    outs_wide, outs_narrow = wide.forward_all(x), narrow.forward_all(x)
    assert len(outs_wide) == 3
    for a, b in zip(outs_wide, outs_narrow):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    outs_wide[1].square().mean().backward()   # a head's weights from new channels learn
    assert torch.all(wide.aux[0].weight[:, 6:] == 0) and wide.aux[0].weight.grad[:, 6:].abs().sum() > 0
    bn = UNet(ndim, 3, 5, features=(6, 9, 12, 16), convs=2, norm="batch")
    with pytest.raises(ValueError, match="instance-norm"):
        load_init(bn, UNet(ndim, 3, 5, features=(4, 6, 8, 10), convs=2, norm="batch").state_dict(), widen=True)


def test_batch_norm_unet_round_trips_and_ignores_the_batch(tmp_path):
    """A U-Net with batch normalisation: the saved model reproduces the
    network's eval output (running statistics saved in full precision), and
    in eval mode an image's output does not depend on what shares its batch."""
    from synthtools.nets.unet import UNet
    from synthtools.weights import save_model
    torch.manual_seed(0)
    net = UNet(3, 1, 3, features=(4, 8), convs=1, norm="batch")
    for _ in range(3):   # train-mode passes move the running statistics off (0, 1)
        net(torch.rand(1, 1, 8, 8, 8) * 5 + 2)
    net.eval()
    bn = net.down[0][1]
    assert bn.running_mean.abs().sum() > 0 and not torch.allclose(bn.running_var, torch.ones(4))
    x, other = torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8) * 10
    with torch.no_grad():
        alone, together = net(x), net(torch.cat([x, other]))[:1]
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-5)
    meta = {"task": "segment", "input": {"voxsize": 8.0, "orientation": "LIA", "multiple": 2},
            "output": {"type": "softmax", "labels": [0, 2, 3]}}
    model = load_model(save_model(net, meta, tmp_path / "bn"))
    assert model.net.config["norm"] == "batch"
    saved = torch.load(tmp_path / "bn" / "weights.pt", weights_only=True)
    assert saved["down.0.1.running_var"].dtype == torch.float32 and saved["down.0.0.weight"].dtype == torch.float16
    with torch.no_grad():
        torch.testing.assert_close(model.net(x).float(), alone, rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="normalisation"):
        UNet(3, 1, 3, features=(4, 8), norm="group")




def test_segment_export_carries_the_shipped_atlases(label_dir, tmp_path):
    """A retrained segmentation network ships with atlases, so `synthseg` runs
    the whole pipeline (atlas prior) on it, not the network alone."""
    from synthtools.seg.atlas import atlas_files, default_atlases
    from synthtools.training.atlases import copy_atlases
    recipe = get_recipe(tiny_cfg("segment", label_dir))
    train(recipe, tmp_path / "run", steps=1, log=lambda *a: None)
    dest = export(recipe, tmp_path / "run", tmp_path / "model", "seg", atlases_from="synthseg")
    shipped = load_model("synthseg")
    model = load_model(dest)
    assert [f.name for f in atlas_files(model)] == [f.name for f in atlas_files(shipped)]
    assert default_atlases(model) == default_atlases(shipped) > 0
    assert all(f.read_bytes() == g.read_bytes() for f, g in zip(atlas_files(model), atlas_files(shipped)))
    assert model.meta["atlas"]["copied_from"] == "synthseg"
    # The bundled segment recipe's refinement choice travels with the weights;
    # metadata without it (older exports) keeps the original "region".
    from synthtools.seg.segmenter import refine_background
    from synthtools.weights import Model
    assert refine_background(model) == "all" == refine_background(shipped)
    assert refine_background(Model(model.net, {"task": "segment"}, dest)) == "region"
    # Without it: no atlases (the CLI's default is then --atlases 0).
    assert "atlas" not in load_model(export(recipe, tmp_path / "run", tmp_path / "bare", "seg")).meta
    # Atlases whose labels the model cannot output are refused, in one line.
    with pytest.raises(ValueError, match="not outputs of this model"):
        copy_atlases("synthseg", tmp_path / "other", labels=[0, 2, 3])
    assert not (tmp_path / "other").exists()


def test_synthgen_export_cli_atlases(label_dir, tmp_path, capsys):
    from helpers import one_error_line
    from synthtools.training.cli import main
    recipe = get_recipe(tiny_cfg("segment", label_dir))
    run = tmp_path / "run"
    train(recipe, run, steps=1, log=lambda *a: None)
    cfg = run / "config.toml"
    main(["export", str(run), "--config", str(cfg), "--dest", str(tmp_path / "m"), "--which", "last"])
    assert load_model(tmp_path / "m").meta["atlas"]["copied_from"] == "synthseg"   # the default for segment
    main(["export", str(run), "--config", str(cfg), "--dest", str(tmp_path / "n"), "--atlases-from", "none"])
    assert "atlas" not in load_model(tmp_path / "n").meta
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["export", str(run), "--config", str(cfg), "--dest", str(tmp_path / "x"), "--atlases-from", "nosuch"])
    assert e.value.code == 2
    assert "nosuch: no such model" in one_error_line(capsys.readouterr().err, "synthgen")
    assert not (tmp_path / "x").exists()   # nothing half-written
