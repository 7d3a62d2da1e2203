"""Training practice (the paper's "Practical discussion"): mixed real +
synthetic data, validation grouped by domain, the feature-invariance
diagnostic, range sweeps and pilot presets -- all on tiny volumes and nets."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import write_label_map  # noqa: E402  (tests/ is on sys.path)
from helpers import tiny_cfg  # noqa: E402

from synthtools.io import load_volume  # noqa: E402
from synthtools.nets.unet import UNet  # noqa: E402
from synthtools.training.cli import main  # noqa: E402
from synthtools.training.generator.dataset import sample_seed  # noqa: E402
from synthtools.training.generator.rng import randint  # noqa: E402
from synthtools.training.generator.synth import generator  # noqa: E402
from synthtools.training.loop import train  # noqa: E402
from synthtools.training.recipes import get_recipe, load_config  # noqa: E402

QUIET = dict(log=lambda *a, **k: None)
INTENSITY = {0: 0.0, 502: 40.0, 24: 15.0, 3: 60.0, 42: 60.0, 2: 100.0, 41: 100.0}


def write_pair(folder: Path, name: str = "s1", invert: bool = False) -> tuple[Path, Path, Path]:
    """A 'real' scan of the phantom head (4 mm, 48^3), its label map and brain mask."""
    folder.mkdir(parents=True, exist_ok=True)
    lab_path = write_label_map(folder / f"{name}_labels.nii.gz")
    lab = np.asarray(nib.load(str(lab_path)).dataobj)
    img = np.vectorize(INTENSITY.get)(lab).astype(np.float32)
    if invert:
        img = np.where(lab > 0, 110.0 - img, 0.0).astype(np.float32)
    img += np.random.default_rng(0).normal(0, 2, img.shape).astype(np.float32)
    aff = np.diag([4.0, 4.0, 4.0, 1.0])
    nib.save(nib.Nifti1Image(img, aff), str(folder / f"{name}_image.nii.gz"))
    mask = ((lab > 0) & (lab < 500)).astype(np.uint8)
    nib.save(nib.Nifti1Image(mask, aff), str(folder / f"{name}_mask.nii.gz"))
    return folder / f"{name}_image.nii.gz", lab_path, folder / f"{name}_mask.nii.gz"


@pytest.fixture
def pairs(tmp_path):
    """Training list (image,labels) and validation list (image,labels,domain,name)."""
    d = tmp_path / "real"
    a = write_pair(d, "s1")
    b = write_pair(d, "s2", invert=True)
    (d / "train.csv").write_text(f"image,labels\n{a[0].name},{a[1].name}\n")
    (d / "train_mask.csv").write_text(f"{a[0]},{a[2]}\n")
    (d / "val.csv").write_text(f"# my sets\n{a[0].name},{a[1].name},siteA,p1\n{b[0].name},{b[1].name},siteB\n")
    return d


# ---------------------------------------------------------------- mixed data

def test_real_steps_interleave_exactly():
    from synthtools.training.realdata import is_real_step
    assert [i for i in range(12) if is_real_step(i, 0.25)] == [3, 7, 11]
    assert sum(is_real_step(i, 0.3) for i in range(1000)) == 300
    assert all(is_real_step(i, 1.0) for i in range(10))


def test_real_sample_uses_the_recipe_targets(label_dir, pairs):
    img, lab = load_volume(pairs / "s1_image.nii.gz"), load_volume(pairs / "s1_labels.nii.gz", dtype=None)
    strip = get_recipe(tiny_cfg("skullstrip", label_dir))
    s = strip.make_real_sample(img, lab, generator(0))
    assert set(s) == {"image", "target"} and s["image"].shape == (1, 16, 16, 16)
    assert s["target"].shape == (2, 16, 16, 16)   # brain with CSF, without
    assert 0 <= float(s["image"].min()) and float(s["image"].max()) <= 1
    assert (s["target"] < 0).any() and (s["target"] > 0).any() and float(s["target"].abs().max()) <= 5
    # A brain mask (with CSF) instead of labels gives the same with-CSF target;
    # a mask has one convention, so every channel learns it.
    cfg = tiny_cfg("skullstrip", label_dir).override({"real.target": "mask"})
    m = get_recipe(cfg).make_real_sample(img, load_volume(pairs / "s1_mask.nii.gz"), generator(0))
    assert torch.equal(m["target"][0], s["target"][0]) and torch.equal(m["image"], s["image"])
    assert torch.equal(m["target"][1], m["target"][0])
    seg = get_recipe(tiny_cfg("segment", label_dir))
    t = seg.make_real_sample(img, lab, generator(1))["target"]
    assert t.dtype == torch.int64 and t.shape == (16, 16, 16) and 3 <= t.unique().numel() and int(t.max()) < 33


@pytest.mark.parametrize("ratio", [0.5, 1.0])
def test_mixed_and_real_only_training(label_dir, pairs, tmp_path, ratio):
    cfg = tiny_cfg("skullstrip", label_dir).override({"real.pairs": str(pairs / "train.csv"), "real.ratio": ratio})
    if ratio == 1.0:   # the real-only baseline needs no label maps
        cfg = cfg.override({"train.label_maps": str(tmp_path / "none")})
    recipe = get_recipe(cfg)
    ds = recipe.dataset()
    real = ds.sample(0, 1)   # sample 1 is real for both ratios
    gen = generator(sample_seed(0, 0, 1))
    assert randint(gen, 0, 0) == 0          # the pair draw, then the crop
    ref = recipe.real_sample(ds.prepared(0), gen)
    assert torch.equal(real["target"], ref["target"])
    out = train(recipe, tmp_path / "run", steps=2, **QUIET)
    assert out["step"] == 2


# ---------------------------------------------------------------- validation by domain

def test_group_means():
    from synthtools.metrics import with_group_means
    from synthtools.training.realdata import case_group
    from synthtools.evaluation import STRIP_CASES
    m = with_group_means({"a": 0.8, "b": 0.6, "c_mean": 0.5, "c_large": 0.9, "d_CSF": 0.2, "d_GM": 0.4},
                         {"a": "T1", "b": "T1", "c": "T2", "d": "T2", "missing": "CT"})
    assert m["mean_T1"] == pytest.approx(0.7) and m["mean_T2"] == pytest.approx((0.5 + 0.3) / 2)
    assert "mean_CT" not in m and m["a"] == 0.8
    by = {c.name: case_group(c) for c in STRIP_CASES}
    assert by["lesjak_study1_T1W"] == by["brainweb_T1"] == "T1" and by["ct_template"] == "CT"
    assert case_group(STRIP_CASES[0], "site") == "lesjak"


def test_validation_scores_real_pairs_per_domain(label_dir, pairs, tmp_path):
    from synthtools.training.loop import plot_log
    from synthtools.training.realdata import read_pairs, score_seg_pairs
    recipe = get_recipe(tiny_cfg("skullstrip", label_dir).override({"validation.real_pairs": str(pairs / "val.csv")}))
    torch.manual_seed(0)
    m = recipe.validate(recipe.build_model().eval())
    assert set(m) == {"p1", "s2_image", "mean_siteA", "mean_siteB"}
    assert m["mean_siteA"] == m["p1"] and all(0 <= v <= 1 for v in m.values())
    # Segmentation scores label maps in SynthSeg space: a perfect prediction gives Dice 1.
    seg = get_recipe(tiny_cfg("segment", label_dir))
    lut = seg.labels.synthseg_lut().numpy()
    to_ss = lambda lab: lut[seg.labels.to_index(lab)]  # noqa: E731
    perfect = lambda v: to_ss(load_volume(pairs / "s1_labels.nii.gz", dtype=None).data)  # noqa: E731
    d = score_seg_pairs(perfect, read_pairs(pairs / "val.csv", need_domain=True), to_ss)
    assert d["p1_mean"] == 1.0 and d["s2_image_mean"] == 1.0
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "loss": 1.0}, {"step": 1, "val": m}, {"step": 2, "val": m}]))
    plot_log(log, tmp_path / "log.png")
    assert (tmp_path / "log.png").stat().st_size > 0


# ---------------------------------------------------------------- invariance

def test_invariance_identical_and_inverted():
    from synthtools.training.diagnostics import invariance
    torch.manual_seed(0)
    net = UNet(3, 1, 1, features=(4, 8, 8), convs=1).eval()
    g = torch.meshgrid(*[torch.linspace(-1, 1, 24)] * 3, indexing="ij")
    r = torch.sqrt(sum(x ** 2 for x in g))
    x = torch.where(r < 0.5, 1.0, torch.where(r < 0.7, 0.4, torch.where(r < 0.9, 0.7, 0.0)))
    x = x + 0.05 * torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) * (r < 0.9)
    same, *_ = invariance(net, x, x.clone())
    assert len(same) == 5
    for s in same:
        assert s.ncc == pytest.approx(1.0, abs=1e-6) and s.mad == pytest.approx(0.0, abs=1e-6)
    inverse = torch.where(r < 0.9, 1.0 - x, 0.0)
    inv, *_ = invariance(net, x, inverse)
    assert inv[0].ncc < 0.9 and inv[0].mad > 0.1


def test_invariance_cli(tmp_path, pairs):
    from synthtools.weights import save_model
    torch.manual_seed(0)
    net = UNet(3, 1, 1, features=(4, 8), convs=1)
    meta = {"task": "skullstrip", "input": {"voxsize": 8.0, "orientation": "LIA", "multiple": 2},
            "output": {"type": "signed_distance_mm", "band_mm": 5.0}, "inference": {"bf16": False}}
    model = save_model(net, meta, tmp_path / "model")
    prefix = tmp_path / "inv" / "t1_t2"
    assert main(["invariance", str(model), str(pairs / "s1_image.nii.gz"), str(pairs / "s2_image.nii.gz"),
                 "-o", str(prefix), "--threads", "1"]) is None
    rows = (tmp_path / "inv" / "t1_t2.csv").read_text().splitlines()
    assert rows[0] == "layer,channels,grid,ncc,mad" and len(rows) == 1 + 3
    assert "| layer |" in (tmp_path / "inv" / "t1_t2.md").read_text()
    assert (tmp_path / "inv" / "t1_t2.png").stat().st_size > 0


# ---------------------------------------------------------------- sweeps

def test_sweep_two_values(label_dir, pairs, tmp_path, capsys):
    from synthtools.training.presets import dump_toml
    cfg = tiny_cfg("skullstrip", label_dir).override({"validation.real_pairs": str(pairs / "val.csv")})
    config = tmp_path / "tiny.toml"
    config.write_text(dump_toml(cfg.to_dict()))
    init = tmp_path / "init"
    train(get_recipe(load_config(config)), init, steps=1, **QUIET)
    out = tmp_path / "sweep"
    main(["sweep", str(config), "--param", "generator.noise.std", "--values", "[0,0.05]", "[0, 0.2]",
          "--init", str(init / "checkpoint.pt"), "--steps", "2", "-o", str(out), "--threads", "1"])
    md = (out / "sweep.md").read_text()
    assert "[0, 0.05]" in md and "[0, 0.2]" in md and "siteA" in md and "siteB" in md
    assert (out / "sweep.png").stat().st_size > 0
    res = json.loads((out / "sweep.json").read_text())["results"]
    assert [r["value"] for r in res] == [[0, 0.05], [0, 0.2]]
    assert all("mean_siteA" in r["val"] for r in res)
    runs = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(runs) == 2
    for run in runs:
        assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 2
    assert capsys.readouterr().out.count(f"initialised from {init / 'checkpoint.pt'}") == 2   # same warm start
    # The override reached the generator.
    s = get_recipe(load_config(config, {"generator.noise.std": [0, 0.2]})).synth.config.noise.std
    assert tuple(s) == (0, 0.2)


# ---------------------------------------------------------------- presets

def test_presets(tmp_path):
    base = load_config("skullstrip")
    assert main(["preset", "skullstrip", "--half", "-o", str(tmp_path / "half.toml")]) is None
    half = load_config(tmp_path / "half.toml")
    assert half.recipe.voxsize == 2 * base.recipe.voxsize
    assert half.recipe.shape == (48, 48, 48)
    assert half.model == base.model and half.generator == base.generator
    assert half.train == base.train and half.validation == base.validation
    seg = tmp_path / "seg_half.toml"
    main(["preset", "segment_v1", "--half", "-o", str(seg)])   # the 3D config of the shipped model
    full = load_config("segment_v1").recipe.shape
    # Half the crop, rounded up to the net's multiple (16 voxels).
    assert load_config(seg).recipe.shape == tuple(-(-n // 2 // 16) * 16 for n in full)
    main(["preset", "skullstrip", "--2d", "-o", str(tmp_path / "2d.toml")])
    two = load_config(tmp_path / "2d.toml")
    assert two.recipe.ndim == 2 and two.recipe.shape == (96, 96) and two.train.channels_last is False
    assert two.recipe.voxsize == base.recipe.voxsize and two.generator == base.generator
    assert "voxsize" in (tmp_path / "half.toml").read_text().splitlines()[1]   # documented in the header
    main(["preset", "segment_v1", "--2d", "-o", str(tmp_path / "seg2d.toml")])
    seg2d = load_config(tmp_path / "seg2d.toml")   # 3D init weights cannot start a 2D net
    assert "init" not in seg2d.to_dict()["train"] and seg2d.train.init is None
    assert load_config(tmp_path / "seg_half.toml").train.init == "synthstrip"   # same net: kept


def test_toml_roundtrip():
    import tomllib
    from synthtools.training.presets import dump_toml
    cfg = {"a": {"x": 1, "y": [1.5, 2], "s": "q\"t", "b": True, "n": None, "sub": {"z": [0, 1]}}, "c": {"k": -1e-3}}
    back = tomllib.loads(dump_toml(cfg, "header\nline two"))
    del cfg["a"]["n"]
    assert back == cfg


def test_2d_skullstrip_trains(label_dir, pairs, tmp_path):
    cfg = tiny_cfg("skullstrip", label_dir).override({
        "recipe.ndim": 2, "validation.real_pairs": str(pairs / "val.csv"),
        "real.pairs": str(pairs / "train.csv"), "real.ratio": 0.5})
    recipe = get_recipe(cfg)
    assert recipe.shape == (16, 16) and recipe.build_model().ndim == 2
    s = recipe.dataset().sample(0, 0)
    assert s["image"].shape == (1, 16, 16) and s["target"].shape == (2, 16, 16) and (s["target"] < 0).any()
    r = recipe.dataset().sample(0, 1)   # a real pair, sliced
    assert r["image"].shape == (1, 16, 16) and r["target"].shape == (2, 16, 16)
    out = train(recipe, tmp_path / "run2d", steps=2, **QUIET)
    assert out["step"] == 2
    net = recipe.build_model()
    net.load_state_dict(torch.load(tmp_path / "run2d" / "checkpoint.pt", weights_only=True)["model"])
    m = recipe.validate(net.eval())   # slice-wise inference on the 3D validation scans
    assert "p1" in m and "mean_siteA" in m
    # The exported 2D model runs through the ordinary tool path, slice by slice.
    from synthtools.skullstrip import strip
    from synthtools.weights import load_model
    from synthtools.training.loop import export
    model = load_model(export(recipe, tmp_path / "run2d", tmp_path / "m2d", "m2d"))
    vol = load_volume(pairs / "s1_image.nii.gz")
    res = strip(model, vol)
    assert model.net.ndim == 2 and res.sdt.shape == vol.shape and np.isfinite(res.sdt).all()
    seg = tiny_cfg("segment", label_dir).override({"recipe.ndim": 2})
    t = get_recipe(seg).dataset().sample(0, 3)["target"]
    assert t.shape == (16, 16) and t.dtype == torch.int64
