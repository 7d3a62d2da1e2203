"""The training config schema: every TOML section a recipe reads, with its
keys, types and defaults, in one place (the generator's ranges live in
``SynthConfig``). :func:`check_config` rejects an unknown key or a wrongly
typed value with a one-line error; the training code takes its defaults
from the instances at the bottom (``TRAIN.lr``), so a default is written
once. A field whose default is ``None`` is absent by default: the recipe
picks it (its own crop shape or network widths) or the feature is off."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union


class ConfigError(ValueError):
    """A config that does not fit the schema (one-line message)."""


@dataclass(frozen=True)
class RecipeSection:
    """``[recipe]``: the task and its input space."""
    name: str = ""                    # skullstrip, segment, rigid, affine, deform (required to train)
    voxsize: float = 2.0              # training (and inference) voxel size, mm
    ndim: int = 3                     # 2: single-slice training, 2D U-Net
    shape: Optional[list[int]] = None  # training crop, voxels (default: the recipe's)
    # segment
    flip_prob: float = 0.5            # probability of a left-right flip (fraction)
    loss: str = "dice"                # dice, dice+ce
    # skullstrip
    band: float = 5.0                 # signed-distance band, mm
    boundaries: Optional[list[str]] = None   # csf and/or nocsf (default: from csf)
    csf: bool = True                  # the brain boundary includes CSF
    # registration
    charbonnier_mm: float = 1.0       # Charbonnier epsilon of the displacement loss, mm
    supervised: bool = False          # deform: train on known displacements only
    same_map_prob: float = 0.2        # deform: fraction of pairs from one label map
    reg_weight: float = 1.0           # deform: weight of the regularisation loss
    lam: list[float] = field(default=(0.0, 1.0), metadata={"key": "lambda"})   # deform: lambda range


@dataclass(frozen=True)
class ModelSection:
    """``[model]``: the network."""
    features: Optional[list[int]] = None   # widths per level (default: the recipe's)
    convs: int = 2                    # convolutions per level
    norm: Optional[str] = None        # "instance" or none
    deep_supervision: int = 0         # decoder levels above full resolution with a loss
    keypoints: int = 32               # rigid/affine: barycentre keypoints
    symmetric: bool = True            # rigid/affine: symmetric fit
    activation: str = "relu"          # rigid/affine
    steps: int = 7                    # deform: scaling-and-squaring steps
    hidden: int = 32                  # deform: width of the SVF head
    encoder: Optional[str] = None     # deform: registration model whose features it reads
    encoder_scale: int = 2            # deform: feature-map downsampling


@dataclass(frozen=True)
class TrainSection:
    """``[train]``: optimisation and the run's machinery."""
    steps: int = 10_000               # total steps of the run
    optimizer: str = "adam"           # adam, adamw
    lr: float = 1e-4                  # peak learning rate
    weight_decay: float = 1e-4        # adamw only
    schedule: str = "constant"        # constant, cosine, poly
    warmup: int = 0                   # linear warm-up, steps
    lr_min: Optional[float] = None    # cosine floor (default: lr / 100)
    batch: int = 1
    grad_accum: int = 1               # batches per optimiser step
    clip_grad: float = 0.0            # max gradient norm; 0: no clipping
    workers: int = 1                  # data-loader processes
    threads: int = 2                  # the most torch threads of a CPU run
    load_aware: bool = True           # fewer threads while other processes keep CPUs busy
    bf16: bool = True                 # bf16 autocast
    channels_last: bool = True        # 3D networks only
    log_every: int = 10               # steps
    val_every: int = 500              # steps; 0: no validation
    checkpoint_minutes: float = 10.0
    ema: float = 0.0                  # weight EMA decay; 0: none
    seed: int = 0
    device: str = "cpu"               # set by synthgen burst, not saved with the run
    dist_timeout_minutes: float = 30.0
    init: Optional[str] = None        # checkpoint, run or model to start from ("": none)
    init_into: Optional[str] = None   # submodule the init weights go into
    init_partial: bool = False        # keep new tensors that the init file lacks
    init_widen: bool = False          # widen a narrower U-Net's weights
    label_maps: Optional[str] = None  # folder of label maps (default: the shared data)
    max_label_maps: Optional[int] = None
    debug_rank_digests: bool = False  # distributed tests: log each rank's weight digest


@dataclass(frozen=True)
class ValidationSection:
    """``[validation]``: scoring on real scans."""
    cases: Optional[list[str]] = None      # case names (default: all)
    real_pairs: Optional[str] = None       # CSV image,labels,domain[,name]
    target: Optional[str] = None           # labels or mask (default: real.target)
    group_by: str = "contrast"             # contrast or site
    consistency: bool = True               # segment: score label consistency sets


@dataclass(frozen=True)
class RealSection:
    """``[real]``: real (image, labels) pairs mixed into training."""
    pairs: Optional[str] = None            # CSV image,labels[,domain,name]
    ratio: float = 0.25                    # fraction of real samples
    target: str = "labels"                 # labels or mask


@dataclass(frozen=True)
class InferenceSection:
    """``[inference]``: overrides of the exported model's inference options."""
    bf16: Optional[bool] = None
    slice_axes: Optional[list[int]] = None  # 2D networks: axes fused
    patch: Optional[list[int]] = None       # 3D instance-norm networks: window, voxels
    passes: int = 1                         # registration: passes
    refine: list[int] = field(default=())   # registration: refinement iterations per level
    refine_metric: str = "features"
    refine_background: Optional[str] = None  # segmentation: "region" or "all" (synthtools.seg.segmenter)


SECTIONS: dict[str, type] = {"recipe": RecipeSection, "model": ModelSection, "train": TrainSection,
                             "validation": ValidationSection, "real": RealSection,
                             "inference": InferenceSection}
GENERATOR_SECTIONS = ("generator", "generator_moving")   # SynthConfig tables (moving: registration)


def _key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def section_keys(cls: type) -> dict[str, dataclasses.Field]:
    """TOML key -> dataclass field of a section."""
    return {_key(f): f for f in dataclasses.fields(cls)}


def _type_ok(value: Any, tp: Any) -> bool:
    """Whether a TOML value fits an annotation (int passes for float; a
    bool is neither int nor float; a tuple annotation takes a list)."""
    if tp is type(None):
        return False
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:   # Optional[X]: None (from --set key=None) means "absent"
        return value is None and type(None) in args or any(_type_ok(value, a) for a in args)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_type_ok(v, a) for v, a in zip(value, args))
        return all(_type_ok(v, args[0]) for v in value) if args else True
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return True   # an annotation the TOML cannot express: not checked here


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    if origin in (list, tuple):
        return f"a list of {_type_name(args[0])}" if args else "a list"
    return getattr(tp, "__name__", str(tp))


def _check_table(where: str, table: Any, cls: type) -> None:
    if not isinstance(table, dict):
        raise ConfigError(f"[{where}] must be a table, got {table!r}")
    fields = section_keys(cls)
    hints = typing.get_type_hints(cls)
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(f"unknown key {where}.{key} (allowed: {', '.join(sorted(fields))})")
        tp = hints[fields[key].name]
        if not _type_ok(value, tp):
            raise ConfigError(f"{where}.{key} = {value!r}: expected {_type_name(tp)}")


def _check_generator(where: str, table: Any) -> None:
    from .generator.synth import SynthConfig
    if not isinstance(table, dict):
        raise ConfigError(f"[{where}] must be a table, got {table!r}")
    steps = {f.name: f for f in dataclasses.fields(SynthConfig)}
    hints = typing.get_type_hints(SynthConfig)
    for name, value in table.items():
        if name not in steps:
            raise ConfigError(f"unknown key {where}.{name} (allowed: {', '.join(sorted(steps))})")
        cls = hints[name]
        if dataclasses.is_dataclass(cls):
            _check_table(f"{where}.{name}", value, cls)
        elif not _type_ok(value, cls):
            raise ConfigError(f"{where}.{name} = {value!r}: expected {_type_name(cls)}")


def check_config(cfg: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` (one line) at the first unknown section or
    key or wrongly typed value. ``recipe.name`` is not required here: a
    generator-only file serves ``synthgen sample --config``; training asks
    for it (``get_recipe``)."""
    for name, table in cfg.items():
        if name in SECTIONS:
            _check_table(name, table, SECTIONS[name])
        elif name in GENERATOR_SECTIONS:
            _check_generator(name, table)
        else:
            allowed = ", ".join(sorted([*SECTIONS, *GENERATOR_SECTIONS]))
            raise ConfigError(f"unknown section [{name}] (allowed: {allowed})")


# The defaults, for code that reads a (possibly partial) section dict:
# ``cfg.get("lr", TRAIN.lr)``.
RECIPE = RecipeSection()
MODEL = ModelSection()
TRAIN = TrainSection()
VALIDATION = ValidationSection()
REAL = RealSection()
INFERENCE = InferenceSection()
