"""``synthtools-bids``: the BIDS App (https://bids-apps.neuroimaging.io).

    synthtools-bids BIDS_DIR OUTPUT_DIR participant [--participant-label L ...] [--session-label S ...]
                    [--tools strip,seg] [--suffix T1w] [--threads N] [--overwrite] [--shard I/N]
    synthtools-bids BIDS_DIR OUTPUT_DIR group

``participant``: skull-strip and/or segment every selected anatomical image
(found with pybids) and write BIDS-Derivatives (:mod:`synthtools.bids`).
Each (image, tool) pair is a case of a resumable batch
(:mod:`synthtools.batch`): a case whose outputs are complete (done-marker,
same version, model and options) is skipped, so a rerun only does what is
missing; ``--overwrite`` redoes everything. ``--shard I/N`` (or ``--shard
slurm``: the Slurm array task's) processes every N-th participant.
``group``: gathers every participant's volume table into
``group_volumes.tsv``.

Exit codes: 0 all done (or skipped), 1 at least one case failed (the others
ran; see the summary table), 2 nothing was run (bad arguments or dataset).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, NoReturn, Sequence

from .common import Parser, UsageError, say_error
from .entry import entry

PROG = "synthtools-bids"
TOOLS = ("strip", "seg")
MODEL_OF = {"strip": "synthstrip", "seg": "synthseg"}


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="BIDS App: brain extraction (synthstrip) and whole-brain segmentation "
               "(synthseg) of every anatomical image of a BIDS dataset, written as BIDS-Derivatives.",
               epilog="Outputs per image: *_desc-brain_mask.nii.gz, *_desc-brain_<suffix>.nii.gz (strip); "
               "*_dseg.nii.gz with its volumes in the sidecar, sub-<label>/sub-<label>_volumes.tsv in mm^3, a row per "
               "scan of every session (seg); top level: dataset_description.json, dseg.tsv; "
               "group level: group_volumes.tsv. Complete outputs are skipped on a rerun.")
    p.add_argument("bids_dir", metavar="BIDS_DIR", help="the input BIDS dataset")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="the derivatives folder (created if missing)")
    p.add_argument("analysis_level", metavar="{participant,group}", choices=("participant", "group"),
                   help="participant: process images; group: gather the volume tables")
    p.add_argument("--participant-label", "--participant_label", nargs="+", metavar="LABEL", dest="participants",
                   help="participants to process (01 or sub-01); default: all")
    p.add_argument("--session-label", "--session_label", nargs="+", metavar="LABEL", dest="sessions",
                   help="sessions to process (1 or ses-1); default: all")
    p.add_argument("--tools", default="strip,seg", metavar="LIST",
                   help="comma-separated tools to run: strip, seg (default: strip,seg)")
    p.add_argument("--suffix", default="T1w", metavar="SUFFIX",
                   help="input contrast, the BIDS suffix of anat images (default: T1w); one per output folder")
    p.add_argument("-t", "--threads", "--nthreads", type=int, metavar="N", help="number of CPU threads for torch")
    p.add_argument("-g", "--gpu", action="store_true", help="run the networks on the GPU (CUDA)")
    p.add_argument("--overwrite", action="store_true", help="redo cases whose outputs are already complete")
    p.add_argument("--shard", metavar="I/N", help="process shard I (from 0) of N: every N-th participant, sorted "
                   "by label, so one task writes all of a participant's files; 'slurm': I and N from the Slurm array "
                   "(SLURM_ARRAY_TASK_ID and the array's size)")
    p.add_argument("--border", type=float, default=1.0, metavar="MM", help="strip: mask border in mm (default: 1)")
    p.add_argument("--atlases", type=int, metavar="N", help="seg: bundled atlases used as a second prior "
                   "(default: the model's, 3; 0 is faster)")
    p.add_argument("--skip-bids-validation", "--skip_bids_validation", action="store_true",
                   help="index files that do not follow the BIDS naming rules too")
    return p


def _tools(text: str) -> list[str]:
    tools = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in tools if t not in TOOLS]
    if bad or not tools:
        raise UsageError(f"--tools {text}: choose from {', '.join(TOOLS)} (comma-separated)")
    return sorted(set(tools), key=TOOLS.index)


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("synthtools")
    except Exception:  # running from a source tree without an install
        return "unknown"


def _model_meta(name: str) -> dict[str, Any]:
    """A model's metadata (the weights are not loaded); UsageError if missing."""
    from ..weights import ModelError, read_metadata, resolve
    try:
        return read_metadata(resolve(name))
    except ModelError as exc:
        raise UsageError(str(exc)) from None


def _model_info(name: str) -> dict[str, Any]:
    """sha256 and training steps of a model, for the marker and dataset_description."""
    meta = _model_meta(name)
    return {"sha256": meta.get("sha256"), "steps": meta.get("steps")}


# ---------------------------------------------------------------- per case --

def _strip_case(inp, paths: dict[str, str], args: argparse.Namespace, device: str) -> None:
    from ..api import strip
    from ..bids import source_uri, write_json
    from .common import OutputSet

    out = strip(inp.path, border=args.border, device=device)
    with OutputSet() as files:   # the case's files, all or none
        for kind in ("mask", "stripped"):
            files.add(_save(getattr(out, kind), paths[kind]))
        files.add(write_json(paths["mask_json"], {"Type": "Brain", "Sources": [source_uri(inp)]}))
        files.add(write_json(paths["stripped_json"], {"SkullStripped": True, "Sources": [source_uri(inp)]}))


def _seg_case(inp, paths: dict[str, str], args: argparse.Namespace, device: str) -> dict[int, str]:
    from ..api import segment
    from ..bids import scan_volumes, source_uri, write_json
    from .common import OutputSet

    out = segment(inp.path, atlases=args.atlases, device=device)
    with OutputSet() as files:
        files.add(_save(out.labels, paths["dseg"]))
        # The scan's volumes ride in its sidecar; the participant's table is rebuilt from them.
        files.add(write_json(paths["dseg_json"], {"Sources": [source_uri(inp)], "Manual": False,
                                                  "Volumes": scan_volumes(out.volumes)}))
    return out.label_names


def _save(img, path: str) -> str:
    """Atomic write of a nibabel image (temp name in the same folder, then rename)."""
    from ..io import atomic_output
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_output(path, ".nii.gz", "image") as tmp:
        img.to_filename(tmp)
    return path


# ------------------------------------------------------------------- levels --

def run_participant(args: argparse.Namespace) -> int:
    from ..batch import Case, ShardError, resolve_shard, run_batch, select_shard
    from ..bids import BidsError, derivative_paths, find_inputs, write_top_level
    from .common import choose_device

    tools = _tools(args.tools)
    try:
        shard = resolve_shard(args.shard)
        inputs = find_inputs(args.bids_dir, participants=args.participants, sessions=args.sessions,
                             suffix=args.suffix, validate=not args.skip_bids_validation)
    except (ShardError, BidsError) as exc:
        raise UsageError(str(exc)) from None
    if not inputs:
        raise UsageError(f"{args.bids_dir}: no anat/*_{args.suffix}.nii[.gz] image for this selection")
    if args.atlases is not None and "seg" in tools:
        available = len((_model_meta(MODEL_OF["seg"]).get("atlas") or {}).get("files", []))
        if not 0 <= args.atlases <= available:
            raise UsageError(f"--atlases {args.atlases}: the segmentation model has {available} atlases "
                             f"(0..{available})")
    # Shards split the participants, so that one task writes all of a participant's files
    # (its volume table gathers every session).
    subjects = set(select_shard(sorted({i.subject for i in inputs}), shard))
    mine = [i for i in inputs if i.subject in subjects]
    device = choose_device(args.gpu, args.threads)
    version = _version()
    models = {MODEL_OF[t]: _model_info(MODEL_OF[t]) for t in tools}
    options = {"strip": {"border": args.border}, "seg": {"atlases": args.atlases}}

    cases, seen = [], {}
    for inp in mine:
        for tool, paths in derivative_paths(inp, args.output_dir, tools).items():
            for p in paths.values():   # e.g. sub-01_T1w.nii and sub-01_T1w.nii.gz
                if seen.setdefault(p, inp.relpath) != inp.relpath:
                    raise UsageError(f"{seen[p]} and {inp.relpath} would both write {p}")
            params = {"version": version, "model_sha256": models[MODEL_OF[tool]]["sha256"], **options[tool]}
            cases.append(Case(key=f"{inp.relpath} [{tool}]", outputs=list(paths.values()), params=params,
                              data=(tool, inp, paths)))
    label_names: dict[int, str] = {}

    def process(case: Case) -> None:
        tool, inp, paths = case.data
        if tool == "strip":
            _strip_case(inp, paths, args, device)
        else:
            label_names.update(_seg_case(inp, paths, args, device))

    os.makedirs(args.output_dir, exist_ok=True)
    write_top_level(args.output_dir, version, models, None)
    print(f"{PROG}: {len(mine)} of {len(inputs)} images"
          + (f" (shard {shard[0]}/{shard[1]})" if shard else "")
          + f", {len(subjects)} participant{'s' if len(subjects) != 1 else ''}, tools {','.join(tools)}", flush=True)
    report = run_batch(cases, process, overwrite=args.overwrite, prog=PROG, shard=shard)
    failed = report.failed
    if "seg" in tools:
        # The label table: from this run, else from the model (a run that skipped every case).
        write_top_level(args.output_dir, version, models, label_names or _model_labels())
        failed += _subject_tables(args.output_dir, sorted(subjects))
    if failed:
        say_error(PROG, f"{failed} of {len(cases)} cases failed (see the table above)" if report.failed
                  else "a participant's volume table could not be written")
    return 1 if failed else 0


def _subject_tables(out_dir: str, subjects: list[str]) -> int:
    """Rebuild each participant's volume table (all its sessions); the number that failed."""
    from ..bids import BidsError, write_subject_volumes
    failed = 0
    for subject in subjects:
        try:
            done = write_subject_volumes(out_dir, subject)
        except (BidsError, OSError) as exc:
            say_error(PROG, f"sub-{subject}: volume table not written: {exc}")
            failed += 1
            continue
        if done is not None:
            print(f"{PROG}: sub-{subject}: {done[1]} scan{'s' if done[1] != 1 else ''} -> {done[0]}", flush=True)
    return failed


def _model_labels() -> dict[int, str]:
    from ..seg.lut import names_for
    out = _model_meta(MODEL_OF["seg"])["output"]
    names = out.get("names") or names_for(out["labels"])
    return {int(v): str(n) for v, n in zip(out["labels"], names)}


def run_group(args: argparse.Namespace) -> int:
    from ..bids import BidsError, gather_volumes
    try:
        path, n = gather_volumes(args.output_dir, args.participants)
    except BidsError as exc:
        raise UsageError(str(exc)) from None
    print(f"{PROG}: {n} rows -> {path}", flush=True)
    return 0


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    if not os.path.isdir(args.bids_dir):
        raise UsageError(f"{args.bids_dir}: BIDS folder not found")
    if os.path.realpath(args.output_dir) == os.path.realpath(args.bids_dir):
        raise UsageError(f"{args.output_dir}: the output folder must not be the input dataset")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: the number of threads must be at least 1")
    return run_participant(args) if args.analysis_level == "participant" else run_group(args)


def run(argv: Sequence[str] | None = None) -> int:
    """The whole app; returns the exit code (0, 1 or 2; 1 also on a closed stdout, e.g. '| head')."""
    return entry(PROG, _run, argv)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console entry point ``synthtools-bids``."""
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
