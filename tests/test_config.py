"""The training config schema (training/config.py): unknown keys and wrong
types fail with one line, in the library and in synthgen; every bundled and
run config loads and round-trips through the run's saved config.toml; the
code reads typed sections, so its defaults are the schema's."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from synthtools.training import config as schema
from synthtools.training.cli import main
from synthtools.training.config import Config, ConfigError, ModelSection, RecipeSection, TrainSection
from synthtools.training.loop import RUN_CONFIG, lr_at, make_optimizer, save_run_config
from synthtools.training.recipes import CONFIGS, get_recipe, load_config

REPO = Path(__file__).resolve().parents[1]
TRAINING = Path(schema.__file__).parent
RUN_CONFIGS = sorted((REPO / "runs").rglob("*.toml"))
# Historical run configs that the schema rejects: path under runs/ -> (the
# error they must give, why). "false" was a string from --set before --set
# parsed booleans; bool("false") is True, harmless only because a 2D
# network ignores channels_last.
KNOWN_INCOMPATIBLE: dict[str, tuple[str, str]] = {
    "seg_arch_pilot/2d/config.toml": ("train.channels_last = 'false': expected bool",
                                      "a string where a bool belongs (a 2D run: the key had no effect)"),
}


def error_of(*args, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unknown_key_names_key_and_allowed_keys(tmp_path):
    msg = error_of("segment", {"train.lrr": 1e-3})
    assert msg.startswith("unknown key train.lrr (allowed: ")
    allowed = msg.split("allowed: ")[1].rstrip(")").split(", ")
    assert {"lr", "lr_min", "load_aware", "threads"} <= set(allowed) and "lrr" not in allowed
    # a typo in a file is caught the same way as in an override
    text = (CONFIGS / "skullstrip.toml").read_text().replace("[model]", "[model]\nfeaturs = [4, 8]")
    (tmp_path / "typo.toml").write_text(text)
    assert error_of(tmp_path / "typo.toml").startswith("unknown key model.featurs (allowed: ")


@pytest.mark.parametrize("key, value, expect", [
    ("train.lr", "fast", "train.lr = 'fast': expected float"),
    ("train.steps", 1.5, "train.steps = 1.5: expected int"),
    ("train.steps", True, "train.steps = True: expected int"),         # a bool is not a count
    ("train.load_aware", 1, "train.load_aware = 1: expected bool"),
    ("recipe.shape", [64, 64.5], "recipe.shape = [64, 64.5]: expected a list of int"),
    ("recipe.lambda", [0, 1, 2], "recipe.lambda = [0, 1, 2]: expected a list of 2 floats"),
    ("train.lr", None, "train.lr = None: expected float"),              # only an optional key can be absent
    ("generator.noise.std", "x", "generator.noise.std = 'x': expected a list of 2 floats"),
    ("generator.nois.std", [0, 1], "unknown key generator.nois (allowed: "),
    ("generator.noise.sd", [0, 1], "unknown key generator.noise.sd (allowed: prob, std)"),
    ("trian.lr", 1e-3, "unknown section [trian] (allowed: "),
])
def test_wrong_type_or_unknown_key(key, value, expect):
    assert error_of("segment", {key: value}).startswith(expect)


def test_accepted_values_keep_their_meaning():
    cfg = load_config("segment", {"train.lr": 1, "recipe.shape": [96, 96], "train.load_aware": False,
                                  "generator.noise.std": [0, 0.2], "model.norm": None})
    # typed on reading: an int where a float belongs is a float, a list a tuple
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float and cfg.train.load_aware is False
    assert cfg.recipe.shape == (96, 96) and get_recipe(cfg).shape == (96, 96)
    assert cfg.model.norm is None and "norm" not in cfg.to_dict()["model"]   # None: absent
    assert cfg.generator.noise.std == (0, 0.2) and get_recipe(cfg).synth.config.noise.std == (0, 0.2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 0.1   # changed only through override(), which checks like a file


def test_recipe_name_needed_to_train_not_to_sample(tmp_path):
    (tmp_path / "gen.toml").write_text("[generator.noise]\nstd = [0, 0.3]\n")   # synthgen sample --config
    gen = load_config(tmp_path / "gen.toml")
    assert gen.to_dict() == {"generator": {"noise": {"std": [0, 0.3]}}} and gen.generator.noise.std == (0, 0.3)
    with pytest.raises(ConfigError, match="^recipe.name is missing"):
        get_recipe(load_config(tmp_path / "gen.toml"))
    with pytest.raises(ConfigError, match="^recipe.name = 'segmnet': not a recipe"):
        get_recipe(load_config("segment", {"recipe.name": "segmnet"}))


def test_set_values_parse_like_toml_and_python():
    from synthtools.training.cli import _overrides
    got = _overrides(["train.channels_last=false", "train.bf16=True", "train.lr=1e-3", "recipe.shape=[96,96]",
                      "train.init=synthstrip", "train.label_maps=", "train.optimizer=\"adamw\""])
    assert got == {"train.channels_last": False, "train.bf16": True, "train.lr": 1e-3, "recipe.shape": [96, 96],
                   "train.init": "synthstrip", "train.label_maps": "", "train.optimizer": "adamw"}
    load_config("segment", got)   # all of them fit the schema


def test_cli_unknown_key_is_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["train", "segment", "-o", str(out), "--steps", "1", "--set", "train.lrr=0.1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("synthgen: error: unknown key train.lrr (allowed: ")
    assert not out.exists()   # rejected before the run folder is made
    with pytest.raises(SystemExit) as e:
        main(["train", "segment", "-o", str(out), "--set", "train.threads=two"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "synthgen: error: train.threads = 'two': expected int"


def _run_key(path: Path) -> str:
    return path.relative_to(REPO / "runs").as_posix() if path in RUN_CONFIGS else ""


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")) + RUN_CONFIGS, ids=lambda p: p.parent.name + "/" + p.name)
def test_every_bundled_and_run_config_loads_and_round_trips(path, tmp_path):
    if _run_key(path) in KNOWN_INCOMPATIBLE:
        expected, _why = KNOWN_INCOMPATIBLE[_run_key(path)]
        assert error_of(path) == expected
        return
    cfg = load_config(path)
    recipe = get_recipe(cfg)
    assert recipe.voxsize == cfg.recipe.voxsize and recipe.ndim == cfg.recipe.ndim
    assert len(recipe.shape) == recipe.ndim
    # the run's saved config (what synthgen burst and a resume read) means the same
    save_run_config(recipe, tmp_path)
    back = load_config(tmp_path / RUN_CONFIG)
    assert back == cfg and back.to_dict() == cfg.to_dict()


def test_saved_run_config_keeps_the_files_leading_comment_once(tmp_path):
    """A run folder's config keeps its author's description through
    synthgen train's rewrite, a resume and an override, without stacking
    the header line."""
    src = tmp_path / "mine.toml"
    body = (CONFIGS / "segment.toml").read_text()
    body = body[body.index("["):]    # the bundled file without its own comment
    src.write_text("# Why this run exists.\n#\n# Second paragraph.\n\n" + body)
    cfg = load_config(src)
    assert cfg.note == "Why this run exists.\n\nSecond paragraph."
    run = tmp_path / "run"
    run.mkdir()
    for _ in range(2):   # a first start, then a resume from the saved file
        save_run_config(get_recipe(cfg), run)
        text = (run / RUN_CONFIG).read_text()
        assert text.startswith("# Written by synthgen train: this run's effective config.\n#\n"
                               "# Why this run exists.\n#\n# Second paragraph.\n\n[")
        assert text.count("Written by synthgen train") == 1
        cfg = load_config(run / RUN_CONFIG)
    assert cfg.override({"train.lr": 0.002}).note == cfg.note
    assert load_config(run / RUN_CONFIG, {"train.lr": 0.002}).train.lr == 0.002


def test_run_configs_are_checked():
    assert REPO / "runs" / "synthseg_2d" / "config.toml" in RUN_CONFIGS   # the long run resumes from it
    assert set(KNOWN_INCOMPATIBLE) <= {_run_key(p) for p in RUN_CONFIGS}


def test_round_trip_keeps_overrides_and_leaves_the_device_out(tmp_path):
    """load(save(cfg)) == cfg for a config changed by --set in every way a
    value can be written (int for float, tuple, None, nested generator and
    generator_moving options); train.device is the machine's, not saved."""
    cfg = load_config("rigid", {"train.lr": 3, "recipe.shape": (32, 32, 32), "model.features": [8, 16, 16],
                                "train.init": None, "generator.noise.std": [0, 0.25],
                                "generator_moving.blur.sigma": [0.5, 1], "inference.refine": [5, 5]})
    assert cfg.generator_moving.blur.sigma == (0.5, 1) and cfg.generator.blur.sigma != (0.5, 1)
    assert cfg.generator_moving.noise.std == (0, 0.25)   # the fixed image's ranges, moving's on top
    save_run_config(get_recipe(cfg.override({"train.device": "cuda"})), tmp_path)
    text = (tmp_path / RUN_CONFIG).read_text()
    assert "\ndevice =" not in text and "\ninit =" not in text and "\ninit_into =" in text
    back = load_config(tmp_path / RUN_CONFIG)
    assert back == cfg and back.train.lr == 3.0 and back.inference.refine == (5, 5)
    assert back != cfg.override({"generator_moving.blur.sigma": [0.5, 2]})   # equality sees every section
    assert back.override({"train.lr": 3.0}) == cfg


def test_override_checks_and_copies():
    cfg = load_config("segment")
    with pytest.raises(ConfigError, match=r"^unknown key train.lrr \(allowed: "):
        cfg.override({"train.lrr": 1.0})
    some = cfg.override({"validation.cases": ["ixi_t1"]})
    new = some.override({"train.lr": 1e-5, "validation.cases": None})
    assert new.train.lr == 1e-5 and some.train.lr == cfg.train.lr == 2e-3   # the originals are unchanged
    assert some.validation.cases == ("ixi_t1",) and new.validation.cases is None   # None: every case


def test_code_defaults_are_the_schemas():
    tables = load_config("skullstrip", {"train.init": ""}).to_dict()
    for key in ("voxsize", "ndim"):
        tables["recipe"].pop(key, None)
    del tables["model"]["convs"]
    recipe = get_recipe(Config.from_dict(tables))
    assert recipe.voxsize == RecipeSection.voxsize == 2.0 and recipe.ndim == RecipeSection.ndim == 3
    net = recipe.build_model()
    assert net.config["convs"] == ModelSection.convs
    opt = make_optimizer(torch.nn.Conv3d(1, 1, 3), TrainSection())
    assert opt.param_groups[0]["lr"] == TrainSection.lr and isinstance(opt, torch.optim.Adam)
    assert lr_at(0, TrainSection()) == TrainSection.lr   # constant schedule, no warm-up by default
    assert TrainSection.threads == 2 and TrainSection.load_aware is True


# A config section read as a dict (cfg["train"], cfg.get("real"), recipe.cfg[...]):
# it bypasses the schema's types and defaults.
DICT_READ = re.compile(r"\bcfg(?:\.get\(|\[)")


def test_training_code_reads_typed_sections_only():
    """Every module of training/ reads the config as attributes
    (``cfg.train.lr``): a typo is an AttributeError, a default is the
    schema's. (config.py itself builds the sections from the tables.)"""
    found = []
    for path in sorted(TRAINING.rglob("*.py")):
        if path.name == "config.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if DICT_READ.search(line):
                found.append(f"{path.relative_to(TRAINING)}:{n}: {line.strip()}")
    assert not found, found


def test_sample_config_typo_is_one_line(tmp_path, capsys):
    import nibabel as nib
    import numpy as np
    lab = np.zeros((12, 12, 12), np.int16)
    lab[3:9, 3:9, 3:9] = 2
    nib.save(nib.Nifti1Image(lab, np.eye(4)), str(tmp_path / "lab.nii.gz"))
    (tmp_path / "gen.toml").write_text("[generator.noise]\nstd = [0, 0.3]\nporb = 0.5\n")
    with pytest.raises(SystemExit) as e:
        main(["sample", str(tmp_path / "lab.nii.gz"), "-o", str(tmp_path / "s.nii.gz"),
              "--config", str(tmp_path / "gen.toml")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["synthgen: error: unknown key generator.noise.porb (allowed: prob, std)"]
    assert not (tmp_path / "s.nii.gz").exists()
