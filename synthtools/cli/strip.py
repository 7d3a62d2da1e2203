"""``synthstrip``: skull-stripping from the command line, compatible with
FreeSurfer's ``mri_synthstrip``.

    synthstrip IN OUT
    synthstrip -i IN [IN ...] [-o STRIPPED] [-m MASK] [-d SDT] [-b MM] ...

The flow reads top to bottom: parse arguments, collect inputs, plan and
validate every output path, check the device and model, then process the
inputs one at a time. Everything that can be checked without the network is
checked before it runs, so a typo never costs a long run and never leaves a
partial output. Errors are single lines ``synthstrip: error: ...``; exit
codes as every tool (:mod:`synthtools.cli.common`): 2 for a bad command line
(nothing processed), 1 for a bad input file, model or failed run.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import NoReturn, Sequence

import numpy as np

from ..io import InputError
from .common import (Job, OutputSet, Parser, UsageError, add_batch_options, add_standard_options, batch_params,
                     check_matplotlib, check_outputs, check_png_path, choose_device,
                     collect_inputs as _collect_inputs, expand_outputs, load_task_model, resolve_shard_option,
                     run_jobs, save_snapshot, say_warning)
from .entry import entry

PROG = "synthstrip"
DEFAULT_MODEL = "synthstrip"
SUFFIXES = {"stripped": "_stripped", "mask": "_mask", "sdt": "_sdt"}
OPTION_OF = {"stripped": "-o", "mask": "-m", "sdt": "-d", "snapshot": "--snapshot"}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description="Robust, universal skull-stripping for brain images of any contrast "
        "or resolution (SynthStrip method).",
        epilog="Many inputs: '-i a.nii.gz b.nii.gz -o outdir/ -m maskdir/' writes "
        "<stem>_stripped, <stem>_mask, <stem>_sdt (and <stem>_snapshot.png) in those folders, "
        "with the input's file format. A folder argument must exist or end with '/' (it is "
        "then created). '-i list.txt' reads one input path per line (blank lines and lines "
        "starting with '#' are skipped; relative paths are relative to the current folder).",
    )
    p.add_argument("positional", nargs="*", metavar="IN [OUT]",
                   help="input image and, optionally, the stripped output (alternative to -i/-o)")
    p.add_argument("-i", "--image", nargs="+", metavar="IN", dest="inputs",
                   help="input image(s) (.nii.gz, .nii, .mgz, .mgh) or .txt list(s) of paths")
    p.add_argument("-o", "--out", metavar="STRIPPED", help="skull-stripped image (file or folder)")
    p.add_argument("-m", "--mask", metavar="MASK", help="binary brain mask (file or folder)")
    p.add_argument("-d", "--sdt", metavar="SDT",
                   help="signed distance to the brain boundary in mm, negative inside (file or folder)")
    p.add_argument("-g", "--gpu", action="store_true", help="run the network on the GPU (CUDA)")
    p.add_argument("-b", "--border", type=float, default=1.0, metavar="MM",
                   help="mask border threshold in mm; larger grows the mask (default: 1)")
    p.add_argument("-f", "--fill", type=float, default=0.0, metavar="VALUE",
                   help="value of removed voxels in the stripped image (default: 0)")
    p.add_argument("--no-csf", action="store_true",
                   help="exclude CSF from the brain border (the model's second brain definition; "
                   "the shipped model has both)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                   help="test-time augmentation (on unless --no-flip): also predict on the left-right "
                   "mirrored image and average the two distance maps (about 1.5x the time)")
    p.add_argument("--model", metavar="PATH", help="alternative model folder or metadata.json, or FreeSurfer's "
                   "SynthStrip weights ($FREESURFER_HOME/models/synthstrip.1.pt; detected from the file)")
    # issue 33 (FreeSurfer weights): report how a weight file matches the published layout
    p.add_argument("--check", action="store_true",
                   help="with --model FILE: print the layout match and a checksum of the mask of the bundled example")
    p.add_argument("--snapshot", metavar="PNG",
                   help="PNG of three orthogonal slices with the mask outline (file or folder)")
    p.add_argument("--overwrite-input", action="store_true",
                   help="allow an output to replace its own input image")
    p.add_argument("--example", action="store_true",
                   help="use the bundled example scan (a clinical FLAIR, CC-BY) as the input")
    add_batch_options(p)
    # -t as mri_synthstrip; -n as the NiPreps SynthStrip interface sends it.
    add_standard_options(p, threads_flags=("-t", "-n", "--threads"))
    from .. import __version__  # issue 35: mri_synthstrip's -v is --version
    p.add_argument("-v", action="version", version=f"%(prog)s (synthtools) {__version__}",
                   help="same as --version (as mri_synthstrip)")
    return p


# ------------------------------------------------------ inputs, outputs --

def collect_inputs(args: argparse.Namespace) -> list[str]:
    """Input paths from ``IN [OUT]`` or ``-i``, with .txt lists expanded."""
    return _collect_inputs(args, PROG, "stripped")


def _file_name(kind: str, stem: str, ext: str) -> str:
    return f"{stem}_snapshot.png" if kind == "snapshot" else f"{stem}{SUFFIXES[kind]}{ext}"


def plan_outputs(args: argparse.Namespace, inputs: list[str]) -> tuple[list[Job], list[str]]:
    """Output paths of every input, validated; also the folders to create.

    Raises UsageError on any problem: nothing has been written yet.
    """
    requested = {"stripped": args.out, "mask": args.mask, "sdt": args.sdt, "snapshot": args.snapshot}
    requested = {k: v for k, v in requested.items() if v is not None}
    if not set(requested) - {"snapshot"}:
        raise UsageError("no output requested: give at least one of -o (stripped), -m (mask), -d (sdt)")
    if args.snapshot is not None:
        check_matplotlib()
    jobs = [Job(p) for p in inputs]
    to_create = expand_outputs(requested, jobs, OPTION_OF, _file_name)
    check_outputs(jobs, to_create, OPTION_OF, overwrite_input=args.overwrite_input,
                  checkers={"snapshot": check_png_path})
    return jobs, to_create


# ------------------------------------------------------------------ model --

def load_strip_model(args: argparse.Namespace, device: str):
    """Load and sanity-check the skull-stripping model (UsageError or
    InputError if unusable). ``--no-csf`` needs a model with the no-CSF
    brain definition as an output channel (the shipped one has it)."""
    from ..skullstrip import channel_of

    def load(name, user_given):
        return load_task_model(name, device, task="skullstrip", task_text="skull-stripping",
                               user_given=user_given)
    # --- issue 33: FreeSurfer's .pt files, and placeholder --model values ---
    from ..freesurfer_cli import load_model_arg
    args.model, model = load_model_arg(PROG, args, device)
    if model is not None:
        return model
    # --- end issue 33 ---
    model = load(args.model or DEFAULT_MODEL, args.model is not None)
    if args.no_csf and channel_of(model, "nocsf") is None:
        raise InputError(f"--no-csf: model {model.path} has no no-CSF output (its metadata lists no "
                         "'nocsf' channel); use a model trained with both brain definitions")
    return model


def strip_channel(model, args: argparse.Namespace) -> int:
    """The output channel for the requested brain definition (0 if the model has one)."""
    from ..skullstrip import channel_of
    return channel_of(model, "nocsf" if args.no_csf else "csf") or 0


# ------------------------------------------------------------ processing --

def _fill_value(fill: float, dtype: np.dtype):
    """``fill`` in the image's type, refusing values it cannot hold."""
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if fill != round(fill) or not info.min <= fill <= info.max:
            raise InputError(f"fill value {fill:g} does not fit the image's data type {dtype}")
    return dtype.type(fill)


def process(job: Job, model, args: argparse.Namespace) -> None:
    """Strip one input and write its outputs; on any failure, none remain."""
    from ..io import load_volume, save_volume
    from ..skullstrip import strip
    if model.meta.get("freesurfer"):  # issue 33: FreeSurfer's weights, their published preprocessing
        from ..freesurfer_strip import strip  # noqa: F811 (rebinds the name on purpose)

    # One load in the stored type: it is what we write back; the network
    # side converts to float itself.
    vol = load_volume(job.input, allow_4d=True, dtype=None)
    fill = _fill_value(args.fill, vol.data.dtype)
    result = strip(model, vol, border=args.border, channel=strip_channel(model, args), flip=args.flip)
    if not result.mask.any():
        say_warning(PROG, f"{job.input}: the brain mask is empty (is this a head image?)")

    images = {}
    if "stripped" in job.outputs:
        stripped = vol.data.copy()
        stripped[result.mask == 0] = fill
        images["stripped"] = (stripped, vol.data.dtype)
    if "mask" in job.outputs:
        images["mask"] = (result.mask, np.uint8)
    if "sdt" in job.outputs:
        images["sdt"] = (result.sdt, np.float32)

    with OutputSet() as out:  # all of this input's outputs, or none
        for kind, (data, dtype) in images.items():
            out.add(save_volume(data, vol, job.outputs[kind], dtype=dtype))
        if "snapshot" in job.outputs:
            frame0 = (lambda a: a[..., 0] if a.ndim == 4 else a)
            out.add(save_snapshot(frame0(vol.data), vol.affine, job.outputs["snapshot"],
                                  mask=frame0(result.mask)))


# ------------------------------------------------------------------ main --

def run(argv: Sequence[str] | None = None) -> int:
    """The whole tool; returns the exit code (0, 1 or 2)."""
    return entry(PROG, _run, argv)


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    if args.check:  # issue 33
        from ..freesurfer_cli import run_check
        return run_check(PROG, args)
    inputs = collect_inputs(args)
    if not math.isfinite(args.border):
        raise UsageError(f"-b {args.border}: the border must be a finite number of mm")
    if not math.isfinite(args.fill):
        raise UsageError(f"-f {args.fill}: the fill value must be a finite number")
    shard = resolve_shard_option(args.shard)
    jobs, to_create = plan_outputs(args, inputs)
    params = batch_params(PROG, args, args.model or DEFAULT_MODEL, outputs=("out", "mask", "sdt", "snapshot"))
    device = choose_device(args.gpu, args.threads)
    return run_jobs(PROG, jobs, to_create, device, load=lambda: load_strip_model(args, device),
                    process=lambda job, model: process(job, model, args),
                    overwrite=args.overwrite, shard=shard, params=params)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console entry point: runs the tool and exits with its code."""
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
