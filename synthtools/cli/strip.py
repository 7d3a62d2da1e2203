"""``synthstrip``: skull-stripping from the command line, compatible with
FreeSurfer's ``mri_synthstrip``.

    synthstrip IN OUT
    synthstrip -i IN [IN ...] [-o STRIPPED] [-m MASK] [-d SDT] [-b MM] ...

The flow reads top to bottom: parse arguments, collect inputs, plan and
validate every output path, check the device and model, then process the
inputs one at a time. Everything that can be checked without the network is
checked before it runs, so a typo never costs a long run and never leaves a
partial output. Errors are single lines ``synthstrip: error: ...``; exit code
2 means nothing was processed (bad arguments, outputs, device or model), 1
means at least one input failed.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import NoReturn, Sequence

import numpy as np

from ..io import SUPPORTED_EXTENSIONS, InputError, check_input_path, check_output_path

PROG = "synthstrip"
DEFAULT_MODEL = "synthstrip"
NOCSF_MODEL = "synthstrip-nocsf"
SUFFIXES = {"stripped": "_stripped", "mask": "_mask", "sdt": "_sdt"}
OPTION_OF = {"stripped": "-o", "mask": "-m", "sdt": "-d", "snapshot": "--snapshot"}


class UsageError(Exception):
    """Bad arguments or environment: nothing is processed, exit code 2."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the whole usage block before the error; we promise a
    # single line, so raise instead and let run() print it.
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {PROG} -h)")


def _say_error(message: str) -> None:
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)


def _say_warning(message: str) -> None:
    print(f"{PROG}: warning: {' '.join(str(message).split())}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
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
    p.add_argument("-t", "--threads", type=int, metavar="N", help="number of CPU threads for torch")
    p.add_argument("-f", "--fill", type=float, default=0.0, metavar="VALUE",
                   help="value of removed voxels in the stripped image (default: 0)")
    p.add_argument("--no-csf", action="store_true",
                   help="exclude CSF from the brain border (uses the 'synthstrip-nocsf' model)")
    p.add_argument("--model", metavar="PATH", help="alternative model folder or metadata.json")
    p.add_argument("--snapshot", metavar="PNG",
                   help="PNG of three orthogonal slices with the mask outline (file or folder)")
    p.add_argument("--overwrite-input", action="store_true",
                   help="allow an output to replace its own input image")
    p.add_argument("--example", action="store_true",
                   help="use the bundled example scan (a clinical FLAIR, CC-BY) as the input")
    return p


# ---------------------------------------------------------------- inputs --

def _read_list(path: str) -> list[str]:
    """Paths listed in a .txt file, one per line."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: input list not found")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read input list ({type(exc).__name__})") from None
    paths = [line for line in lines if line and not line.startswith("#")]
    if not paths:
        raise UsageError(f"{path}: input list is empty")
    return paths


def collect_inputs(args: argparse.Namespace) -> list[str]:
    """Input paths from ``IN [OUT]`` or ``-i``, with .txt lists expanded."""
    pos = list(args.positional)
    if args.inputs and pos:
        raise UsageError("give inputs either as 'IN OUT' or with -i, not both")
    if len(pos) > 2:
        raise UsageError(f"too many positional arguments ({len(pos)}); use -i for many inputs")
    if args.example and len(pos) == 1:
        pos = [None, pos[0]]  # 'synthstrip --example OUT'
    if len(pos) == 2:
        if args.out is not None:
            raise UsageError("the stripped output is given twice (positional OUT and -o)")
        args.out = pos[1]
    raw = args.inputs or [p for p in pos[:1] if p]
    if args.example:
        if raw:
            raise UsageError("--example replaces the input: give no other input")
        from ..data import example_scan
        raw = [str(example_scan())]
    if not raw:
        raise UsageError("no input image (use 'synthstrip IN OUT' or -i IN)")
    inputs: list[str] = []
    for path in raw:
        inputs.extend(_read_list(path) if path.lower().endswith(".txt") else [path])
    return inputs


# --------------------------------------------------------------- outputs --

def _is_folder_arg(path: str) -> bool:
    return path.endswith(("/", os.sep)) or os.path.isdir(path)


def _check_creatable_folder(folder: str, option: str) -> None:
    """A missing output folder is created later: its nearest existing
    ancestor must be a writable folder."""
    probe = os.path.abspath(folder)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise UsageError(f"{option} {folder}: cannot create the folder ({probe} is not a folder)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {folder}: cannot create the folder ({probe} is not writable)")


def _split_ext(path: str) -> tuple[str, str]:
    name = os.path.basename(path)
    for ext in SUPPORTED_EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)], name[-len(ext):]
    # Unsupported input: the input check reports it; any name will do here.
    return name, ".nii.gz"


@dataclass
class Job:
    """One input and where its results go."""

    input: str
    outputs: dict[str, str] = field(default_factory=dict)  # kind -> path


def plan_outputs(args: argparse.Namespace, inputs: list[str]) -> tuple[list[Job], list[str]]:
    """Output paths of every input, validated; also the folders to create.

    Raises UsageError on any problem: nothing has been written yet.
    """
    requested = {"stripped": args.out, "mask": args.mask, "sdt": args.sdt, "snapshot": args.snapshot}
    requested = {k: v for k, v in requested.items() if v is not None}
    if not set(requested) - {"snapshot"}:
        raise UsageError("no output requested: give at least one of -o (stripped), -m (mask), -d (sdt)")
    if args.snapshot is not None:
        _check_matplotlib()

    jobs = [Job(p) for p in inputs]
    to_create: list[str] = []
    for kind, arg in requested.items():
        option = OPTION_OF[kind]
        if not arg:
            raise UsageError(f"{option}: empty path")
        if _is_folder_arg(arg):
            if os.path.exists(arg) and not os.path.isdir(arg):
                raise UsageError(f"{option} {arg}: is a file, not a folder")
            if not os.path.isdir(arg):
                _check_creatable_folder(arg, option)
                to_create.append(arg)
            elif not os.access(arg, os.W_OK | os.X_OK):
                raise UsageError(f"{option} {arg}: output folder is not writable")
            for job in jobs:
                stem, ext = _split_ext(job.input)
                name = f"{stem}_snapshot.png" if kind == "snapshot" else f"{stem}{SUFFIXES[kind]}{ext}"
                job.outputs[kind] = os.path.join(arg, name)
        else:
            if len(jobs) > 1:
                raise UsageError(f"{option} {arg}: with {len(jobs)} inputs, {option} must be a "
                                 "folder (an existing one, or a path ending with '/')")
            jobs[0].outputs[kind] = arg

    all_inputs = [os.path.realpath(j.input) for j in jobs]
    if len(set(all_inputs)) < len(all_inputs):
        dup = next(p for k, p in enumerate(all_inputs) if p in all_inputs[:k])
        raise UsageError(f"{dup}: given more than once as input")
    seen: dict[str, tuple[str, str]] = {}  # output realpath -> (input, option)
    for i, job in enumerate(jobs):
        # Never overwrite another job's input; one's own only if allowed.
        protect = [p for k, p in enumerate(all_inputs) if k != i or not args.overwrite_input]
        for kind, path in job.outputs.items():
            option = OPTION_OF[kind]
            real = os.path.realpath(path)
            if real in seen:
                other_input, other_option = seen[real]
                if other_input != job.input:  # same file name stem in two folders
                    raise UsageError(f"{option} {path}: inputs {other_input} and {job.input} "
                                     "would both write here (same file name)")
                raise UsageError(f"{option} {path}: same output path as {other_option}")
            seen[real] = (job.input, option)
            if any(os.path.abspath(path).startswith(os.path.abspath(f).rstrip(os.sep) + os.sep)
                   for f in to_create):
                continue  # folder created later; nothing there to collide with yet
            try:
                if kind == "snapshot":
                    _check_png_path(path, protect)
                else:
                    check_output_path(path, input_paths=protect)
            except InputError as exc:
                raise UsageError(f"{option} {exc}") from None
    return jobs, to_create


def _check_png_path(path: str, protect: Sequence[str]) -> None:
    if not path.lower().endswith(".png"):
        raise InputError(f"{path}: snapshot must be a .png file")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a folder, a .png file name is required")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"{path}: output folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{path}: output folder {folder} is not writable")
    if os.path.realpath(path) in protect:
        raise InputError(f"{path}: would overwrite an input, choose another output path")


def _check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--snapshot needs matplotlib (pip install matplotlib)") from None


# ------------------------------------------------------- device and model --

def choose_device(gpu: bool, threads: int | None) -> str:
    import torch

    if threads is not None:
        if threads < 1:
            raise UsageError(f"-t {threads}: the number of threads must be at least 1")
        torch.set_num_threads(threads)
    if not gpu:
        return "cpu"
    if not torch.cuda.is_available():
        raise UsageError("-g: no CUDA GPU available to torch (torch.cuda.is_available() is False); "
                         "run without -g to use the CPU")
    return "cuda"


def load_strip_model(args: argparse.Namespace, device: str):
    """Load and sanity-check the skull-stripping model (UsageError if unusable)."""
    from ..weights import ModelError, load_model, models_dir

    name = args.model or (NOCSF_MODEL if args.no_csf else DEFAULT_MODEL)
    try:
        model = load_model(name, device)
    except ModelError as exc:
        if args.model is None and "no such model" in str(exc):
            raise UsageError(f"model '{name}' not yet available (looked in {models_dir()}); "
                             "see the issue tracker, or pass --model PATH") from None
        raise UsageError(f"{exc}") from None
    except Exception as exc:  # corrupt pickle, wrong state dict, bad metadata...
        raise UsageError(f"model {name}: cannot be loaded ({type(exc).__name__}: {exc})") from None
    meta = model.meta
    if meta.get("task") != "skullstrip":
        raise UsageError(f"model {model.path}: not a skull-stripping model (task {meta.get('task')!r})")
    if not all(k in meta.get("input", {}) for k in ("voxsize", "orientation", "multiple")):
        raise UsageError(f"model {model.path}: metadata lacks the input space (voxsize, orientation, multiple)")
    if args.model is not None and args.no_csf and meta.get("output", {}).get("csf", False):
        _say_warning(f"--no-csf given but model {model.path} was trained with CSF in the brain")
    return model


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
    from ..strip import strip

    # One load in the stored type: it is what we write back; the network
    # side converts to float itself.
    vol = load_volume(job.input, allow_4d=True, dtype=None)
    fill = _fill_value(args.fill, vol.data.dtype)
    result = strip(model, vol, border=args.border)
    if not result.mask.any():
        _say_warning(f"{job.input}: the brain mask is empty (is this a head image?)")

    images = {}
    if "stripped" in job.outputs:
        stripped = vol.data.copy()
        stripped[result.mask == 0] = fill
        images["stripped"] = (stripped, vol.data.dtype)
    if "mask" in job.outputs:
        images["mask"] = (result.mask, np.uint8)
    if "sdt" in job.outputs:
        images["sdt"] = (result.sdt, np.float32)

    written: list[str] = []
    try:
        for kind, (data, dtype) in images.items():
            written.append(save_volume(data, vol, job.outputs[kind], dtype=dtype))
        if "snapshot" in job.outputs:
            frame0 = (lambda a: a[..., 0] if a.ndim == 4 else a)
            written.append(save_snapshot(frame0(vol.data), frame0(result.mask), vol.affine,
                                         job.outputs["snapshot"]))
    except BaseException:
        # Each write is atomic; removing the earlier ones makes the set atomic.
        for path in written:
            if os.path.exists(path):
                os.remove(path)
        raise


def save_snapshot(image: np.ndarray, mask: np.ndarray, affine: np.ndarray, path: str) -> str:
    """PNG of the middle sagittal, coronal and axial slices with the mask
    outline in red, shown in the closest RAS orientation. Atomic write."""
    import nibabel as nib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Reorient to the closest RAS axes so every scan is shown the same way.
    ornt = nib.orientations.io_orientation(affine)
    img = nib.orientations.apply_orientation(np.asarray(image, np.float32), ornt)
    msk = nib.orientations.apply_orientation(np.asarray(mask), ornt)
    voxsize = np.sqrt(np.sum(np.asarray(affine)[:3, :3] ** 2, axis=0))
    vs = np.empty(3)
    vs[ornt[:, 0].astype(int)] = voxsize
    lo, hi = np.percentile(img, [0.5, 99.5])

    fig = Figure(figsize=(9, 3.2), facecolor="black")
    FigureCanvasAgg(fig)  # Agg without pyplot: no global backend state touched
    mid = [n // 2 for n in img.shape]
    views = [  # (slice, (horizontal, vertical) voxel size, title)
        (np.s_[mid[0], :, :], (vs[1], vs[2]), "sagittal"),
        (np.s_[:, mid[1], :], (vs[0], vs[2]), "coronal"),
        (np.s_[:, :, mid[2]], (vs[0], vs[1]), "axial"),
    ]
    for k, (sl, (h, v), title) in enumerate(views):
        ax = fig.add_subplot(1, 3, k + 1)
        ax.imshow(img[sl].T, cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-6), origin="lower",
                  aspect=v / h, interpolation="nearest")
        if msk[sl].any() and not msk[sl].all():
            ax.contour(msk[sl].T.astype(np.float32), levels=[0.5], colors="red", linewidths=1.0)
        ax.set_title(title, color="white", fontsize=9)
        ax.axis("off")
    fig.tight_layout()

    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp, format="png", facecolor="black", dpi=100)
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f"{path}: could not write snapshot ({exc.strerror or exc})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


# ------------------------------------------------------------------ main --

def run(argv: Sequence[str] | None = None) -> int:
    """The whole tool; returns the exit code (0, 1 or 2)."""
    try:
        return _run(argv)
    except UsageError as exc:
        _say_error(str(exc))
        return 2
    except KeyboardInterrupt:
        _say_error("interrupted")
        return 130


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    inputs = collect_inputs(args)
    if not math.isfinite(args.border):
        raise UsageError(f"-b {args.border}: the border must be a finite number of mm")
    if not math.isfinite(args.fill):
        raise UsageError(f"-f {args.fill}: the fill value must be a finite number")
    jobs, to_create = plan_outputs(args, inputs)
    device = choose_device(args.gpu, args.threads)

    # Cheap input checks first: a typo is reported before the model loads.
    failed = 0
    model = None
    ready: list[Job] = []
    for job in jobs:
        try:
            check_input_path(job.input)
            ready.append(job)
        except InputError as exc:
            _say_error(str(exc))
            failed += 1
    if ready:
        model = load_strip_model(args, device)
        print(f"{PROG}: model {model.path} on {device}", flush=True)
        for folder in to_create:
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as exc:
                raise UsageError(f"{folder}: cannot create the folder ({exc.strerror or exc})") from None

    for k, job in enumerate(ready):
        start = time.perf_counter()
        try:
            process(job, model, args)
        except InputError as exc:
            _say_error(str(exc))
            failed += 1
            continue
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # any other failure of one scan must not stop the batch
            if os.environ.get("SYNTHTOOLS_DEBUG"):
                raise
            _say_error(f"{job.input}: processing failed ({type(exc).__name__}: {exc})")
            failed += 1
            continue
        counter = f"[{k + 1}/{len(ready)}] " if len(jobs) > 1 else ""
        print(f"{PROG}: {counter}{job.input}: done in {time.perf_counter() - start:.1f} s", flush=True)

    if failed:
        if len(jobs) > 1:
            _say_error(f"{failed} of {len(jobs)} inputs failed")
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console entry point: runs the tool and exits with its code."""
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
