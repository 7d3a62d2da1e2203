"""Training recipes: each turns the generator into (input, target) pairs for
one task and says how to score a model on real data."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..config import RUN_CONFIG_HEADER, Config, ConfigError, set_key

CONFIGS = Path(__file__).parent / "configs"


def load_config(path_or_name: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """The typed config (``training.config.Config``) of a TOML file or a
    bundled config name (``skullstrip``); ``overrides``: {dotted key: value}
    (``set_key``), applied before the check. An unknown key or a wrongly
    typed value raises ``ConfigError`` (a ValueError, one line)."""
    p = Path(path_or_name)
    if not p.is_file():
        p = CONFIGS / f"{path_or_name}.toml"
    if not p.is_file():
        raise FileNotFoundError(f"{path_or_name}: no such config file or bundled config")
    text = p.read_text()
    try:
        tables = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{p}: not valid TOML ({e})") from None
    for key, value in (overrides or {}).items():
        set_key(tables, key, value)
    return dataclasses.replace(Config.from_dict(tables), note=leading_comment(text))


def leading_comment(text: str) -> str:
    """The comment block that opens a TOML file, without its ``#`` marks
    and without the line ``synthgen train`` writes above a run's saved
    config (so a resumed run does not stack it)."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].removeprefix(" ").rstrip())
    if lines and lines[0] == RUN_CONFIG_HEADER:
        lines = lines[1:]
    return "\n".join(lines).strip("\n")


def get_recipe(cfg: Config):
    name = cfg.recipe.name
    if not name:
        raise ConfigError("recipe.name is missing (skullstrip, segment, rigid, affine or deform)")
    if name == "skullstrip":
        from .skullstrip import SkullStripRecipe
        return SkullStripRecipe(cfg)
    if name == "segment":
        from .segment import SegmentRecipe
        return SegmentRecipe(cfg)
    if name in ("rigid", "affine"):
        from .register import LinearRecipe
        return LinearRecipe(cfg)
    if name == "deform":
        from .register import DeformRecipe
        return DeformRecipe(cfg)
    raise ConfigError(f"recipe.name = {name!r}: not a recipe (skullstrip, segment, rigid, affine or deform)")
