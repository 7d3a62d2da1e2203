"""The training config schema: every TOML section a recipe reads, with its
keys, types and defaults, in one place (the generator's ranges live in
``SynthConfig``). ``recipes.load_config`` checks a file against it -- an unknown key or a wrongly typed value is a one-line
:class:`ConfigError` -- and returns a :class:`Config`: one frozen dataclass
per section, read as attributes (``cfg.train.lr``), so a default is written
once, here. A field whose default is ``None`` is absent by default: the
recipe picks it (its own crop shape or network widths) or the feature is
off."""
from __future__ import annotations

import copy
import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union


# First line of the config synthgen train saves in a run folder (training.loop.save_run_config).
RUN_CONFIG_HEADER = "Written by synthgen train: this run's effective config."


class ConfigError(ValueError):
    """A config that does not fit the schema (one-line message)."""


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any) -> Any:
    """A checked TOML value in the annotation's own form: an int where a
    float belongs as a float, a list as a tuple (frozen sections hold no
    mutable values), element by element."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0]) if len(inner) == 1 else value
    if origin is tuple and isinstance(value, (list, tuple)):
        if args and args[-1] is not Ellipsis:
            return tuple(_coerce(v, a) for v, a in zip(value, args))
        return tuple(_coerce(v, args[0]) for v in value) if args else tuple(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


class _Section:
    """Base of the section dataclasses: values normalised on construction
    (:func:`_coerce`), so ``TrainSection(lr=1)`` and ``lr = 1`` in a file
    both read back as ``1.0``."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(getattr(self, f.name), hints[f.name]))


@dataclass(frozen=True)
class RecipeSection(_Section):
    """``[recipe]``: the task and its input space."""
    name: str = ""                    # skullstrip, segment, rigid, affine, deform (required to train)
    voxsize: float = 2.0              # training (and inference) voxel size, mm
    ndim: int = 3                     # 2: single-slice training, 2D U-Net
    slab: int = 0                     # 2D: neighbouring slices each side as extra input channels (2.5D)
    slab_draw: str = "3d"             # "3d": the 3D generator draws the slab; "2d": label-map slices, one 2D draw
    shape: Optional[tuple[int, ...]] = None  # training crop, voxels (default: the recipe's)
    # segment
    flip_prob: float = 0.5            # probability of a left-right flip (fraction)
    loss: str = "dice"                # dice, dice+ce, batch-dice, batch-dice+ce (Dice summed over the batch)
    # skullstrip
    band: float = 5.0                 # signed-distance band, mm
    boundaries: Optional[tuple[str, ...]] = None  # csf and/or nocsf (default: from csf)
    csf: bool = True                  # the brain boundary includes CSF
    # registration
    charbonnier_mm: float = 1.0       # Charbonnier epsilon of the displacement loss, mm
    supervised: bool = False          # deform: train on known displacements only
    same_map_prob: float = 0.2        # deform: fraction of pairs from one label map
    reg_weight: float = 1.0           # deform: weight of the regularisation loss
    lam: tuple[float, float] = field(default=(0.0, 1.0), metadata={"key": "lambda"})   # deform: lambda range


@dataclass(frozen=True)
class ModelSection(_Section):
    """``[model]``: the network."""
    features: Optional[tuple[int, ...]] = None   # widths per level (default: the recipe's)
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
class TrainSection(_Section):
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
class ValidationSection(_Section):
    """``[validation]``: scoring on real scans."""
    cases: Optional[tuple[str, ...]] = None      # case names (default: all)
    real_pairs: Optional[str] = None       # CSV image,labels,domain[,name]
    target: Optional[str] = None           # labels or mask (default: real.target)
    group_by: str = "contrast"             # contrast or site
    consistency: bool = True               # segment: score label consistency sets


@dataclass(frozen=True)
class RealSection(_Section):
    """``[real]``: real (image, labels) pairs mixed into training."""
    pairs: Optional[str] = None            # CSV image,labels[,domain,name]
    ratio: float = 0.25                    # fraction of real samples
    target: str = "labels"                 # labels or mask


@dataclass(frozen=True)
class InferenceSection(_Section):
    """``[inference]``: overrides of the exported model's inference options."""
    bf16: Optional[bool] = None
    slice_axes: Optional[tuple[int, ...]] = None  # 2D networks: axes fused
    patch: Optional[tuple[int, ...]] = None       # 3D instance-norm networks: window, voxels
    passes: int = 1                         # registration: passes
    refine: tuple[int, ...] = ()              # registration: refinement iterations per level
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
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"a list of {len(args)} {_type_name(args[0])}s"
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


def set_key(tables: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key in TOML tables: ``train.lr`` or a nested one,
    ``generator.noise.std``."""
    *parents, name = key.split(".")
    for p in parents:
        tables = tables.setdefault(p, {})
        if not isinstance(tables, dict):
            raise ConfigError(f"{key}: {p} is not a table")
    tables[name] = value


def merge_generator(base: dict | None, over: dict | None) -> dict:
    """Deep merge of generator tables: ``over``'s options replace ``base``'s."""
    out = copy.deepcopy(base or {})
    for step, table in (over or {}).items():
        if isinstance(table, dict):
            out.setdefault(step, {}).update(table)
        else:
            out[step] = table
    return out


def _without_none(tables: dict[str, Any]) -> dict[str, Any]:
    """A deep copy without the keys set to None (``--set key=None``: absent;
    TOML has no null)."""
    return {k: _without_none(v) if isinstance(v, dict) else copy.deepcopy(v)
            for k, v in tables.items() if v is not None}


def _section(cls: type, table: dict[str, Any]) -> Any:
    fields = section_keys(cls)
    return cls(**{fields[key].name: value for key, value in table.items()})


def _default_synth() -> Any:
    from .generator.synth import SynthConfig
    return SynthConfig()


@dataclass(frozen=True)
class Config:
    """A checked training config, one typed object per TOML section:
    ``cfg.train.lr``, ``cfg.recipe.shape``; ``cfg.generator`` is the
    generator's ``SynthConfig`` and ``cfg.generator_moving`` that of a
    registration pair's moving image (the fixed image's ranges with
    ``[generator_moving]``'s options on top; None: the same as
    ``generator``). Frozen: :meth:`override` gives a changed copy, checked
    like a file. ``tables`` keeps the TOML tables as written (plus
    overrides): what a run saves (``config.toml``) and an exported model
    records, so they stay as short as the file the user wrote."""
    recipe: RecipeSection = field(default_factory=RecipeSection)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    real: RealSection = field(default_factory=RealSection)
    inference: InferenceSection = field(default_factory=InferenceSection)
    generator: Any = field(default_factory=_default_synth)      # SynthConfig
    generator_moving: Any = None                                # SynthConfig or None
    tables: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # The file's leading comment (its author's description of the run), carried into the
    # run's saved config: a run folder keeps why it exists after synthgen train rewrites it.
    note: str = field(default="", compare=False, repr=False)

    @classmethod
    def from_dict(cls, tables: dict[str, Any]) -> "Config":
        """The config of parsed TOML tables; :class:`ConfigError` (one line)
        at the first unknown section or key or wrongly typed value."""
        from .generator.synth import SynthConfig
        check_config(tables)
        tables = _without_none(tables)
        sections = {name: _section(kind, tables.get(name, {})) for name, kind in SECTIONS.items()}
        moving = None
        if "generator_moving" in tables:
            moving = SynthConfig.from_dict(merge_generator(tables.get("generator"), tables["generator_moving"]))
        return cls(**sections, generator=SynthConfig.from_dict(tables.get("generator")),
                   generator_moving=moving, tables=tables)

    def to_dict(self) -> dict[str, Any]:
        """The TOML tables (a copy): ``Config.from_dict(cfg.to_dict()) == cfg``."""
        return copy.deepcopy(self.tables)

    def override(self, values: dict[str, Any]) -> "Config":
        """A copy with dotted keys set (``{"train.lr": 1e-3}``, as ``--set``;
        None makes a key absent), checked against the schema."""
        tables = self.to_dict()
        for key, value in values.items():
            set_key(tables, key, value)
        return dataclasses.replace(Config.from_dict(tables), note=self.note)
