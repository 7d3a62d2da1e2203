"""The training config schema (training/config.py): unknown keys and wrong
types fail with one line, in the library and in synthgen; every bundled and
run config loads; the code's defaults are the schema's."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from synthtools.training import config as schema
from synthtools.training.cli import main
from synthtools.training.config import MODEL, RECIPE, TRAIN, ConfigError
from synthtools.training.loop import lr_at, make_optimizer
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
    ("generator.noise.std", "x", "generator.noise.std = 'x': expected a list of float"),
    ("generator.nois.std", [0, 1], "unknown key generator.nois (allowed: "),
    ("generator.noise.sd", [0, 1], "unknown key generator.noise.sd (allowed: prob, std)"),
    ("trian.lr", 1e-3, "unknown section [trian] (allowed: "),
])
def test_wrong_type_or_unknown_key(key, value, expect):
    assert error_of("segment", {key: value}).startswith(expect)


def test_accepted_values_keep_their_meaning():
    cfg = load_config("segment", {"train.lr": 1, "recipe.shape": [96, 96], "train.load_aware": False,
                                  "generator.noise.std": [0, 0.2]})
    assert cfg["train"]["lr"] == 1 and cfg["train"]["load_aware"] is False   # an int is a valid float
    assert get_recipe(cfg).synth.config.noise.std == (0, 0.2)


def test_recipe_name_needed_to_train_not_to_sample(tmp_path):
    (tmp_path / "gen.toml").write_text("[generator.noise]\nstd = [0, 0.3]\n")   # synthgen sample --config
    assert load_config(tmp_path / "gen.toml") == {"generator": {"noise": {"std": [0, 0.3]}}}
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
def test_every_bundled_and_run_config_loads(path):
    if _run_key(path) in KNOWN_INCOMPATIBLE:
        expected, _why = KNOWN_INCOMPATIBLE[_run_key(path)]
        assert error_of(path) == expected
        return
    cfg = load_config(path)
    recipe = get_recipe(cfg)
    assert recipe.voxsize == float(cfg["recipe"].get("voxsize", RECIPE.voxsize))
    assert len(recipe.shape) == recipe.ndim


def test_run_configs_are_checked():
    assert REPO / "runs" / "synthseg_2d" / "config.toml" in RUN_CONFIGS   # the long run resumes from it
    assert set(KNOWN_INCOMPATIBLE) <= {_run_key(p) for p in RUN_CONFIGS}


def test_code_defaults_are_the_schemas():
    cfg = load_config("skullstrip", {"train.init": ""})
    for key in ("voxsize", "ndim"):
        cfg["recipe"].pop(key, None)
    del cfg["model"]["convs"]
    recipe = get_recipe(cfg)
    assert recipe.voxsize == RECIPE.voxsize == 2.0 and recipe.ndim == RECIPE.ndim == 3
    net = recipe.build_model()
    assert net.config["convs"] == MODEL.convs
    opt = make_optimizer(torch.nn.Conv3d(1, 1, 3), {})
    assert opt.param_groups[0]["lr"] == TRAIN.lr and isinstance(opt, torch.optim.Adam)
    assert lr_at(0, {}) == TRAIN.lr   # constant schedule, no warm-up by default
    assert TRAIN.threads == 2 and TRAIN.load_aware is True


# receiver.get("key", <literal>): a literal default written outside the schema
LITERAL_DEFAULT = re.compile(r'(?:cfg|\br|\bm|\bt|real|opts|\bv|\))\.get\("(\w+)",\s*'
                             r'(-?[\d.][\w.]*|True|False|"[^"]*"|\(|\[)')


def test_no_literal_default_outside_the_schema():
    """loop.py and the recipes read each schema key with the schema's
    default (``TRAIN.lr``), never a literal of their own; keys whose
    schema default is None (per-recipe, like recipe.shape) are exempt."""
    keys = {k for cls in schema.SECTIONS.values() for k, f in schema.section_keys(cls).items()
            if f.default is not None}
    found = []
    for path in [TRAINING / "loop.py", TRAINING / "cli.py", *sorted((TRAINING / "recipes").glob("*.py"))]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            found += [f"{path.name}:{n}: {m.group(0)}" for m in LITERAL_DEFAULT.finditer(line) if m.group(1) in keys]
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
