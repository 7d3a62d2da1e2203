"""Helpers shared by several test files (fixtures shared by all live in conftest.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from synthtools.cli import morph as morph_cli

ROOT = Path(__file__).resolve().parents[1]
# Configs of runs that did not learn live beside their logs in runs/, not among the
# bundled configs (the wheel leaves them out); the tests still train them.
RUN_CONFIGS = {"deform": ROOT / "runs" / "synthmorph_deform" / "config.toml",
               "deform_warmup": ROOT / "runs" / "synthmorph_deform_warmup" / "config.toml"}


# ---------------------------------------------------------------- training configs --

def tiny_cfg(name, label_dir):
    from synthtools.training.recipes import load_config
    return load_config(name, {
        "recipe.voxsize": 8.0, "recipe.shape": [16, 16, 16], "model.features": [4, 8], "model.convs": 1,
        "train.workers": 0, "train.label_maps": str(label_dir), "train.val_every": 0, "train.log_every": 1,
        "train.threads": 1, "train.init": "", "validation.cases": [],   # tiny nets: no shipped init fits
        "model.deep_supervision": 0, "train.batch": 1, "recipe.ndim": 3})   # two levels leave none to supervise


def tiny_reg_cfg(name, label_dir):
    from synthtools.training.recipes import load_config
    return load_config(RUN_CONFIGS.get(name, name), {
        "recipe.voxsize": 8.0, "recipe.shape": [16, 16, 16], "model.features": [4, 8], "model.convs": 1,
        "model.keypoints": 8, "train.workers": 0, "train.label_maps": str(label_dir), "train.val_every": 0,
        "train.log_every": 1, "train.threads": 1, "validation.cases": [], "train.init": ""})


# ---------------------------------------------------------------- synthmorph --

def affine_of(lin: np.ndarray, center, shape) -> np.ndarray:
    """vox2ras with linear part ``lin`` whose grid centre lies at ``center``."""
    aff = np.eye(4)
    aff[:3, :3] = lin
    aff[:3, 3] = np.asarray(center) - lin @ ((np.asarray(shape) - 1) / 2)
    return aff


def _exit_code(cli, args) -> int:
    """Run a CLI module's ``main`` in-process; the code it exits with."""
    try:
        cli.main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    raise AssertionError("main() returned instead of exiting")  # pragma: no cover


def synthmorph(*args, capsys=None) -> tuple[int, str]:
    code = _exit_code(morph_cli, args)
    return code, capsys.readouterr().err if capsys is not None else ""


def run_cli(cli, *args, capsys) -> tuple[int, str, str]:
    """Run a CLI module's ``main`` in-process: exit code, stdout, stderr."""
    code = _exit_code(cli, args)
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(err: str, prog: str = "synthmorph") -> str:
    """The single ``PROG: error: ...`` line of ``err`` (no traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    return lines[0]
