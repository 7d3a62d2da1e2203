"""Machinery shared by the command-line tools (``synthstrip``, ``synthseg``).

Every tool follows the same flow: parse arguments, collect inputs (``IN
OUT`` or ``-i``, with .txt lists), plan and validate every output path, check
the device and model, then process the inputs one at a time. Errors are
single lines ``<prog>: error: ...``. Exit codes, the same for every tool:

* 0: success;
* 1: bad input or runtime failure: an input image, input list, transform or
  model that is missing or unusable, no GPU for ``-g``, or a failed run (in
  a batch: at least one input failed, the others were written);
* 2: usage: the command line cannot be right (unknown or conflicting
  options, bad values, unusable output paths); nothing was processed;
* 130: interrupted.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ..io import SUPPORTED_EXTENSIONS, InputError, check_input_path, check_output_path
from .entry import Parser, UsageError, say_error  # noqa: F401  (the tools import them from here)


def say_warning(prog: str, message: str) -> None:
    """Print ``<prog>: warning: message`` on one line to stderr."""
    print(f"{prog}: warning: {' '.join(str(message).split())}", file=sys.stderr)


# ---------------------------------------------------------------- inputs --

def read_list(path: str) -> list[str]:
    """Paths listed in a .txt file, one per line (InputError if unusable)."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: input list not found")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read input list ({type(exc).__name__})") from None
    paths = [line for line in lines if line and not line.startswith("#")]
    if not paths:
        raise InputError(f"{path}: input list is empty")
    return paths


def collect_inputs(args: argparse.Namespace, prog: str, output_name: str) -> list[str]:
    """Input paths from ``IN [OUT]`` or ``-i``, with .txt lists expanded.

    A positional OUT goes to ``args.out`` (``output_name`` names it in errors);
    ``args.example`` (if the tool has it) replaces the input by the bundled scan.
    """
    example = getattr(args, "example", False)
    pos = list(args.positional)
    if args.inputs and pos:
        raise UsageError("give inputs either as 'IN OUT' or with -i, not both")
    if len(pos) > 2:
        raise UsageError(f"too many positional arguments ({len(pos)}); use -i for many inputs")
    if example and len(pos) == 1:
        pos = [None, pos[0]]  # '<prog> --example OUT'
    if len(pos) == 2:
        if args.out is not None:
            raise UsageError(f"the {output_name} output is given twice (positional OUT and -o)")
        args.out = pos[1]
    raw = args.inputs or [p for p in pos[:1] if p]
    if example:
        if raw:
            raise UsageError("--example replaces the input: give no other input")
        from ..data import example_scan
        raw = [str(example_scan())]
    if not raw:
        raise UsageError(f"no input image (use '{prog} IN OUT' or -i IN)")
    inputs: list[str] = []
    for path in raw:
        inputs.extend(read_list(path) if path.lower().endswith(".txt") else [path])
    return inputs


def list_files(args: argparse.Namespace) -> list[str]:
    """The .txt input lists given with -i (outputs must not replace them)."""
    return [p for p in (args.inputs or []) if p.lower().endswith(".txt")]


# --------------------------------------------------------------- outputs --

def is_folder_arg(path: str) -> bool:
    """An output argument naming a folder: existing, or ending with '/'."""
    return path.endswith(("/", os.sep)) or os.path.isdir(path)


def check_creatable_folder(folder: str, option: str) -> None:
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


def split_ext(path: str) -> tuple[str, str]:
    """File name without and with its image extension ('a.nii.gz' -> 'a', '.nii.gz')."""
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


def expand_outputs(requested: Mapping[str, str], jobs: list[Job], option_of: Mapping[str, str],
                   file_name: Callable[[str, str, str], str]) -> list[str]:
    """Fill each job's output paths; returns the folders to create.

    ``requested``: kind -> argument (a file, or a folder for many inputs);
    in a folder each input writes ``file_name(kind, stem, ext)``.
    """
    to_create: list[str] = []
    for kind, arg in requested.items():
        option = option_of[kind]
        if not arg:
            raise UsageError(f"{option}: empty path")
        if is_folder_arg(arg):
            if os.path.exists(arg) and not os.path.isdir(arg):
                raise UsageError(f"{option} {arg}: is a file, not a folder")
            if not os.path.isdir(arg):
                check_creatable_folder(arg, option)
                to_create.append(arg)
            elif not os.access(arg, os.W_OK | os.X_OK):
                raise UsageError(f"{option} {arg}: output folder is not writable")
            for job in jobs:
                stem, ext = split_ext(job.input)
                job.outputs[kind] = os.path.join(arg, file_name(kind, stem, ext))
        else:
            if len(jobs) > 1:
                raise UsageError(f"{option} {arg}: with {len(jobs)} inputs, {option} must be a "
                                 "folder (an existing one, or a path ending with '/')")
            jobs[0].outputs[kind] = arg
    return to_create


Checker = Callable[[str, Sequence[str]], Any]  # (path, paths it must not replace) -> raise InputError


def check_outputs(jobs: list[Job], to_create: list[str], option_of: Mapping[str, str], *,
                  overwrite_input: bool = False, checkers: Mapping[str, Checker] | None = None,
                  shared: Mapping[str, str] | None = None, protect: Iterable[str] = ()) -> None:
    """Validate every output path; raises UsageError, nothing is written.

    Refuses duplicated inputs, two outputs on one path, outputs replacing an
    input (one's own only with ``overwrite_input``) or a path in ``protect``,
    and unwritable paths. ``checkers``: kind -> check of that kind's paths
    (default: an image path). ``shared``: kind -> one path common to all
    jobs (e.g. a table with a row per input).
    """
    checkers = dict(checkers or {})

    def check(kind: str, path: str, protected: Sequence[str]) -> None:
        try:
            checkers.get(kind, lambda p, prot: check_output_path(p, input_paths=prot))(path, protected)
        except InputError as exc:
            raise UsageError(f"{option_of[kind]} {exc}") from None

    all_inputs = [os.path.realpath(j.input) for j in jobs]
    if len(set(all_inputs)) < len(all_inputs):
        dup = next(p for k, p in enumerate(all_inputs) if p in all_inputs[:k])
        raise UsageError(f"{dup}: given more than once as input")
    extra = [os.path.realpath(p) for p in protect]

    def pending(path: str) -> bool:
        # In a folder created later: nothing there to collide with yet.
        return any(os.path.abspath(path).startswith(os.path.abspath(f).rstrip(os.sep) + os.sep)
                   for f in to_create)

    seen: dict[str, tuple[str | None, str]] = {}  # output realpath -> (input, option)
    for kind, path in (shared or {}).items():
        real = os.path.realpath(path)
        if real in seen:
            raise UsageError(f"{option_of[kind]} {path}: same output path as {seen[real][1]}")
        seen[real] = (None, option_of[kind])
        if not pending(path):
            check(kind, path, all_inputs + extra)
    for i, job in enumerate(jobs):
        # Never overwrite another job's input; one's own only if allowed.
        protected = [p for k, p in enumerate(all_inputs) if k != i or not overwrite_input] + extra
        for kind, path in job.outputs.items():
            option = option_of[kind]
            real = os.path.realpath(path)
            if real in seen:
                other_input, other_option = seen[real]
                if other_input is not None and other_input != job.input:  # same stem in two folders
                    raise UsageError(f"{option} {path}: inputs {other_input} and {job.input} "
                                     "would both write here (same file name)")
                raise UsageError(f"{option} {path}: same output path as {other_option}")
            seen[real] = (job.input, option)
            if not pending(path):
                check(kind, path, protected)


def check_file_path(path: str, protect: Sequence[str], suffix: str, what: str) -> None:
    """A plain (non-image) output file: ``suffix`` extension, writable folder,
    not one of ``protect`` (real paths). Raises InputError."""
    if not path.lower().endswith(suffix):
        raise InputError(f"{path}: {what} must be a {suffix} file")
    check_writable_file(path, protect)


def check_writable_file(path: str, protect: Sequence[str]) -> None:
    """``path`` can be written as a file: not a folder, its folder exists and
    is writable, and it is not one of ``protect`` (real paths of inputs)."""
    if os.path.isdir(path):
        raise InputError(f"{path}: is a folder, a file name is required")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"{path}: output folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{path}: output folder {folder} is not writable")
    if os.path.realpath(path) in protect:
        raise InputError(f"{path}: would overwrite an input, choose another output path")


def check_png_path(path: str, protect: Sequence[str]) -> None:
    """A snapshot path (see check_file_path)."""
    check_file_path(path, protect, ".png", "snapshot")


def check_matplotlib() -> None:
    """--snapshot needs matplotlib (a dependency; a broken install is an
    InputError before anything runs)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError("--snapshot needs matplotlib, which is missing from this installation "
                         "(pip install matplotlib)") from None


class OutputSet:
    """Makes one input's outputs all-or-nothing: each write is atomic; on
    any exception inside the ``with`` block the files written so far are
    removed. Files staged with :meth:`stage` (temp files) are moved into
    place only on success, last."""

    def __init__(self) -> None:
        self.written: list[str] = []
        self.staged: list[tuple[str, str]] = []  # (temp, final)
        self.updates: list[tuple[str, Callable[[str], str]]] = []

    def add(self, path: str) -> str:
        self.written.append(path)
        return path

    def stage(self, path: str, text: str) -> None:
        """Write ``text`` to a temp file beside ``path``; it replaces ``path`` on success."""
        folder, name = os.path.split(os.path.abspath(path))
        tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
        self.staged.append((tmp, path))
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    def update(self, path: str, edit: Callable[[str], str]) -> None:
        """On success, last, replace ``path``'s text by ``edit(old text)`` (''
        if absent), read and written under a lock: array tasks sharing one
        table (``--shard``) each add their rows without losing another's."""
        self.updates.append((path, edit))

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                for tmp, path in self.staged:
                    os.replace(tmp, path)
                for path, edit in self.updates:
                    _locked_edit(path, edit)
                return
            except BaseException:
                self._rollback()
                raise
        self._rollback()

    def _rollback(self) -> None:
        for tmp, _ in self.staged:
            if os.path.exists(tmp):
                os.remove(tmp)
        for path in self.written:
            if os.path.exists(path):
                os.remove(path)


def _locked_edit(path: str, edit: Callable[[str], str]) -> None:
    """Atomic read-modify-write of a text file, under an advisory lock on a
    hidden ``.<name>.lock`` beside it (fcntl: POSIX file systems, NFS with
    locking)."""
    import fcntl

    folder, name = os.path.split(os.path.abspath(path))
    with open(os.path.join(folder, f".{name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            old = ""
            if os.path.exists(path):
                with open(path, encoding="utf-8", newline="") as f:
                    old = f.read()
            tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
            try:
                with open(tmp, "w", encoding="utf-8", newline="") as f:
                    f.write(edit(old))
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# ------------------------------------------------------- device and model --

def choose_device(gpu: bool, threads: int | None) -> str:
    """'cuda' or 'cpu'. Sets torch's CPU threads once for this process:
    ``threads`` (a --threads value), else the CPUs granted and idle
    (:func:`synthtools.threads.resolve_threads`). UsageError for a count
    below 1, InputError if no GPU is usable for ``gpu``."""
    from ..threads import configure_torch, resolve_threads

    if threads is not None and threads < 1:
        raise UsageError(f"--threads {threads}: the number of threads must be at least 1")
    configure_torch(resolve_threads(threads))
    if not gpu:
        return "cpu"
    import torch
    if not torch.cuda.is_available():
        raise InputError("-g: no CUDA GPU available to torch (torch.cuda.is_available() is False); "
                         "run without -g to use the CPU")
    return "cuda"


def device_text(device: str) -> str:
    """'cpu (2 threads)' or 'cuda', for the tools' model line."""
    if device != "cpu":
        return device
    import torch
    n = torch.get_num_threads()
    return f"cpu ({n} thread{'s' if n != 1 else ''})"


def load_task_model(name: str, device: str, *, task: str, task_text: str, user_given: bool):
    """Load a model and check its task and input space (InputError if unusable).

    A shipped (not ``user_given``) model that does not exist yet is reported
    as 'not yet available'. A missing or unusable model is an InputError
    (exit code 1).
    """
    from ..weights import ModelError, load_model, models_dir

    try:
        model = load_model(name, device)
    except ModelError as exc:
        if not user_given and "no such model" in str(exc):
            raise InputError(f"model '{name}' not yet available (looked in {models_dir()}); "
                             "see the issue tracker, or pass --model PATH") from None
        raise InputError(f"{exc}") from None
    except Exception as exc:  # corrupt pickle, wrong state dict, bad metadata...
        raise InputError(f"model {name}: cannot be loaded ({type(exc).__name__}: {exc})") from None
    meta = model.meta
    if meta.get("task") != task:
        raise InputError(f"model {model.path}: not a {task_text} model (task {meta.get('task')!r})")
    from ..space import ModelSpace
    try:
        ModelSpace.of(model)      # every tool conforms with it: check it before any image is read
    except ModelError as exc:
        raise InputError(str(exc)) from None
    return model


# -------------------------------------------------------------- snapshot --

def save_snapshot(image: np.ndarray, affine: np.ndarray, path: str, *, mask: np.ndarray | None = None,
                  labels: np.ndarray | None = None,
                  colors: Mapping[int, tuple[int, int, int]] | None = None) -> str:
    """PNG of the middle sagittal, coronal and axial slices, shown in the
    closest RAS orientation, with the ``mask`` outline in red and/or the
    ``labels`` as a translucent colour overlay (``colors``: value -> RGB
    0-255; label 0 is transparent). Atomic write."""
    import nibabel as nib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Reorient to the closest RAS axes so every scan is shown the same way.
    ornt = nib.orientations.io_orientation(affine)
    img = nib.orientations.apply_orientation(np.asarray(image, np.float32), ornt)
    msk = None if mask is None else nib.orientations.apply_orientation(np.asarray(mask), ornt)
    lab = None if labels is None else nib.orientations.apply_orientation(np.asarray(labels), ornt)
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
        if lab is not None:
            ax.imshow(_label_rgba(lab[sl].T, colors or {}), origin="lower", aspect=v / h,
                      interpolation="nearest")
        if msk is not None and msk[sl].any() and not msk[sl].all():
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


def _label_rgba(lab: np.ndarray, colors: Mapping[int, tuple[int, int, int]], alpha: float = 0.45) -> np.ndarray:
    rgba = np.zeros(lab.shape + (4,), dtype=np.float32)
    for v in np.unique(lab):
        if v == 0:
            continue
        rgba[lab == v] = [*(np.asarray(colors.get(int(v), (255, 255, 0))) / 255.0), alpha]
    return rgba


# ----------------------------------------------------- options, progress --

def add_standard_options(p: argparse.ArgumentParser, *, threads_flags: Sequence[str] = ("-t", "--threads"),
                         quiet: bool = False) -> None:
    """Options every tool has: ``--threads`` (with the tool's FreeSurfer
    short flag), ``--version`` and, with ``quiet``, ``-q``."""
    from .. import __version__

    p.add_argument(*threads_flags, dest="threads", type=int, metavar="N",
                   help="number of CPU threads (default: the CPUs granted to this process, i.e. the "
                   "smallest of OMP_NUM_THREADS, SLURM_CPUS_PER_TASK, the cgroup quota and the CPU "
                   "affinity, and at most the CPUs idle at start)")
    p.add_argument("--version", action="version", version=f"%(prog)s (synthtools) {__version__}")
    if quiet:
        p.add_argument("-q", "--quiet", action="store_true",
                       help="no progress lines (errors and warnings are still printed)")


def add_batch_options(p: argparse.ArgumentParser) -> None:
    """``--overwrite`` and ``--shard``, for tools that take many inputs."""
    p.add_argument("--overwrite", action="store_true",
                   help="redo inputs whose outputs are complete from an earlier run with the same version, "
                   "model and options (default: skip them, so a rerun continues an interrupted batch; a hidden "
                   ".<first output>.done.json beside the outputs records them)")
    p.add_argument("--shard", metavar="I/N",
                   help="process only shard I (from 0) of N: every N-th input of the list sorted by path, for "
                   "array jobs; 'slurm': I and N from the Slurm array task (SLURM_ARRAY_TASK_ID and the "
                   "array's size)")


def resolve_shard_option(text: str | None) -> tuple[int, int] | None:
    """``--shard``'s (I, N), or None; UsageError if unusable."""
    from ..batch import ShardError, resolve_shard
    try:
        return resolve_shard(text)
    except ShardError as exc:
        raise UsageError(str(exc)) from None


# Arguments that do not change a result: a rerun with another value skips complete outputs.
NOT_RESULT_OPTIONS = frozenset({"positional", "inputs", "threads", "gpu", "overwrite", "shard", "quiet", "example",
                                "check", "overwrite_input"})


def batch_params(prog: str, args: argparse.Namespace, model: str, outputs: Iterable[str] = ()) -> dict[str, Any]:
    """What a done-marker must match for a skip: tool, version, model
    (name and weights' sha256) and every option that may change a result
    (all but :data:`NOT_RESULT_OPTIONS` and the output paths ``outputs``)."""
    from .. import __version__

    options = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_RESULT_OPTIONS and k not in outputs}
    return {"tool": prog, "version": __version__, "model": model, "model_sha256": model_identity(model),
            "options": options}


def file_identity(path: str) -> dict[str, Any]:
    """What tells an input file apart from another or a newer version of
    itself: real path, size (bytes) and modification time (ns)."""
    try:
        st = os.stat(path)
    except OSError:
        return {"path": os.path.realpath(path), "missing": True}
    return {"path": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def model_identity(name: str) -> str:
    """sha256 of a model's weights without loading it: from its metadata,
    else of the file itself (FreeSurfer's weight files); '' if unreadable
    (loading it reports why)."""
    from pathlib import Path

    from ..weights import ModelError, read_metadata, resolve, sha256
    try:
        return str(read_metadata(resolve(name)).get("sha256") or "")
    except (ModelError, OSError, ValueError):
        pass
    try:
        return sha256(Path(name)) if os.path.isfile(name) else ""
    except OSError:
        return ""


class Progress:
    """One stderr line per finished stage: ``<prog>: <stage>: 3.2 s (total 10.5 s)``."""

    def __init__(self, prog: str, quiet: bool = False) -> None:
        self.prog, self.quiet = prog, quiet
        self.start = self.last = time.perf_counter()

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        if not self.quiet:
            print(f"{self.prog}: {stage}: {now - self.last:.1f} s (total {now - self.start:.1f} s)",
                  file=sys.stderr, flush=True)
        self.last = now


def info(prog: str, message: str, quiet: bool = False) -> None:
    """An informational line on stdout (silenced by -q)."""
    if not quiet:
        print(f"{prog}: {message}", flush=True)


# ------------------------------------------------------------------ jobs --

def run_jobs(prog: str, jobs: list[Job], to_create: list[str], device: str,
             load: Callable[[], Any] | None, process: Callable[[Job, Any], None],
             after_load: Callable[[Any], None] | None = None, quiet: bool = False, *,
             overwrite: bool = True, shard: tuple[int, int] | None = None,
             params: Mapping[str, Any] | None = None,
             complete: Callable[[Job], bool] | None = None) -> int:
    """Process every job with one model, as a resumable batch
    (:func:`synthtools.batch.run_batch`); returns 0, or 1 if any input failed.

    ``shard`` (I, N) keeps every N-th job sorted by input path. Unless
    ``overwrite``, a job whose outputs are complete (done-marker beside them
    recording ``params``, the input file's identity and the outputs' sizes;
    and ``complete(job)`` if given) is skipped; a job with no output file of
    its own (only rows in a shared table) always runs. The model is loaded
    only if some job runs, after cheap input checks, so a typo is reported
    without waiting for it; ``after_load(model)`` may still refuse the run
    (UsageError) before anything is written. A failing input is reported on
    one line and the batch goes on; with many inputs a summary table ends
    the run. Counters ``[k/n]`` number the inputs of this run.
    """
    from ..batch import Case, is_complete, run_batch, select_shard

    total = len(jobs)
    if shard is not None:
        jobs = select_shard(jobs, shard, key=lambda job: job.input)
        info(prog, f"shard {shard[0]}/{shard[1]}: {len(jobs)} of {total} inputs", quiet)
    cases = [Case(key=job.input, outputs=list(job.outputs.values()), data=job, resumable=bool(job.outputs),
                  params={**(params or {}), "input": file_identity(job.input)}) for job in jobs]

    def done(case: Case) -> bool:
        return case.resumable and is_complete(case.marker, case.outputs, case.params) \
            and (complete is None or complete(case.data))

    errors: dict[str, InputError] = {}
    todo = [case for case in cases if overwrite or not done(case)]
    for case in todo:
        try:
            check_input_path(case.key)
        except InputError as exc:
            errors[case.key] = exc
    model = None
    if any(case.key not in errors for case in todo):
        if load is not None:   # None: a tool without a model (synthmorph apply)
            model = load()
            if after_load is not None:
                after_load(model)
            info(prog, f"model {model.path} on {device_text(device)}", quiet)
        for folder in to_create:
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as exc:
                raise UsageError(f"{folder}: cannot create the folder ({exc.strerror or exc})") from None

    def run_case(case: Case) -> None:
        if case.key in errors:
            raise errors[case.key]
        process(case.data, model)

    many = len(jobs) > 1 or shard is not None   # a shard's summary says which shard it was
    report = run_batch(cases, run_case, overwrite=overwrite, prog=prog, shard=shard,
                       stream=io.StringIO() if quiet else sys.stdout, summary=many and not quiet, numbered=many,
                       complete=(lambda case: complete(case.data)) if complete is not None else None)
    if report.failed and many:
        say_error(prog, f"{report.failed} of {len(cases)} inputs failed")
    return report.exit_code
