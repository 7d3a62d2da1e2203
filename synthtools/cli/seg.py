"""``synthseg``: whole-brain segmentation from the command line (SynthSeg
method, 32 FreeSurfer structures), in the style of FreeSurfer's
``mri_synthseg``.

    synthseg IN OUT
    synthseg -i IN [IN ...] -o OUT [--vol CSV] [--post POST] [--resample IMG] [--qc CSV] ...

Same flow, errors and exit codes as ``synthstrip`` (see
:mod:`synthtools.cli.common`): every output path is checked before the
network runs, each input's outputs are written all-or-nothing, a failing
input is reported on one line and the batch goes on; exit code 2 means a
bad command line (nothing processed), 1 a bad input file, model or failed
run. One line per stage with its time goes to stderr (``-q``: none).

Labels are written on the input's native grid with its header (int32), with
a ``<out stem>.lut.txt`` colour table beside them (and, for .mgz/.mgh, the
colour table embedded in the file); ``--keep-conformed`` writes them on the
network's grid instead. Volumes and QC scores are measured on the grid of
the written labels.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from typing import NoReturn, Sequence

import numpy as np

from ..io import InputError
from .common import (Job, OutputSet, Parser, Progress, UsageError, add_batch_options, add_standard_options,
                     batch_params, check_file_path, check_matplotlib, check_outputs, check_png_path, choose_device,
                     collect_inputs, expand_outputs, list_files, load_task_model, resolve_shard_option, run_jobs,
                     save_snapshot, say_warning, split_ext)
from .entry import entry

PROG = "synthseg"
DEFAULT_MODEL = "synthseg"
SUFFIXES = {"seg": "_synthseg", "post": "_posteriors", "resample": "_resampled"}
OPTION_OF = {"seg": "-o", "post": "--post", "resample": "--resample", "snapshot": "--snapshot",
             "lut": "-o (colour table)", "vol": "--vol", "qc": "--qc"}
TOTAL_COLUMN = "Total-Intracranial"
LUT_SUFFIX = ".lut.txt"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description="Whole-brain segmentation of brain images of any contrast or resolution "
        "(SynthSeg method): 32 FreeSurfer structures, on the input's own grid.",
        epilog="Many inputs: '-i a.nii.gz b.nii.gz -o outdir/' writes <stem>_synthseg (with "
        "<stem>_synthseg.lut.txt), and with folders for --post/--resample/--snapshot "
        "<stem>_posteriors, <stem>_resampled, <stem>_snapshot.png, in the input's file format. "
        "A folder argument must exist or end with '/' (it is then created). --vol and --qc are "
        "one table for all inputs, a row each; an existing table with the same columns gets the "
        "rows added (an input's earlier row is replaced). '-i list.txt' reads one input path per line (blank lines and lines "
        "starting with '#' are skipped; relative paths are relative to the current folder).",
    )
    p.add_argument("positional", nargs="*", metavar="IN [OUT]",
                   help="input image and, optionally, the label map (alternative to -i/-o)")
    p.add_argument("-i", "--image", "--i", nargs="+", metavar="IN", dest="inputs",
                   help="input image(s) (.nii.gz, .nii, .mgz, .mgh) or .txt list(s) of paths")
    p.add_argument("-o", "--out", "--o", metavar="OUT", help="label map, int32 FreeSurfer labels (file or folder)")
    p.add_argument("--vol", metavar="CSV",
                   help="table of soft volumes in mm^3 per structure and the total intracranial volume")
    p.add_argument("--post", metavar="POST",
                   help="posteriors: 4D float32, one frame per label, on the grid of the labels (file or folder)")
    p.add_argument("--resample", metavar="IMAGE",
                   help="the image the network saw: conformed and normalised to [0, 1] (file or folder)")
    p.add_argument("--qc", metavar="CSV",
                   help="table of QC scores in [0, 1]: mean maximum posterior over each structure group")
    p.add_argument("--crop", nargs="+", type=int, metavar="N",
                   help="crop the network's input around its centre to N^3 (or N1 N2 N3) voxels of its "
                   "grid, rounded up to the network's multiple, to save memory; outside is background")
    p.add_argument("-g", "--gpu", action="store_true", help="run the network on the GPU (CUDA)")
    p.add_argument("--model", metavar="PATH", help="alternative model folder or metadata.json, or FreeSurfer's "
                   "SynthSeg 2.0 / robust 2.0 weights ($FREESURFER_HOME/models/synthseg_2.0.h5; detected from the file)")
    # issue 33 (FreeSurfer weights): report how a weight file matches the published layout
    p.add_argument("--check", action="store_true",
                   help="with --model FILE: print the layout match and a checksum of the labels of the bundled example")
    p.add_argument("--keep-conformed", action="store_true",
                   help="write labels and posteriors on the network's grid (its voxel size, LIA axes) "
                   "instead of the input's")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                   help="test-time augmentation (on unless --no-flip): also segment the left-right "
                   "mirrored image and average the two (twice the network time)")
    p.add_argument("--refine", action=argparse.BooleanOptionalAction, default=True,
                   help="intensity refinement (on unless --no-refine): take the network's posteriors as "
                   "a prior and fit an intensity model per structure to this image, so boundaries follow "
                   "its edges (shipped model, vxm T1 mean Dice 0.744 -> 0.793; BrainWeb grey/white matter 0.81-0.86 -> 0.93-0.96)")
    p.add_argument("--bias-field", action=argparse.BooleanOptionalAction, default=True,
                   help="with the refinement (on unless --no-bias-field): also fit a smooth multiplicative "
                   "intensity field (coil inhomogeneity), as SPM and SAMSEG do")
    p.add_argument("--atlases", type=int, metavar="N",
                   help="register the model's first N bundled atlases to the scan and multiply their labels "
                   "into the network's prior before the refinement (default: the model's, 3 for the shipped "
                   "one: vxm T1 mean Dice 0.793 -> 0.804, ~3-5 s an atlas; 0: off)")
    p.add_argument("--snapshot", metavar="PNG",
                   help="PNG of three orthogonal slices with the labels in colour (file or folder)")
    p.add_argument("--example", action="store_true",
                   help="use the bundled example scan (a clinical FLAIR, CC-BY) as the input")
    add_batch_options(p)
    add_standard_options(p, threads_flags=("-t", "--threads"), quiet=True)
    add_freesurfer_flags(p)
    return p


def add_freesurfer_flags(p: argparse.ArgumentParser) -> None:
    """mri_synthseg's flags without a synthtools equivalent (issue 35):
    accepted with their meaning here, or refused on one line."""
    from .compat import refuse
    p.add_argument("--cpu", action="store_true", help="run on the CPU (the default without -g; as mri_synthseg)")
    p.add_argument("--fast", action="store_true",
                   help="as mri_synthseg: skip the optional steps, i.e. --no-flip --no-refine --atlases 0")
    p.add_argument("--robust", action="store_true",
                   help="accepted (mri_synthseg's model for clinical scans): the shipped model is trained on "
                   "the whole resolution/contrast range; for FreeSurfer's robust weights give "
                   "--model synthseg_robust_2.0.h5")
    p.add_argument("--ct", action="store_true",
                   help="CT in Hounsfield units: clip intensities to [0, 80] before segmenting (as mri_synthseg)")
    p.add_argument("--keepgeom", action="store_true",
                   help="accepted: labels are on the input's grid by default (see --keep-conformed)")
    p.add_argument("--addctab", action="store_true",
                   help="accepted: .mgz label maps always embed the colour table")
    refuse(p, "--parc", reason="no cortical parcellation model is shipped (32 whole-brain structures)")
    refuse(p, "--v1", reason="SynthSeg 1.0 is not shipped")
    refuse(p, "--autocrop", reason="use --crop N to bound the network's field of view")
    refuse(p, "--noaddctab", reason=".mgz label maps always embed the colour table")
    refuse(p, "--photo", reason="Photo-SynthSeg (dissection photographs) is not shipped", takes_value=True)


def apply_freesurfer_flags(args: argparse.Namespace) -> None:
    """Resolve the accepted mri_synthseg flags into our options (UsageError on a conflict)."""
    from .compat import note
    if args.cpu and args.gpu:
        raise UsageError("--cpu and -g/--gpu contradict each other: give one")
    if args.keepgeom and args.keep_conformed:
        raise UsageError("--keepgeom and --keep-conformed contradict each other: give one")
    if args.fast:
        args.flip, args.refine, args.atlases = False, False, 0
    if args.robust:
        note(PROG, "--robust: using the shipped model (trained on the whole resolution and contrast range); "
                   "FreeSurfer's robust weights: --model synthseg_robust_2.0.h5")


# ------------------------------------------------------ inputs, outputs --

def _file_name(kind: str, stem: str, ext: str) -> str:
    return f"{stem}_snapshot.png" if kind == "snapshot" else f"{stem}{SUFFIXES[kind]}{ext}"


def lut_path(seg_path: str) -> str:
    """Colour table beside a label map: ``a/seg.nii.gz`` -> ``a/seg.lut.txt``."""
    return os.path.join(os.path.dirname(seg_path), split_ext(seg_path)[0] + LUT_SUFFIX)


def plan_outputs(args: argparse.Namespace, inputs: list[str]) -> tuple[list[Job], list[str]]:
    """Output paths of every input, validated; also the folders to create.

    Raises UsageError on any problem: nothing has been written yet.
    """
    per_input = {"seg": args.out, "post": args.post, "resample": args.resample, "snapshot": args.snapshot}
    per_input = {k: v for k, v in per_input.items() if v is not None}
    tables = {k: v for k, v in (("vol", args.vol), ("qc", args.qc)) if v is not None}
    if not (set(per_input) - {"snapshot"}) and not tables:
        raise UsageError("no output requested: give at least one of OUT or -o (labels), --post, "
                         "--resample, --vol, --qc")
    if args.snapshot is not None:
        check_matplotlib()
    what = {"vol": "volume table", "qc": "QC table"}
    for kind, path in tables.items():
        if not path:
            raise UsageError(f"{OPTION_OF[kind]}: empty path")
        if not path.lower().endswith(".csv"):  # checked here too: a table in a new folder skips the path check
            raise UsageError(f"{OPTION_OF[kind]} {path}: {what[kind]} must be a .csv file")
    jobs = [Job(p) for p in inputs]
    to_create = expand_outputs(per_input, jobs, OPTION_OF, _file_name)
    for job in jobs:
        if "seg" in job.outputs:
            job.outputs["lut"] = lut_path(job.outputs["seg"])
    checkers = {
        "snapshot": check_png_path,
        "lut": lambda p, prot: check_file_path(p, prot, LUT_SUFFIX, "colour table"),
        **{k: (lambda p, prot, k=k: check_file_path(p, prot, ".csv", what[k])) for k in tables},
    }
    check_outputs(jobs, to_create, OPTION_OF, checkers=checkers, shared=tables, protect=list_files(args))
    return jobs, to_create


def _crop(values: list[int] | None) -> tuple[int, ...] | None:
    if values is None:
        return None
    if len(values) not in (1, 3) or min(values) < 1:
        raise UsageError(f"--crop {' '.join(map(str, values))}: give one positive size or three (voxels)")
    return tuple(values) * (3 // len(values))


# ----------------------------------------------------------------- model --

def load_seg_model(args: argparse.Namespace, device: str):
    """Load and sanity-check the segmentation model (InputError if unusable: exit code 1)."""
    # --- issue 33: FreeSurfer's .h5 files, and placeholder --model values ---
    from ..freesurfer_cli import load_model_arg
    args.model, fs_model = load_model_arg(PROG, args, device)
    if fs_model is not None:
        return fs_model
    # --- end issue 33 ---
    model = load_task_model(args.model or DEFAULT_MODEL, device, task="segment", task_text="segmentation",
                            user_given=args.model is not None)
    out = model.meta.get("output", {})
    labels = out.get("labels")
    if out.get("type") != "softmax" or not isinstance(labels, list) or not labels \
            or not all(isinstance(v, int) and v >= 0 for v in labels) or len(set(labels)) != len(labels):
        raise InputError(f"model {model.path}: metadata lacks the output (type 'softmax' and a list of "
                         "distinct label values)")
    channels = getattr(model.net, "config", {}).get("out_channels", len(labels))
    if channels != len(labels):
        raise InputError(f"model {model.path}: {channels} output channels but {len(labels)} labels")
    if out.get("names") is not None and len(out["names"]) != len(labels):
        raise InputError(f"model {model.path}: {len(out['names'])} names for {len(labels)} labels")
    return model


def _names(model) -> list[str]:
    from ..seg.lut import names_for

    out = model.meta["output"]
    return [str(n) for n in out.get("names") or names_for(out["labels"])]


def volume_header(model) -> list[str]:
    """Columns of the --vol table: subject, one per structure, total intracranial."""
    values, names = model.meta["output"]["labels"], _names(model)
    return ["subject"] + [n for v, n in zip(values, names) if v != 0] + [TOTAL_COLUMN]


def qc_header(model) -> list[str]:
    """Columns of the --qc table: subject, one per structure group, mean."""
    from ..seg import QC_GROUPS

    values = set(model.meta["output"]["labels"])
    return ["subject"] + [g for g, members in QC_GROUPS.items() if values & set(members)] + ["mean"]


def _read_header(path: str) -> list[str] | None:
    """First row of an existing table (None if absent or empty)."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return None
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return next(csv.reader(f), None)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"{path}: cannot read the existing table ({type(exc).__name__})") from None


def check_tables(args: argparse.Namespace, model) -> None:
    """An existing --vol/--qc table must have our columns: rows are appended;
    ``--atlases`` must be within what the model ships (resolved here)."""
    from ..seg.atlas import atlas_files, default_atlases
    from ..weights import ModelError
    try:
        available = len(atlas_files(model))
    except ModelError as exc:
        raise InputError(str(exc)) from None
    if args.atlases is None:
        args.atlases = default_atlases(model)
    elif not 0 <= args.atlases <= available:
        raise UsageError(f"--atlases {args.atlases}: this model has {available} atlases (0..{available})")
    for option, path, header in (("--vol", args.vol, volume_header), ("--qc", args.qc, qc_header)):
        if path is None:
            continue
        found = _read_header(path)
        if found is not None and found != header(model):
            raise UsageError(f"{option} {path}: exists with other columns (another model or tool?); "
                             "choose a new file to start a table")


def _with_row(old: str, header: list[str], row: list[str]) -> str:
    """A table's text ``old`` with ``row`` added (the header first if new);
    an earlier row of the same subject is replaced, so a redone input is
    not counted twice."""
    rows = list(csv.reader(io.StringIO(old))) if old.strip() else [header]
    rows = [r for k, r in enumerate(rows) if k == 0 or not r or r[0] != row[0]] + [row]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(r for r in rows if r)
    return buf.getvalue()


def _has_row(path: str, subject: str) -> bool:
    """``path`` is a table with a row for ``subject``."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return any(r and r[0] == subject for r in csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return False


# ------------------------------------------------------------ processing --

def process(job: Job, model, args: argparse.Namespace) -> None:
    """Segment one input and write its outputs; on any failure, none remain."""
    from ..conform import check_field_of_view
    from ..io import load_volume, save_volume
    from ..seg.lut import color, mgh_colortable, write_lut
    from ..seg import qc_scores, segment, total_intracranial
    from ..space import ModelSpace
    if model.meta.get("freesurfer"):  # issue 33: FreeSurfer's weights, their published pre/post-processing
        from ..freesurfer_seg import segment  # noqa: F811 (rebinds the name on purpose)

    progress = Progress(PROG, args.quiet)
    vol = load_volume(job.input)
    if args.ct:  # issue 35: mri_synthseg --ct, Hounsfield units clipped to the brain's range
        vol.data = np.clip(vol.data, 0.0, 80.0)
    # A slab too thin for whole-brain labels: refuse rather than paint cortex on the scalp.
    check_field_of_view(vol.shape, vol.affine, job.input, ModelSpace.of(model).min_extent_mm,
                        "segmentation")
    progress("read the image")
    keep = args.keep_conformed
    result = segment(model, vol, flip=args.flip, crop=args.crop, refine=args.refine, bias_field=args.bias_field,
                     posteriors="post" in job.outputs and not keep, atlases=args.atlases, progress=progress)
    values, names = result.label_values, result.names
    if keep:  # the network's grid: fresh header with its affine
        labels, like, affine, summary = result.conformed_labels, None, result.affine, result.conformed_summary
    else:     # the input's grid and header
        labels, like, affine, summary = result.labels, vol, None, result.native
    if args.atlases and not result.atlases_used:
        say_warning(PROG, f"{job.input}: the atlas registration found no brain; segmented without atlases")
    if not labels.any():
        say_warning(PROG, f"{job.input}: the segmentation is empty (is this a brain image?)")

    with OutputSet() as out:  # all of this input's outputs, or none
        if "seg" in job.outputs:
            out.add(save_volume(labels, like, job.outputs["seg"], affine=affine, dtype=np.int32,
                                mgh_tags=mgh_colortable(values, names)))
            path = job.outputs["lut"]
            try:
                out.add(write_lut(path, values, names))
            except OSError as exc:
                raise InputError(f"{path}: could not write colour table ({exc.strerror or exc})") from None
        if "post" in job.outputs:
            post = np.moveaxis(result.conformed_posteriors.numpy(), 0, -1) if keep else result.posteriors
            out.add(save_volume(post, like, job.outputs["post"], affine=affine, dtype=np.float32))
        if "resample" in job.outputs:
            out.add(save_volume(result.image, None, job.outputs["resample"], affine=result.affine,
                                dtype=np.float32))
        if "snapshot" in job.outputs:
            image, img_affine = (result.image, result.affine) if keep else (vol.data, vol.affine)
            out.add(save_snapshot(image, img_affine, job.outputs["snapshot"], labels=labels,
                                  colors={int(v): color(v) for v in values}))
        if args.vol is not None:
            soft = summary.soft_volumes
            row = [job.input] + [f"{x:.3f}" for v, x in zip(values, soft) if v != 0]
            row.append(f"{total_intracranial(soft, values):.3f}")
            out.update(args.vol, lambda old, row=row: _with_row(old, volume_header(model), row))
        if args.qc is not None:
            scores = qc_scores(summary, values)
            row = [job.input] + [f"{scores[g]:.4f}" for g in qc_header(model)[1:]]
            out.update(args.qc, lambda old, row=row: _with_row(old, qc_header(model), row))
        progress("wrote the outputs")


# ------------------------------------------------------------------ main --

def run(argv: Sequence[str] | None = None) -> int:
    """The whole tool; returns the exit code (0, 1 or 2)."""
    return entry(PROG, _run, argv)


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    if args.check:  # issue 33
        from ..freesurfer_cli import run_check
        return run_check(PROG, args)
    apply_freesurfer_flags(args)  # issue 35
    inputs = collect_inputs(args, PROG, "label map")
    args.crop = _crop(args.crop)
    shard = resolve_shard_option(args.shard)
    jobs, to_create = plan_outputs(args, inputs)
    params = batch_params(PROG, args, args.model or DEFAULT_MODEL,
                          outputs=("out", "post", "resample", "snapshot", "vol", "qc"))
    tables = [t for t in (args.vol, args.qc) if t is not None]
    device = choose_device(args.gpu, args.threads)
    return run_jobs(PROG, jobs, to_create, device, load=lambda: load_seg_model(args, device),
                    process=lambda job, model: process(job, model, args),
                    after_load=lambda model: check_tables(args, model), quiet=args.quiet,
                    overwrite=args.overwrite, shard=shard, params=params,
                    # complete also means: its row is in each --vol/--qc table
                    complete=lambda job: all(_has_row(t, job.input) for t in tables))


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console entry point: runs the tool and exits with its code."""
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
