"""``synthgen``: synthesise samples, preview the generator, train and export.

  synthgen sample LABELMAP -o IMAGE [--labels-out SEG] [--seed S] [-n N] [--config TOML]
  synthgen preview LABELMAP -o GRID.png [-n 24] [--seed S] [--max] [--config TOML]
  synthgen train CONFIG -o RUNDIR [--steps N] [--minutes M] [--set section.key=value ...]
  synthgen burst RUNDIR --minutes M [--device cuda] [--set section.key=value ...]
  synthgen compact RUNDIR
  synthgen export RUNDIR --config CONFIG --dest models/NAME [--name NAME]
  synthgen eval RUNDIR --config CONFIG
  synthgen invariance MODEL_OR_RUN IMAGE_A IMAGE_B -o PREFIX [--config CONFIG] [--mask MASK]
  synthgen sweep CONFIG --param KEY --values V1 V2 ... --steps N -o DIR [--init CHECKPOINT]
  synthgen preset RECIPE (--half | --2d) -o CONFIG.toml
"""
from __future__ import annotations

import ast
import os
import sys
from pathlib import Path
from typing import NoReturn, Sequence

# Importing synthtools.cli prepares the thread environment before torch loads
# its OpenMP runtime (idle threads sleep, BLAS pools stay within the granted
# CPUs); entry() is the error handling every tool shares.
from synthtools.cli.entry import Parser, UsageError, entry

PROG = "synthgen"
# A bad config, file or value (InputError is a ValueError): one line, exit 2, as a usage error.
FAILURES = (((FileNotFoundError, ValueError), 2),)


def _fail(msg: str) -> NoReturn:
    raise UsageError(msg)


def _synth_config(path: str | None):
    from .generator.synth import SynthConfig
    from .recipes import load_config
    if not path:
        return SynthConfig()
    return load_config(path).generator


def _load_labels(path: str):
    import numpy as np
    import torch
    from synthtools.io import InputError, load_volume
    from .generator.labels import LabelSet, unique_values
    try:
        vol = load_volume(path, dtype=None)
    except InputError as e:
        _fail(str(e))
    data = np.rint(vol.data).astype(np.int64)
    values = unique_values([data])
    if values[0] != 0:
        values = [0] + values
    if len(values) > 255:
        _fail(f"{path}: {len(values)} distinct labels, at most 255 supported")
    ls = LabelSet(values)
    return vol, ls, torch.from_numpy(ls.to_index(data))


def cmd_sample(a) -> None:
    import numpy as np
    import torch
    from synthtools.io import InputError, check_output_path, save_volume
    from .generator.synth import Synthesizer, generator
    vol, ls, idx = _load_labels(a.labelmap)
    synth = Synthesizer(_synth_config(a.config), num_labels=len(ls))
    values = torch.as_tensor(ls.values)
    jobs = []
    for k in range(a.n):
        if a.n == 1:
            img_out, lab_out = a.output, a.labels_out
        else:
            os.makedirs(a.output, exist_ok=True)
            img_out = os.path.join(a.output, f"image_{k:03d}.nii.gz")
            lab_out = None
            if a.labels_out:
                os.makedirs(a.labels_out, exist_ok=True)
                lab_out = os.path.join(a.labels_out, f"labels_{k:03d}.nii.gz")
        jobs.append((k, img_out, lab_out))
    try:
        for _, img_out, lab_out in jobs:
            check_output_path(img_out, input_paths=[a.labelmap])
            if lab_out:
                check_output_path(lab_out, input_paths=[a.labelmap])
        for k, img_out, lab_out in jobs:
            s = synth(idx, tuple(vol.voxsize), generator(a.seed + k))
            save_volume(s.image[0].numpy(), vol, img_out, dtype=np.float32)
            if lab_out:
                save_volume(values[s.labels.long()].numpy().astype(np.int32), vol, lab_out, dtype=np.int32)
            print(img_out)
    except InputError as e:
        _fail(str(e))


def cmd_preview(a) -> None:
    from .generator.synth import Synthesizer, generator
    from .preview import grid_png
    if not a.output.lower().endswith(".png"):
        _fail(f"{a.output}: output must be a .png file")
    vol, ls, idx = _load_labels(a.labelmap)
    cfg = _synth_config(a.config)
    if a.max:
        cfg = cfg.maximal()
    synth = Synthesizer(cfg, num_labels=len(ls))
    vox = tuple(float(v) for v in vol.voxsize)
    if a.voxsize:
        shape = [int(round(s * v / a.voxsize)) for s, v in zip(idx.shape, vox)]
        samples = [synth(idx, vox, generator(a.seed + k), out_shape=shape, out_voxsize=(a.voxsize,) * 3).image[0]
                   for k in range(a.n)]
    else:
        samples = [synth(idx, vox, generator(a.seed + k)).image[0] for k in range(a.n)]
    grid_png([s.numpy() for s in samples], a.output)
    print(a.output)


def _overrides(items) -> dict:
    """``--set`` items -> {dotted key: value}: a Python literal (``1e-3``,
    ``[0,0.2]``, ``True``), else a TOML value (``false``, as in the config
    files), else the text itself (a string)."""
    out = {}
    for item in items or []:
        key, _, value = item.partition("=")
        out[key] = _parse_value(value)
    return out


def _parse_value(text: str):
    from .recipes import tomllib   # tomli before Python 3.11
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def cmd_train(a) -> None:
    from .loop import train
    from .recipes import get_recipe, load_config
    cfg = load_config(a.config, _overrides(a.set))
    recipe = get_recipe(cfg)
    result = train(recipe, a.output, steps=a.steps, minutes=a.minutes, sanity=a.sanity)
    print(result)


def cmd_burst(a) -> None:
    """Continue a run for a fixed time on an accelerator: the run's own
    config (``RUNDIR/config.toml``, written by ``synthgen train``) and
    checkpoint, ``train.device`` set to ``--device`` (generation on the
    device too, bf16 autocast as configured), the checkpoint written back
    into RUNDIR. Runs on the CPU as well (``--device cpu``), for a dry run."""
    import torch
    from .loop import RUN_CONFIG, train
    from .recipes import get_recipe, load_config
    run = Path(a.rundir)
    if not (run / RUN_CONFIG).is_file() or not (run / "checkpoint.pt").is_file():
        _fail(f"{run}: not a run folder (needs {RUN_CONFIG} and checkpoint.pt from synthgen train)")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        _fail(f"--device {a.device}: torch sees no CUDA GPU")
    overrides = {"train.device": a.device, **_overrides(a.set)}
    recipe = get_recipe(load_config(run / RUN_CONFIG, overrides))
    result = train(recipe, run, minutes=a.minutes, steps=a.steps)
    print(result)


def cmd_compact(a) -> None:
    from .loop import compact_checkpoint
    ckpt = Path(a.rundir) / "checkpoint.pt"
    if not ckpt.is_file():
        _fail(f"{a.rundir}: no checkpoint.pt")
    sizes = compact_checkpoint(ckpt)
    print(f"{ckpt}: {sizes['before'] / 2**20:.1f} MiB -> {sizes['after'] / 2**20:.1f} MiB")


def cmd_export(a) -> None:
    from synthtools.weights import ModelError

    from .loop import export
    from .recipes import get_recipe, load_config
    recipe = get_recipe(load_config(a.config, _overrides(a.set)))
    atlases = a.atlases_from or recipe.atlases_from
    try:
        folder = export(recipe, a.rundir, a.dest, a.name or Path(a.dest).name, which=a.which,
                        average=a.average, average_weight=a.average_weight,
                        atlases_from=None if atlases == "none" else atlases)
    except ModelError as e:   # --atlases-from names no model
        _fail(str(e))
    print(folder)


def cmd_eval(a) -> None:
    """Score a run's checkpoint on every available real validation case."""
    import torch
    import json
    from .recipes import get_recipe, load_config
    cfg = load_config(a.config, {**_overrides(a.set), "validation.cases": None})   # every case
    recipe = get_recipe(cfg)
    from .loop import shipped_state
    state = shipped_state(Path(a.rundir), a.which)
    net = recipe.build_model()
    net.load_state_dict(state["model"])
    net.eval()
    torch.set_num_threads(cfg.train.threads)
    with torch.no_grad():
        metrics = recipe.validate(net)
    metrics = {k: round(v, 4) for k, v in metrics.items()}
    from .loop import val_score
    score = val_score(metrics)   # over cases: group means and consistency are extra keys
    metrics["mean"] = round(score, 4) if score is not None else float("nan")
    print(json.dumps({"step": int(state["step"]), "weights": state["source"], **metrics}))


def _model_or_run(a):
    """(network, :class:`synthtools.space.ModelSpace`) of a model (name or
    folder) or of a run folder's checkpoint (needs --config)."""
    from synthtools.space import ModelSpace
    from synthtools.weights import ModelError, load_model
    run = Path(a.model)
    if (run / "checkpoint.pt").is_file():
        if not a.config:
            _fail(f"{a.model}: a run folder needs --config (the config it was trained with)")
        from .recipes import get_recipe, load_config
        recipe = get_recipe(load_config(a.config, _overrides(a.set)))
        net = recipe.build_model()
        from .loop import shipped_state
        net.load_state_dict(shipped_state(run, "last")["model"])
        return net.eval(), recipe.model_space()
    try:
        model = load_model(a.model)
        space = ModelSpace.of(model)
    except ModelError as e:
        _fail(str(e))
    if not hasattr(model.net, "features"):
        _fail(f"{a.model}: the network has no features() (not a U-Net)")
    return model.net.float().eval(), space


def cmd_invariance(a) -> None:
    """Per-layer feature similarity of two co-registered scans (Fig. 6)."""
    import torch
    from synthtools.io import InputError, load_volume
    from .diagnostics import invariance, prepare_pair, write_report
    net, space = _model_or_run(a)
    torch.set_num_threads(a.threads)
    try:
        va, vb = load_volume(a.image_a), load_volume(a.image_b)
        vm = load_volume(a.mask) if a.mask else None
    except InputError as e:
        _fail(str(e))
    x, y, affine = prepare_pair(space, va, vb)
    mask = None
    if vm is not None:
        from synthtools.conform import resample
        mask = torch.from_numpy(resample(vm.data, vm.affine, affine, x.shape, order=0) > 0.5)
    stats, fa, fb, mask = invariance(net, x, y, mask)
    names = (Path(a.image_a).name, Path(a.image_b).name)
    files = write_report(stats, x, y, fa, fb, mask, a.output, names)
    print(Path(files[0]).read_text(), end="")
    for f in files:
        print(f)


def cmd_sweep(a) -> None:
    import torch
    from .sweep import parse_value, run_sweep
    if a.threads:
        torch.set_num_threads(a.threads)
    values = [parse_value(v) for v in a.values]
    run_sweep(a.config, a.param, values, a.output, a.steps, init=a.init, overrides=_overrides(a.set),
              all_cases=a.all_cases)
    print(Path(a.output) / "sweep.md")
    print((Path(a.output) / "sweep.md").read_text(), end="")


def cmd_preset(a) -> None:
    from .presets import dump_toml, make_preset
    from .recipes import load_config
    if not (a.half or a.two_d):
        _fail("choose --half and/or --2d")
    try:
        cfg, notes = make_preset(load_config(a.recipe), half=a.half, two_dim=a.two_d)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    kind = " + ".join(k for k, on in (("half resolution", a.half), ("2D", a.two_d)) if on)
    header = f"Pilot preset ({kind}) derived from {a.recipe} by `synthgen preset`:\n" + "\n".join(
        f"  {n}" for n in notes)
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dump_toml(cfg.to_dict(), header))
    print(out)


def run(argv: Sequence[str] | None = None) -> int:
    """The whole tool; returns the exit code (0, or 2 for any failure)."""
    return entry(PROG, _run, argv, FAILURES)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: returns on success (in-process callers such as
    the tests go on), exits with the code otherwise."""
    code = run(argv)
    if code:
        sys.exit(code)


def _run(argv: Sequence[str] | None) -> None:
    p = Parser(prog=PROG, description="Synthetic image generator and training.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample", help="write synthetic image/label pairs in the label map's geometry")
    s.add_argument("labelmap", help="anatomical label map (NIfTI/MGH, integer labels)")
    s.add_argument("-o", "--output", required=True, help="image file (a folder when -n > 1)")
    s.add_argument("--labels-out", help="label map file (a folder when -n > 1)")
    s.add_argument("--seed", type=int, default=0, help="random seed of the first sample (sample k: seed + k)")
    s.add_argument("-n", type=int, default=1, help="number of samples (default 1)")
    s.add_argument("--config", help="TOML whose [generator] section overrides the ranges")
    s.set_defaults(func=cmd_sample)
    v = sub.add_parser("preview", help="PNG grid of samples (three middle slices each)")
    v.add_argument("labelmap", help="anatomical label map (NIfTI/MGH, integer labels)")
    v.add_argument("-o", "--output", required=True, help="PNG file")
    v.add_argument("-n", type=int, default=24, help="number of samples in the grid (default 24)")
    v.add_argument("--seed", type=int, default=0, help="random seed of the first sample")
    v.add_argument("--max", action="store_true", help="every range at its upper bound")
    v.add_argument("--voxsize", type=float, help="synthesise on a grid of this voxel size (mm)")
    v.add_argument("--config", help="TOML whose [generator] section overrides the ranges")
    v.set_defaults(func=cmd_preview)
    t = sub.add_parser("train", help="train a recipe from a config file (resumes)")
    t.add_argument("config", help="TOML file or bundled config name (skullstrip)")
    t.add_argument("-o", "--output", required=True, help="run folder (checkpoint, log)")
    t.add_argument("--steps", type=int, help="stop at this total step count (default: the config's train.steps)")
    t.add_argument("--minutes", type=float, help="stop after this many minutes of training (checkpointed)")
    t.add_argument("--set", nargs="*", help="override config values: section.key=value")
    t.add_argument("--sanity", action="store_true",
                   help="train on ONE synthetic sample (written to the run folder): the loss must reach ~0")
    t.set_defaults(func=cmd_train)
    b = sub.add_parser("burst", help="continue a run for M minutes on a GPU (or --device cpu), in place")
    b.add_argument("rundir", help="run folder written by synthgen train")
    b.add_argument("--minutes", type=float, required=True, help="wall time of training (minutes)")
    b.add_argument("--steps", type=int, help="stop at this total step count (default: the config's)")
    b.add_argument("--device", default="cuda", help="torch device (default cuda)")
    b.add_argument("--set", nargs="*", help="override config values: section.key=value")
    b.set_defaults(func=cmd_burst)
    c = sub.add_parser("compact", help="rewrite a stopped run's checkpoint.pt for committing (fp16, no optimizer)")
    c.add_argument("rundir", help="run folder written by synthgen train (stopped)")
    c.set_defaults(func=cmd_compact)
    e = sub.add_parser("export", help="write shipped weights + metadata from a run")
    e.add_argument("rundir", help="run folder written by synthgen train")
    e.add_argument("--config", required=True, help="the run's config (TOML file or bundled name)")
    e.add_argument("--dest", required=True, help="model folder to write (weights.pt, metadata.json)")
    e.add_argument("--name", help="model name in the metadata (default: the folder's name)")
    e.add_argument("--set", nargs="*", help="override config values: section.key=value")
    e.add_argument("--which", choices=("best", "last"), default="best",
                   help="best: the best validation so far (best.pt); last: the last checkpoint (default: best)")
    e.add_argument("--average", metavar="CHECKPOINT",
                   help="ship the weight average with this checkpoint (best.pt or checkpoint.pt of the same lineage)")
    e.add_argument("--average-weight", type=float, default=0.5,
                   help="weight of --average's checkpoint in the average (0-1; default 0.5)")
    e.add_argument("--atlases-from", metavar="MODEL",
                   help="copy this model's segmentation atlases into the export ('none': no atlases; "
                        "default for segmentation recipes: the shipped synthseg)")
    e.set_defaults(func=cmd_export)
    v = sub.add_parser("eval", help="score a run's checkpoint on all real validation cases")
    v.add_argument("rundir", help="run folder written by synthgen train")
    v.add_argument("--config", required=True, help="the run's config (TOML file or bundled name)")
    v.add_argument("--set", nargs="*", help="override config values: section.key=value")
    v.add_argument("--which", choices=("best", "last"), default="best",
                   help="best (default, as export): best.pt, else the last checkpoint; last: the last "
                        "checkpoint (its weight average if kept)")
    v.set_defaults(func=cmd_eval)
    i = sub.add_parser("invariance", help="per-layer feature similarity of two co-registered scans (Fig. 6)")
    i.add_argument("model", metavar="MODEL_OR_RUN", help="model name/folder, or a run folder (with --config)")
    i.add_argument("image_a")
    i.add_argument("image_b", help="the same subject in another contrast, co-registered with IMAGE_A")
    i.add_argument("-o", "--output", required=True, help="prefix: writes PREFIX.md, PREFIX.csv, PREFIX.png")
    i.add_argument("--config", help="config of a run folder")
    i.add_argument("--mask", help="head mask on IMAGE_A's grid (default: thresholded images, holes filled)")
    i.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    i.add_argument("--set", nargs="*", help="override config values: section.key=value")
    i.set_defaults(func=cmd_invariance)
    w = sub.add_parser("sweep", help="one warm-started run per value of a config key; Dice vs value")
    w.add_argument("config", help="TOML file or bundled config name")
    w.add_argument("--param", required=True, help="dotted config key, e.g. generator.noise.std")
    w.add_argument("--values", required=True, nargs="+", help='values, e.g. "[0,0.05]" "[0,0.1]"')
    w.add_argument("--init", help="checkpoint (or run/model folder) every run starts from")
    w.add_argument("--steps", required=True, type=int, help="training steps per value")
    w.add_argument("-o", "--output", required=True, help="sweep folder")
    w.add_argument("--all-cases", action="store_true", help="score every real validation case")
    w.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    w.add_argument("--set", nargs="*", help="other overrides for every run: key=value")
    w.set_defaults(func=cmd_sweep)
    r = sub.add_parser("preset", help="write a pilot config: half resolution and/or 2D")
    r.add_argument("recipe", help="bundled config name or TOML file")
    r.add_argument("--half", action="store_true", help="voxel size x2, crop shape /2")
    r.add_argument("--2d", dest="two_d", action="store_true", help="single-slice training (2D U-Net)")
    r.add_argument("-o", "--output", required=True, help="config file to write (TOML)")
    r.set_defaults(func=cmd_preset)
    a = p.parse_args(argv)
    if getattr(a, "n", 1) < 1:
        _fail("-n must be >= 1")
    a.func(a)


if __name__ == "__main__":
    main()
