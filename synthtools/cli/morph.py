"""``synthmorph``: registration from the command line, after FreeSurfer's
``mri_synthmorph``.

    synthmorph apply TRANS IMAGE OUTPUT [IMAGE OUTPUT ...] [-m linear|nearest]
                     [-t DTYPE] [-f FILL] [-H] [--fixed FIXED_IMAGE]
    synthmorph register [-m rigid|affine|deform|joint] MOVING FIXED [-o MOVED]
                     [-O FIXED_IN_MOVING] [-t TRANS] [-T INVERSE] [-H] [-i INIT] [-M] ...
    synthmorph template IMAGE IMAGE [IMAGE ...] -o TEMPLATE [-t DIR] [-O DIR]
                     [-m rigid|affine] [--itk]

``apply`` resamples images with a transform file (.lta, ITK .txt/.tfm,
.nii.gz displacement field, FreeSurfer .mgz warp; see
:mod:`synthtools.morph.transforms`). ``register`` runs the shipped
``synthmorph-rigid`` / ``synthmorph-affine`` model (or ``--model``); the
deformable step (``deform``, ``joint``) is a test-time fit of a velocity
field (:mod:`synthtools.morph.svf_fit`) inside the fixed brain that the
affine model finds, or an SVF network given with ``--model``. As ``mri_synthmorph``,
``synthmorph MOVING FIXED ...`` without a subcommand means ``register``.
``template`` builds an unbiased within-subject template of N images
(:mod:`synthtools.morph.template`); ``register -M`` is its two-image case.

Errors are single lines ``synthmorph: error: ...``; exit code 2 means a bad
command line (nothing processed), 1 a bad input file (image, transform,
model) or a failed run (:mod:`synthtools.cli.common`). ``register`` prints
one line per stage with its time on stderr (``-q``: none).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from types import SimpleNamespace
from typing import NoReturn, Sequence

import numpy as np

from ..io import InputError, check_input_path, check_output_path
from ..morph.formats import LINEAR_EXTENSIONS, WARP_EXTENSIONS, transform_kind
from .common import (Job, Parser, Progress, UsageError, add_batch_options, add_standard_options, check_writable_file,
                     choose_device, device_text, file_identity, info, load_task_model, resolve_shard_option, run_jobs,
                     say_error, say_warning)
from .entry import entry

PROG = "synthmorph"
MODES = ("rigid", "affine", "deform", "joint")
LINEAR_MODES = ("rigid", "affine")
DTYPES = ("uint8", "int8", "int16", "uint16", "int32", "uint32", "float32", "float64")

FORMATS_TEXT = ("Transform files: .lta (FreeSurfer), .txt/.tfm (ITK/ANTs affine), .nii.gz/.nii "
                "(ITK/ANTs displacement field), .mgz (FreeSurfer/mri_synthmorph warp).")


# --------------------------------------------------------------- parsers --

USAGE = (f"{PROG} register [-m rigid|affine|deform|joint] MOVING FIXED [-o MOVED] [-t TRANS] ...\n"
         f"       {PROG} apply TRANS IMAGE OUTPUT [IMAGE OUTPUT ...] [--fixed FIXED] ...\n"
         f"       {PROG} template IMG1 IMG2 [IMG3 ...] -o TEMPLATE [-t DIR] [-O DIR] ...\n"
         f"       {PROG} MOVING FIXED ...   (register, as mri_synthmorph)\n"
         f"       (see '{PROG} register -h', '{PROG} apply -h', '{PROG} template -h')")


def top_parser() -> Parser:
    return Parser(
        prog=PROG, usage=USAGE,
        description="Registration of brain images of any contrast or resolution (SynthMorph method). "
        "Subcommands: 'register' aligns a moving image to a fixed image; 'apply' resamples images "
        "with a transform file; 'template' builds an unbiased template of N images of one subject. "
        "Without a subcommand, 'register' is assumed (as mri_synthmorph).",
        epilog=FORMATS_TEXT,
    )


def apply_parser() -> Parser:
    p = Parser(
        prog=f"{PROG} apply",
        description="Apply a transform to images: each IMAGE is resampled into the fixed space "
        "and written to its OUTPUT. The output grid is that of --fixed if given, else the fixed "
        "image recorded in the transform (LTA destination, warp grid).",
        epilog=FORMATS_TEXT + " An ITK affine records no image grid: give --fixed (or -H). "
        "A 4D image is resampled frame by frame with the same transform.",
    )
    p.add_argument("trans", metavar="TRANS", help="transform file (moving to fixed)")
    p.add_argument("pairs", nargs="+", metavar="IMAGE OUTPUT", help="input image and its output, repeatable")
    p.add_argument("-m", "--method", choices=("linear", "nearest"), default="linear",
                   help="interpolation: linear (default) or nearest (label maps)")
    p.add_argument("-t", "--type", choices=DTYPES, metavar="DTYPE",
                   help=f"output data type ({', '.join(DTYPES)}); default: the input's type")
    p.add_argument("-f", "--fill", type=float, default=0.0, metavar="FILL",
                   help="value of output voxels outside the input image (default: 0)")
    p.add_argument("-H", "--header-only", action="store_true",
                   help="do not resample: keep the voxels and set the header so that the image lies "
                   "in the fixed space (linear transforms only)")
    p.add_argument("--fixed", metavar="FIXED_IMAGE", help="image whose grid (and NIfTI header: qform/sform "
                   "codes, units) the outputs get")
    add_batch_options(p)
    add_standard_options(p, threads_flags=("-j", "--threads"), quiet=True)
    return p


def register_parser() -> Parser:
    p = Parser(
        prog=f"{PROG} register",
        description="Register a MOVING image to a FIXED image: rigid, affine, deformable (assumes "
        "prior affine alignment) or joint (affine then deformable).",
        epilog=FORMATS_TEXT + " -t/-T take a linear file for rigid/affine and a warp for deform/joint.",
    )
    p.add_argument("moving", metavar="MOVING", help="moving image")
    p.add_argument("fixed", metavar="FIXED", help="fixed image")
    p.add_argument("-m", "--mode", choices=MODES, default="joint",
                   help="transformation model (default: joint)")
    p.add_argument("-o", "--out-moving", metavar="MOVED", help="moving image moved into the fixed space")
    p.add_argument("-O", "--out-fixed", metavar="FIXED_IN_MOVING",
                   help="fixed image moved into the moving space")
    p.add_argument("-t", "--trans", metavar="TRANS", help="transform from moving to fixed")
    p.add_argument("-T", "--inverse", metavar="INVERSE", help="transform from fixed to moving")
    p.add_argument("-H", "--header-only", action="store_true",
                   help="update the output headers instead of resampling (rigid/affine only)")
    p.add_argument("-M", "--middle", "--mid-space", action="store_true",
                   help="rigid/affine only: move both images to the halfway space (unbiased, inverse-consistent; "
                   "see 'synthmorph template'): -o/-O are both images on a grid in that space, -t/-T the "
                   "transforms from moving/fixed to it")
    p.add_argument("-i", "--init", metavar="INIT", help="linear transform to start from (.lta, .txt, .tfm)")
    p.add_argument("-r", "--regularization", type=float, default=0.5, metavar="LAMBDA",
                   help="deformable smoothness weight in [0, 1]; higher is smoother (default: 0.5; "
                   "0 still gives an invertible map)")
    p.add_argument("-g", "--gpu", action="store_true", help="run the network on the GPU (CUDA)")
    p.add_argument("--model", metavar="PATH", help="alternative model folder or metadata.json (deform/joint: "
                   "an SVF network, or a linear model whose feature maps delimit the brain for the fitted warp)")
    p.add_argument("--affine-model", metavar="PATH", help="joint only: alternative affine model")
    add_standard_options(p, threads_flags=("-j", "--threads"), quiet=True)
    _add_freesurfer_register_flags(p)
    return p


def _add_freesurfer_register_flags(p: argparse.ArgumentParser) -> None:
    """mri_synthmorph register's flags without a synthtools equivalent (issue 35)."""
    from .compat import refuse
    p.add_argument("-n", "--steps", type=int, metavar="STEPS",
                   help="accepted and ignored, with a note: mri_synthmorph's integration steps; the "
                   "deformable model here fixes its own")
    p.add_argument("-e", "--extent", type=int, choices=(192, 256), metavar="EXTENT",
                   help="accepted and ignored, with a note: mri_synthmorph's network field of view; the "
                   "model here sets its own (192 or 256)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="accepted: progress lines are printed unless -q")
    refuse(p, "-w", "--weights", reason="FreeSurfer's SynthMorph .h5 weights are not readable here; "
           "use --model/--affine-model with a synthtools model", takes_value=True)
    refuse(p, "-d", "--out-dir", reason="no dump of the network-space inputs", takes_value=True)


# --------------------------------------------------------------- helpers --

def _fits(value: float, dtype: np.dtype) -> bool:
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return value == round(value) and info.min <= value <= info.max
    return True


def _check_transform_output(path: str, option: str, kinds: Sequence[str], protect: Sequence[str]) -> None:
    """A transform output: right kind for the mode, writable folder, not an input."""
    if transform_kind(path) not in kinds:
        exts = LINEAR_EXTENSIONS if "lta" in kinds else WARP_EXTENSIONS
        raise UsageError(f"{option} {path}: use a {' or '.join(exts)} file for this transform")
    try:
        check_writable_file(path, protect)
    except InputError as e:
        raise UsageError(f"{option} {e}") from None


def _no_duplicates(paths: dict[str, str]) -> None:
    seen: dict[str, str] = {}
    for option, path in paths.items():
        real = os.path.realpath(path)
        if real in seen:
            raise UsageError(f"{option} {path}: same output path as {seen[real]}")
        seen[real] = option


def _image(path: str, option: str):
    """An image given as an option (read and validated); InputError names the option."""
    from ..io import load_volume

    try:
        return load_volume(path, allow_4d=True, dtype=None)
    except InputError as exc:
        raise InputError(f"{option} {exc}") from None


def _out_dtype(requested: np.dtype | None, vol, image: str, fill: float) -> np.dtype:
    """The output type: ``-t`` or the input's. Refuses (InputError) a type
    that cannot hold the image's values or the fill value: a narrowing cast
    would clip them silently (a FLAIR of 0..750 as int8 came out stuck at 127)."""
    dtype = requested or np.dtype(vol.data.dtype).newbyteorder("=")
    if dtype.kind in "iu":
        info_ = np.iinfo(dtype)
        lo, hi = float(np.min(vol.data)), float(np.max(vol.data))
        if lo < info_.min or hi > info_.max:
            raise InputError(f"{image}: values {lo:g}..{hi:g} do not fit the output type {dtype} "
                             f"({info_.min}..{info_.max}); choose a wider -t (e.g. int16, int32 or float32)")
    if not _fits(fill, dtype):
        raise InputError(f"{image}: fill value {fill:g} does not fit the output type {dtype} "
                         "(choose another -f or -t)")
    return dtype


def _with_singletons(data: np.ndarray, vol) -> np.ndarray:
    """A 3D result of a (X, Y, Z, 1[, 1]) input keeps the trailing singleton axes."""
    extra = tuple(vol.file_shape[3:]) if getattr(vol, "file_shape", None) else ()
    if data.ndim == 3 and extra and all(n == 1 for n in extra):
        return data.reshape(data.shape + extra)
    return data


def _check_coverage(trans, vol, grid, image: str) -> None:
    """InputError when no voxel of the output grid pulls back into the image:
    the output would be all fill (the transform moves it out of the field of view)."""
    from ..morph.similarity import coverage

    if coverage(trans, vol, grid) == 0.0:
        raise InputError(f"{image}: the transform moves the whole image out of the output field of view "
                         "(the output would be all fill); check the transform's direction and the fixed image")


# ----------------------------------------------------------------- apply --

def read_transform_error(path: str) -> InputError:
    """The error read_transform gives for ``path`` (its unknown extension)."""
    from ..morph.formats import read_transform
    try:
        read_transform(path)
    except InputError as exc:
        return exc
    return InputError(f"{path}: unknown transform file type")


def run_apply(argv: Sequence[str]) -> int:
    from ..io import load_volume, save_volume
    from ..morph.formats import read_transform
    from ..morph.transforms import Warp, apply_transform, as_geometry, update_header

    args = apply_parser().parse_intermixed_args(argv)
    pairs = list(args.pairs)
    if len(pairs) % 2:
        raise UsageError(f"images and outputs must come in IMAGE OUTPUT pairs after TRANS "
                         f"(got {len(pairs)} paths; see {PROG} apply -h)")
    images, outputs = pairs[0::2], pairs[1::2]
    if not math.isfinite(args.fill):
        raise UsageError(f"-f {args.fill}: the fill value must be a finite number")
    out_dtype = np.dtype(args.type) if args.type else None
    if out_dtype is not None and not _fits(args.fill, out_dtype):
        raise UsageError(f"-f {args.fill:g}: the fill value does not fit the output type {out_dtype}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: the number of threads must be at least 1")
    shard = resolve_shard_option(args.shard)

    # Every output before any work: extension, folder, not an input, no clash.
    protect = [os.path.realpath(p) for p in [args.trans, *images, *([args.fixed] if args.fixed else [])]]
    for out in outputs:
        try:
            check_output_path(out, input_paths=protect)
        except InputError as exc:
            raise UsageError(str(exc)) from None
    _no_duplicates({f"OUTPUT {k + 1}": p for k, p in enumerate(outputs)})
    if transform_kind(args.trans) is None:   # the file name alone is wrong: usage
        raise UsageError(str(read_transform_error(args.trans)))
    choose_device(False, args.threads)

    fixed_vol = _image(args.fixed, "--fixed") if args.fixed else None
    fixed = as_geometry(fixed_vol) if fixed_vol is not None else None
    try:
        trans = read_transform(args.trans, fixed=fixed)
    except InputError as exc:
        if transform_kind(args.trans) != "lta" or "volume info" not in str(exc):
            raise
        # A voxel-to-voxel LTA without volume info: the first image is the moving grid.
        trans = read_transform(args.trans, fixed=fixed, moving=as_geometry(_image(images[0], "IMAGE")))

    if args.header_only:
        if isinstance(trans, Warp):
            raise UsageError(f"-H: {args.trans} is a displacement field; header-only output needs a "
                             "linear transform (.lta, .txt, .tfm)")
        if args.fixed:
            say_warning(PROG, "--fixed is not used with -H (the voxels are not resampled)")
        grid = None
    else:
        grid = fixed if fixed is not None else trans.fixed
        if grid is None:
            raise UsageError(f"{args.trans}: this transform records no fixed-image grid (ITK affine): "
                             "pass --fixed FIXED_IMAGE, or -H to update the header only")
        if isinstance(trans, Warp) and not trans.grid.same_grid(grid):
            raise InputError(f"{args.trans}: displacement field grid ({trans.grid.describe()}) does not "
                             f"match --fixed {args.fixed} ({grid.describe()})")

    order = 0 if args.method == "nearest" else 1

    def move(job: Job) -> None:
        image, out = job.input, job.outputs["out"]
        vol = load_volume(image, allow_4d=True, dtype=None)
        dtype = _out_dtype(out_dtype, vol, image, args.fill)
        if args.header_only:
            save_volume(_with_singletons(vol.data, vol), vol, out, affine=update_header(trans, vol), dtype=dtype)
            return
        _check_coverage(trans, vol, grid, image)
        moved = _with_singletons(apply_transform(trans, vol, grid, order=order, fill=args.fill), vol)
        if fixed_vol is not None:   # the fixed image's header: its qform/sform codes and units
            save_volume(moved, fixed_vol, out, dtype=dtype)
        else:                       # only the transform's grid is known: a fresh header
            save_volume(moved, None, out, affine=grid.affine, dtype=dtype)  # type: ignore[union-attr]
    from .. import __version__
    jobs = [Job(image, {"out": out}) for image, out in zip(images, outputs)]
    # A complete output is skipped unless the transform, --fixed or an option changed.
    params = {"tool": f"{PROG} apply", "version": __version__, "transform": file_identity(args.trans),
              "fixed": file_identity(args.fixed) if args.fixed else None,
              "options": {"method": args.method, "type": args.type, "fill": args.fill, "header_only": args.header_only}}
    return run_jobs(PROG, jobs, [], "cpu", load=None, process=lambda job, _model: move(job), quiet=args.quiet,
                    overwrite=args.overwrite, shard=shard, params=params)


# -------------------------------------------------------------- register --

def _freesurfer_register_flags(args: argparse.Namespace) -> None:
    """mri_synthmorph's ``--model joint`` names the transformation model (our
    ``-m``), where ours takes a model path; -n/-e are noted as ignored."""
    from .compat import note
    if args.model in MODES and not os.path.exists(args.model):
        args.mode, args.model = args.model, None
    for flag, value in (("-n", args.steps), ("-e", args.extent)):
        if value is not None:
            note(f"{PROG} register", f"{flag} {value} ignored: the model sets its own")


def run_register(argv: Sequence[str]) -> int:
    from ..morph.formats import read_transform
    from ..morph.transforms import Affine

    args = register_parser().parse_intermixed_args(argv)
    _freesurfer_register_flags(args)  # issue 35
    mode = args.mode
    linear = mode in LINEAR_MODES
    if not math.isfinite(args.regularization) or not 0.0 <= args.regularization <= 1.0:
        raise UsageError(f"-r {args.regularization}: the regularization weight must be between 0 and 1")
    if args.header_only and not linear:
        raise UsageError(f"-H: header-only output needs a linear registration (-m rigid or -m affine), "
                         f"not -m {mode}")
    if args.middle and (not linear or args.init):     # issue 32: -M
        raise UsageError(f"-M: the halfway space needs -m rigid or -m affine (not -m {mode}) and no -i"
                         if not linear else "-M: -i INIT is not supported with the halfway space")
    if args.affine_model is not None and mode != "joint":
        raise UsageError("--affine-model is only used with -m joint (use --model for the other modes)")
    images = {"-o": args.out_moving, "-O": args.out_fixed}
    transforms = {"-t": args.trans, "-T": args.inverse}
    requested = {k: v for k, v in {**images, **transforms}.items() if v is not None}
    if not requested:
        raise UsageError("no output requested: give at least one of -o MOVED, -O FIXED_IN_MOVING, "
                         "-t TRANS, -T INVERSE")

    inputs = [args.moving, args.fixed] + ([args.init] if args.init else [])
    protect = [os.path.realpath(p) for p in inputs]
    for option, path in images.items():
        if path is not None:
            try:
                check_output_path(path, input_paths=protect)
            except InputError as exc:
                raise UsageError(f"{option} {exc}") from None
    kinds = ("lta", "itk") if linear else ("nifti", "mgh")
    for option, path in transforms.items():
        if path is not None:
            _check_transform_output(path, option, kinds, protect)
    _no_duplicates(requested)

    if args.init:
        try:
            init = read_transform(args.init)
        except InputError as exc:
            raise InputError(f"-i {exc}") from None
        if not isinstance(init, Affine):
            raise UsageError(f"-i {args.init}: the initial transform must be linear (.lta, .txt, .tfm)")
    device = choose_device(args.gpu, args.threads)

    failed = False
    for path in (args.moving, args.fixed):
        try:
            check_input_path(path)
        except InputError as exc:
            say_error(PROG, str(exc))
            failed = True
    if failed:
        return 1

    models = _load_models(args, mode, device)
    info(PROG, f"-m {mode} on {device_text(device)}", args.quiet)
    if args.middle:     # issue 32: both images to the halfway space
        return _register_middle(args, models["linear"])
    return _register_and_write(args, mode, models, init if args.init else None)


MODEL_TYPES = {"rigid": ("rigid",), "affine": ("affine",), "deform": ("svf", "affine", "rigid")}
# The deformable step is a test-time fit (synthtools.morph.svf_fit) on the
# fixed brain found by the affine network, until an SVF network ships.
DEFAULT_MODELS = {"rigid": "synthmorph-rigid", "affine": "synthmorph-affine", "deform": "synthmorph-affine"}


def _load_models(args, mode: str, device: str) -> dict:
    """The networks a mode needs: 'linear' (rigid/affine) and/or 'deform'.
    Joint: --affine-model (default synthmorph-affine) then --model (default:
    synthmorph-affine too, whose feature maps delimit the brain for the
    test-time deformable fit; an 'svf' network replaces the fit)."""
    from ..morph.register import model_kind

    def load(name: str | None, kind: str, option: str):
        model = load_task_model(name or DEFAULT_MODELS[kind], device, task="register",
                                task_text="registration", user_given=name is not None)
        if model_kind(model) not in MODEL_TYPES[kind]:
            raise InputError(f"{option} {model.path}: a {model_kind(model) or 'unknown'} registration model, "
                             f"-m {mode} needs a {kind} model")
        return model

    if mode in LINEAR_MODES:
        return {"linear": load(args.model, mode, "--model")}
    if mode == "deform":
        return {"deform": load(args.model, "deform", "--model")}
    linear = load(args.affine_model, "affine", "--affine-model")
    return {"linear": linear, "deform": linear if args.model is None else load(args.model, "deform", "--model")}


def _register_and_write(args, mode: str, models: dict, init) -> int:
    """Load both images, register, write every requested output."""
    from ..conform import check_field_of_view
    from ..io import load_volume, save_volume
    from ..morph.register import register
    from ..morph.similarity import identity_similarity, similarity
    from ..morph.svf_fit import EmptyMaskError
    from ..morph.formats import write_transform
    from ..morph.transforms import apply_transform, as_geometry, update_header
    from ..space import ModelSpace

    progress = Progress(PROG, args.quiet)
    try:
        moving = load_volume(args.moving, allow_4d=True, dtype=None)
        fixed = load_volume(args.fixed, allow_4d=True, dtype=None)
        # Too little anatomy for the networks: refuse rather than return a wild transform.
        min_mm = max(ModelSpace.of(m).min_extent_mm for m in models.values())
        for vol, path in ((moving, args.moving), (fixed, args.fixed)):
            check_field_of_view(vol.shape, vol.affine, path, min_mm, "registration")
    except InputError as exc:
        say_error(PROG, str(exc))
        return 1
    progress("read the images")
    try:
        want_inverse = args.out_fixed is not None or args.inverse is not None
        reg = register(moving, fixed, mode, models, init=init, regularization=args.regularization,
                       inverse=want_inverse, progress=progress)
        after, before = similarity(reg.transform, moving, fixed), identity_similarity(moving, fixed)
        if after < before - SIMILARITY_MARGIN:
            say_warning(PROG, f"{args.moving}: the registered images are less similar than before registration "
                        f"(normalised mutual information {after:.3f} < {before:.3f} with the identity); "
                        "check the result (contrast, field of view, a very different starting pose?)")
        progress("similarity check")
        fixed_g, moving_g = as_geometry(fixed), as_geometry(moving)
        if args.out_moving:
            dtype = np.dtype(moving.data.dtype).newbyteorder("=")
            if args.header_only:
                save_volume(_with_singletons(moving.data, moving), moving, args.out_moving,
                            affine=update_header(reg.transform, moving), dtype=dtype)
            else:
                moved = _with_singletons(apply_transform(reg.transform, moving, fixed_g), moving)
                save_volume(moved, fixed, args.out_moving, dtype=dtype)
            info(PROG, f"moved image -> {args.out_moving}", args.quiet)
        if args.out_fixed:
            dtype = np.dtype(fixed.data.dtype).newbyteorder("=")
            if args.header_only:
                save_volume(_with_singletons(fixed.data, fixed), fixed, args.out_fixed,
                            affine=update_header(reg.inverse, fixed), dtype=dtype)
            else:
                moved = _with_singletons(apply_transform(reg.inverse, fixed, moving_g), fixed)
                save_volume(moved, moving, args.out_fixed, dtype=dtype)
            info(PROG, f"fixed image in moving space -> {args.out_fixed}", args.quiet)
        if args.trans:
            write_transform(reg.transform, args.trans, fixed=fixed_g, moving=moving_g)
            info(PROG, f"transform -> {args.trans}", args.quiet)
        if args.inverse:
            write_transform(reg.inverse, args.inverse, fixed=moving_g, moving=fixed_g)
            info(PROG, f"inverse transform -> {args.inverse}", args.quiet)
        progress("wrote the outputs")
    except InputError as exc:
        say_error(PROG, str(exc))
        return 1
    except EmptyMaskError as exc:   # raised before any output is written
        say_error(PROG, f"{args.fixed}: {exc}")
        return 1
    return 0


# Normalised mutual information below the identity's by more than this warns
# (NMI is 1..2; resampling noise moves it by about 0.001).
SIMILARITY_MARGIN = 0.005


# ------------------------------------------------ template, -M (issue 32) --

def template_parser() -> Parser:
    p = Parser(
        prog=f"{PROG} template",
        description="Unbiased within-subject template of N >= 2 images of one subject (sessions, contrasts, "
        "resolutions): one linear transform per input into a common mid-space that favours no input "
        "(pairwise network fits averaged as matrix logarithms, refinement of every pair both ways, "
        "Karcher mean; see synthtools.morph.template). The template image is the voxel-wise median of the "
        "intensity-normalised inputs resampled once into it, on a grid isotropic at the finest input "
        "resolution covering the union of the brains.",
        epilog="Each input's transform is written as DIR/<input name>.lta (template to input pull-back, "
        "as 'register -t': 'synthmorph apply DIR/NAME.lta NAME.nii.gz OUT' resamples it into the template). "
        "4D inputs: the first frame is used.",
    )
    p.add_argument("inputs", nargs="+", metavar="IMAGE", help="input images (at least two)")
    p.add_argument("-o", "--out", required=True, metavar="TEMPLATE", help="template image (median)")
    p.add_argument("-t", "--trans-dir", metavar="DIR", help="folder for the transforms DIR/<input name>.lta")
    p.add_argument("-O", "--out-dir", metavar="DIR", help="folder for the inputs resampled into the template")
    p.add_argument("-m", "--mode", choices=LINEAR_MODES, default="rigid",
                   help="transformation model (default: rigid, the longitudinal recipe)")
    p.add_argument("--itk", action="store_true", help="also write DIR/<input name>.txt (ITK/ANTs) with -t")
    p.add_argument("-g", "--gpu", action="store_true", help="run the network on the GPU (CUDA)")
    p.add_argument("-j", "--threads", type=int, metavar="THREADS", help="number of CPU threads for torch")
    p.add_argument("--model", metavar="PATH", help="alternative rigid/affine model folder or metadata.json")
    return p


def _input_name(path: str) -> str:
    """File name without folder and image extension."""
    from ..io import SUPPORTED_EXTENSIONS

    base = os.path.basename(path)
    for ext in sorted(SUPPORTED_EXTENSIONS, key=len, reverse=True):
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return base


def _output_folder(path: str, option: str, protect: Sequence[str]) -> str:
    """An output folder: created if its parent exists; not an input file."""
    if os.path.realpath(path) in protect or os.path.isfile(path):
        raise UsageError(f"{option} {path}: is a file, a folder is required")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{option} {path}: parent folder {parent} does not exist")
    os.makedirs(path, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: folder is not writable")
    return path


def run_template(argv: Sequence[str]) -> int:
    from ..io import load_volume, save_volume
    from ..morph.template import build_template, check_inputs, resample_input, template_grid, template_image
    from ..morph.formats import write_transform

    args = template_parser().parse_intermixed_args(argv)
    if len(args.inputs) < 2:
        raise UsageError(f"a template needs at least two input images (got {len(args.inputs)}; "
                         f"use '{PROG} register' for one pair)")
    if args.itk and not args.trans_dir:
        raise UsageError("--itk: give -t DIR for the transforms")
    protect = [os.path.realpath(p) for p in args.inputs]
    names = [_input_name(p) for p in args.inputs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise UsageError(f"two inputs are named '{dup}': the outputs DIR/<input name> would collide")
    try:
        check_output_path(args.out, input_paths=protect)
    except InputError as exc:
        raise UsageError(f"-o {exc}") from None
    device = choose_device(args.gpu, args.threads)
    trans_dir = _output_folder(args.trans_dir, "-t", protect) if args.trans_dir else None
    out_dir = _output_folder(args.out_dir, "-O", protect) if args.out_dir else None
    model = _load_models(SimpleNamespace(model=args.model), args.mode, device)["linear"]

    try:
        volumes = [load_volume(p, allow_4d=True, dtype=None) for p in args.inputs]
        check_inputs(volumes)
    except InputError as exc:
        say_error(PROG, str(exc))
        return 1
    result = build_template(model, volumes, log=lambda line: print(f"{PROG}: {line}", flush=True))
    result.grid = template_grid(result)
    print(f"{PROG}: template grid {result.grid.describe()}", flush=True)
    resampled = [resample_input(result, k, v) for k, v in enumerate(volumes)]
    try:
        save_volume(template_image(result, volumes, resampled=resampled), None, args.out,
                    affine=result.grid.affine, dtype=np.float32)
        print(f"{PROG}: template -> {args.out}", flush=True)
        for k, (path, name) in enumerate(zip(args.inputs, names)):
            ext = os.path.basename(path)[len(name):] or ".nii.gz"
            if out_dir:
                dtype = np.dtype(volumes[k].data.dtype).newbyteorder("=")
                out = os.path.join(out_dir, name + ext)
                save_volume(resampled[k][0], None, out, affine=result.grid.affine, dtype=dtype)
                print(f"{PROG}: {path} in template space -> {out}", flush=True)
            if trans_dir:
                t = result.transforms[k]
                for suffix in (".lta", ".txt") if args.itk else (".lta",):
                    write_transform(t, os.path.join(trans_dir, name + suffix))
                print(f"{PROG}: transform -> {os.path.join(trans_dir, name)}.lta", flush=True)
    except InputError as exc:
        say_error(PROG, str(exc))
        return 1
    return 0


def _register_middle(args, model) -> int:
    """``register -M``: both images into the halfway space (the template of
    the two, :func:`synthtools.morph.template.halfway`): -o/-O the moving
    and fixed images on the template grid (or, with -H, their headers moved
    there), -t/-T the pull-backs halfway -> moving and halfway -> fixed."""
    from ..io import load_volume, save_volume
    from ..morph.template import halfway, resample_input, template_grid
    from ..morph.formats import write_transform

    try:
        moving = load_volume(args.moving, allow_4d=True, dtype=None)
        fixed = load_volume(args.fixed, allow_4d=True, dtype=None)
        res = halfway(model, moving, fixed)
        res.grid = template_grid(res)
        outs = [(args.out_moving, args.trans, moving, 1, "moving"), (args.out_fixed, args.inverse, fixed, 0, "fixed")]
        for image, trans, vol, k, role in outs:
            dtype = np.dtype(vol.data.dtype).newbyteorder("=")
            if image and args.header_only:
                save_volume(vol.data, vol, image, affine=res.poses[k] @ vol.affine, dtype=dtype)
            elif image:
                save_volume(resample_input(res, k, vol)[0], None, image, affine=res.grid.affine, dtype=dtype)
            if image:
                print(f"{PROG}: {role} image in halfway space -> {image}", flush=True)
            if trans:
                write_transform(res.transforms[k], trans)
                print(f"{PROG}: {role} to halfway transform -> {trans}", flush=True)
    except InputError as exc:
        say_error(PROG, str(exc))
        return 1
    return 0


# ------------------------------------------------------------------ main --

def _looks_like_register(arg: str) -> bool:
    """mri_synthmorph style 'synthmorph [OPTIONS] MOVING FIXED' (no subcommand)."""
    from ..io import SUPPORTED_EXTENSIONS

    return arg.startswith("-") or os.path.exists(arg) or arg.lower().endswith(SUPPORTED_EXTENSIONS)


def _run(argv: Sequence[str] | None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        # Bare 'synthmorph': say what it expects (usage on stderr), exit 2 as any usage error.
        print(f"usage: {USAGE}\n{PROG}: error: a subcommand and its images are required "
              f"(see {PROG} -h)", file=sys.stderr)
        return 2
    head = args[0]
    if head in ("-h", "--help"):
        top_parser().print_help()
        return 0
    if head == "--version":
        from .. import __version__
        print(f"{PROG} (synthtools) {__version__}")
        return 0
    if head == "apply":
        return run_apply(args[1:])
    if head == "register":
        return run_register(args[1:])
    if head == "template":
        return run_template(args[1:])
    if _looks_like_register(head):
        return run_register(args)
    raise UsageError(f"unknown subcommand '{head}' (use register, apply or template; see {PROG} -h)")


def run(argv: Sequence[str] | None = None) -> int:
    """The whole tool; returns the exit code (0, 1 or 2)."""
    return entry(PROG, _run, argv)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console entry point: runs the tool and exits with its code."""
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
