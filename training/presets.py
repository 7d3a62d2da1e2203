"""Pilot presets: derived configs for the paper's reduced problems.

``half``: half resolution. ``recipe.voxsize`` doubles and ``recipe.shape``
halves (rounded up to the network's multiple, 2^(levels-1)), so the crop
covers the same field of view in mm with 1/8 of the voxels. Network features
and depth are unchanged (each level then sees twice the mm; halve
``model.features`` yourself for a cheaper net). Every generator range is
already in physical units -- translation, warp strength, blur SD and
acquired resolution in mm, control points per field of view, FOV / slice
fractions, intensity fractions -- and the grid's voxel size converts them,
so they carry over unchanged and mean the same anatomy-scale effect
(``recipe.band``, mm, too). There are no voxel-unit options to convert; any
added later must be listed in ``VOXEL_OPTIONS`` (dotted key -> scale).

``two_d``: single-slice training. ``recipe.ndim = 2``, ``recipe.shape``
keeps its first two entries, the network is a 2D U-Net with the same
features. Each sample synthesises a 2D image from a random slice (random
axis, a slice that shows brain) of a label map -- the generator runs in 2D,
far cheaper than synthesising a 3D volume to keep one slice of it (in-plane
augmentation only: rotations, blur and resolution changes act in the slice
plane). Validation and inference run the 2D network slice by slice.
"""
from __future__ import annotations

import json
import math
from typing import Any

from .config import Config

# Options measured in voxels of the training grid (dotted key -> scale
# factor per halving of the resolution). None exist today: see above.
VOXEL_OPTIONS: dict[str, float] = {}


def _get(tables: dict, key: str):
    for part in key.split("."):
        if not isinstance(tables, dict) or part not in tables:
            return None
        tables = tables[part]
    return tables


def net_multiple(cfg: Config) -> int:
    feats = cfg.model.features
    return 2 ** (len(feats) - 1) if feats else 1


def half_resolution(cfg: Config) -> tuple[Config, list[str]]:
    r = cfg.recipe
    changes: dict[str, Any] = {"recipe.voxsize": r.voxsize * 2}
    notes = [f"recipe.voxsize {r.voxsize:g} -> {r.voxsize * 2:g} mm"]
    if r.shape is not None:
        m = net_multiple(cfg)
        changes["recipe.shape"] = [int(math.ceil(s / 2 / m) * m) for s in r.shape]
        notes.append(f"recipe.shape {list(r.shape)} -> {changes['recipe.shape']} (half, rounded up to a multiple of {m})")
    tables = cfg.to_dict()
    for key, scale in VOXEL_OPTIONS.items():
        v = _get(tables, key)
        if v is not None:
            changes[key] = [x * scale for x in v] if isinstance(v, list) else v * scale
            notes.append(f"{key} {v} -> {changes[key]} (voxel units)")
    notes.append("generator ranges are in mm / fractions: unchanged (the voxel size converts them)")
    notes.append("model.features unchanged")
    return cfg.override(changes), notes


def two_d(cfg: Config) -> tuple[Config, list[str]]:
    r = cfg.recipe
    if r.name not in ("skullstrip", "segment"):
        raise ValueError(f"the 2D preset supports the skullstrip and segment recipes, not {r.name!r}")
    changes: dict[str, Any] = {"recipe.ndim": 2, "train.channels_last": False}
    notes = ["recipe.ndim = 2 (single slices, 2D U-Net)"]
    if r.shape is not None:
        changes["recipe.shape"] = list(r.shape[:2])
        notes.append(f"recipe.shape {list(r.shape)} -> {changes['recipe.shape']}")
    cfg = cfg.override(changes)
    if cfg.train.init:   # 3D weights cannot start a 2D network: both keys leave the file
        tables = cfg.to_dict()
        for key in ("init", "init_partial"):
            tables["train"].pop(key, None)
        cfg = Config.from_dict(tables)
        notes.append("train.init dropped (3D weights do not fit a 2D U-Net)")
    return cfg, notes


def make_preset(cfg: Config, half: bool = False, two_dim: bool = False) -> tuple[Config, list[str]]:
    notes: list[str] = []
    if half:
        cfg, n = half_resolution(cfg)
        notes += n
    if two_dim:
        cfg, n = two_d(cfg)
        notes += n
    return cfg, notes


# ---------------------------------------------------------------- TOML output

def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(cfg: dict[str, Any], header: str = "") -> str:
    """A config dict (tables of scalars / lists / sub-tables) as TOML.
    Keys set to None are left out (TOML has no null)."""
    lines = [f"# {h}" if h else "#" for h in header.splitlines()] if header else []

    def table(d: dict, path: list[str]) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict) and v is not None}
        subs = {k: v for k, v in d.items() if isinstance(v, dict)}
        if path and (scalars or not subs):
            lines.append("")
            lines.append("[" + ".".join(path) + "]")
        for k, v in scalars.items():
            lines.append(f"{k} = {_value(v)}")
        for k, v in subs.items():
            table(v, path + [k])

    table(cfg, [])
    return "\n".join(lines).lstrip("\n") + "\n"
