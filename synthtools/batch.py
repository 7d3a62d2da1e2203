"""Resumable, splittable batches: the bookkeeping around running one job per
case over a whole study, independent of what a case computes.

* **Resumable.** A case is *complete* when its done-marker exists (a small
  JSON file written atomically after all its outputs), records the same
  parameters as this run (tool version, model sha256, options: a new model
  redoes the case) and every output it lists is still there with the size it
  had. A crash between two outputs leaves no marker, so the case is redone.
  Complete cases are skipped unless ``overwrite``.
* **Isolated.** A failing case is reported on one line and the others go on;
  a summary table follows; :attr:`BatchReport.exit_code` is 1 if any failed.
* **Splittable.** ``--shard I/N`` (0-based ``I``) or ``--shard slurm`` (a
  Slurm array: ``SLURM_ARRAY_TASK_ID`` with ``SLURM_ARRAY_TASK_COUNT``, or
  ``SLURM_ARRAY_TASK_MIN``/``MAX``/``STEP``) picks every N-th case of the
  list sorted by key, so every task computes the same split whatever order
  the files were listed in, and the shards' sizes differ by at most one.
  The array is read only when asked for: a job that already gives each
  array task its own inputs (a chunk file, one ``--participant-label``)
  would otherwise process a fraction of them and silently skip the rest.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence, TextIO, TypeVar

__all__ = ["SLURM", "ShardError", "Case", "CaseResult", "BatchReport", "parse_shard", "shard_from_env", "resolve_shard",
           "select_shard", "sidecar_marker", "is_complete", "write_marker", "run_batch"]

T = TypeVar("T")
MARKER_VERSION = 1


class ShardError(ValueError):
    """A bad ``--shard`` value or Slurm array environment (one-line message)."""


# ------------------------------------------------------------------ shards --

def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)``: shard ``I`` (0-based) of ``N``."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise ShardError(f"--shard {text}: expected I/N, e.g. 0/10 (shard I of N, counted from 0)")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1 or not 0 <= index < count:
        raise ShardError(f"--shard {text}: I must be 0..N-1 and N at least 1")
    return index, count


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ShardError(f"{name}={value!r}: not an integer") from None


def shard_from_env(env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """The shard of a Slurm array task, or None outside an array.

    ``--array=0-9`` gives task IDs 0..9 of 10; ``--array=1-10`` and
    ``--array=0-18:2`` work too (index = (ID - MIN) / STEP). The count is
    ``SLURM_ARRAY_TASK_COUNT``, else derived from MIN/MAX/STEP. Arrays
    listed with commas (``--array=1,5,9``) have no uniform step: use
    ``--shard``.
    """
    env = os.environ if env is None else env
    task = _env_int(env, "SLURM_ARRAY_TASK_ID")
    if task is None:
        return None
    low = _env_int(env, "SLURM_ARRAY_TASK_MIN")
    high = _env_int(env, "SLURM_ARRAY_TASK_MAX")
    step = _env_int(env, "SLURM_ARRAY_TASK_STEP") or 1
    count = _env_int(env, "SLURM_ARRAY_TASK_COUNT")
    low = 0 if low is None else low
    if count is None and high is not None:
        count = (high - low) // step + 1
    if count is None:
        raise ShardError("SLURM_ARRAY_TASK_ID is set but neither SLURM_ARRAY_TASK_COUNT nor "
                         "SLURM_ARRAY_TASK_MAX: pass --shard I/N")
    index, rest = divmod(task - low, step)
    if rest or not 0 <= index < count:
        raise ShardError(f"SLURM_ARRAY_TASK_ID={task} is not on the array's uniform range "
                         f"(min {low}, step {step}, {count} tasks): pass --shard I/N")
    return index, count


SLURM = "slurm"


def resolve_shard(option: str | None, env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """The shard ``--shard`` asks for: None without it, ``(I, N)`` for
    ``I/N``, the Slurm array task's for ``slurm`` (ShardError outside an array)."""
    if option is None:
        return None
    if option.strip().lower() == SLURM:
        shard = shard_from_env(env)
        if shard is None:
            raise ShardError("--shard slurm: SLURM_ARRAY_TASK_ID is not set (not a Slurm array task); "
                             "pass --shard I/N")
        return shard
    return parse_shard(option)


def select_shard(items: Iterable[T], shard: tuple[int, int] | None, key: Callable[[T], str] = str) -> list[T]:
    """The items of ``shard`` ``(I, N)``: every N-th item from the I-th of the
    list sorted by ``key`` (all items, sorted, when ``shard`` is None). The
    N shards partition the list."""
    ordered = sorted(items, key=key)
    if shard is None:
        return ordered
    index, count = shard
    return ordered[index::count]


# ----------------------------------------------------------------- markers --

def sidecar_marker(path: str | os.PathLike) -> str:
    """Done-marker beside an output: ``dir/name.nii.gz`` -> ``dir/.name.nii.gz.done.json``
    (hidden, so globs of the outputs do not see it)."""
    folder, name = os.path.split(os.fspath(path))
    return os.path.join(folder, f".{name}.done.json")


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_complete(marker: str, outputs: Sequence[str], params: Mapping[str, Any] | None = None) -> bool:
    """True if ``marker`` records exactly ``outputs``, the same ``params``, and
    every output still exists with its recorded size (bytes)."""
    record = _read_json(marker)
    if not isinstance(record, dict) or record.get("version") != MARKER_VERSION:
        return False
    if record.get("params") != json.loads(json.dumps(dict(params or {}))):
        return False
    sizes = record.get("outputs")
    if not isinstance(sizes, dict) or set(sizes) != {os.path.abspath(p) for p in outputs}:
        return False
    for path, size in sizes.items():
        try:
            if os.path.getsize(path) != size:
                return False
        except OSError:
            return False
    return True


def write_marker(marker: str, outputs: Sequence[str], params: Mapping[str, Any] | None = None,
                 seconds: float | None = None) -> str:
    """Record that ``outputs`` (all present now) are complete; atomic write."""
    record = {"version": MARKER_VERSION, "params": dict(params or {}),
              "outputs": {os.path.abspath(p): os.path.getsize(p) for p in outputs},
              "seconds": None if seconds is None else round(seconds, 3),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    folder = os.path.dirname(os.path.abspath(marker))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(marker)}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
        os.replace(tmp, marker)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return marker


# ------------------------------------------------------------------- batch --

@dataclass
class Case:
    """One unit of work: ``key`` names it (sorting, shards, the summary);
    ``outputs`` are the files it writes; ``marker`` the done-marker (default:
    beside the first output); ``params`` what must match for a skip."""

    key: str
    outputs: list[str]
    marker: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    data: Any = None           # anything the process function needs (input paths...)
    resumable: bool = True     # False: always run, no marker (e.g. it only adds rows to a shared table)

    def __post_init__(self) -> None:
        if not self.resumable:
            return
        if not self.outputs:
            raise ValueError(f"case {self.key}: no outputs")
        if self.marker is None:
            self.marker = sidecar_marker(self.outputs[0])


@dataclass
class CaseResult:
    key: str
    status: str                # "done", "skipped" or "failed"
    seconds: float = 0.0
    message: str = ""


@dataclass
class BatchReport:
    results: list[CaseResult]
    shard: tuple[int, int] | None = None

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def failed(self) -> int:
        return self.count("failed")

    @property
    def exit_code(self) -> int:
        """0 if no case failed, else 1."""
        return 1 if self.failed else 0

    def table(self) -> str:
        """The summary: one aligned row per case, then the totals."""
        rows = [("case", "status", "seconds", "message")]
        rows += [(r.key, r.status, f"{r.seconds:.1f}", r.message) for r in self.results]
        widths = [max(len(row[k]) for row in rows) for k in range(3)]
        lines = ["  ".join(v.ljust(w) for v, w in zip(row[:3], widths)) + ("  " + row[3] if row[3] else "")
                 for row in rows]
        shard = f" (shard {self.shard[0]}/{self.shard[1]})" if self.shard else ""
        lines.append(f"{len(self.results)} cases{shard}: {self.count('done')} done, "
                     f"{self.count('skipped')} skipped (complete), {self.failed} failed")
        return "\n".join(line.rstrip() for line in lines)


def _one_line(exc: BaseException) -> str:
    from .io import InputError
    text = " ".join(str(exc).split())
    return text if isinstance(exc, InputError) else f"{type(exc).__name__}: {text}"


def run_batch(cases: Sequence[Case], process: Callable[[Case], None], *, overwrite: bool = False,
              prog: str = "synthtools", shard: tuple[int, int] | None = None,
              stream: TextIO | None = None, summary: bool = True, numbered: bool = True,
              complete: Callable[[Case], bool] | None = None) -> BatchReport:
    """Run ``process(case)`` on each case that is not complete (all of them
    with ``overwrite``), in order; ``process`` writes ``case.outputs``.

    A case's marker is removed before it runs and written after ``process``
    returns and all its outputs exist; an exception (or a missing output) marks
    the case failed with a one-line message and the batch goes on
    (KeyboardInterrupt stops it). Progress lines ``[k/n] key: ...`` and the
    summary table go to ``stream`` (stdout); ``numbered=False`` leaves out
    the ``[k/n]`` (one input). ``complete(case)``: a further condition for
    a skip (e.g. the case's row is in a shared table). ``shard`` is only
    reported: select the cases with :func:`select_shard` first.
    """
    out = sys.stdout if stream is None else stream
    results: list[CaseResult] = []
    n = len(cases)
    for k, case in enumerate(cases, 1):
        tag = f"[{k}/{n}] " if numbered else ""
        if case.resumable and not overwrite and is_complete(case.marker, case.outputs, case.params) \
                and (complete is None or complete(case)):
            results.append(CaseResult(case.key, "skipped"))
            print(f"{prog}: {tag}{case.key}: complete, skipped (--overwrite redoes it)", file=out, flush=True)
            continue
        if case.marker is not None and os.path.exists(case.marker):
            os.remove(case.marker)   # stale: the outputs are about to change
        start = time.perf_counter()
        try:
            process(case)
            missing = [p for p in case.outputs if not os.path.isfile(p)]
            if missing:
                raise RuntimeError(f"output not written: {missing[0]}")
            seconds = time.perf_counter() - start
            if case.marker is not None:
                write_marker(case.marker, case.outputs, case.params, seconds)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # one case's failure must not stop the batch
            if os.environ.get("SYNTHTOOLS_DEBUG"):
                raise
            seconds = time.perf_counter() - start
            message = _one_line(exc)
            results.append(CaseResult(case.key, "failed", seconds, message))
            # An input error usually names the file already: do not say it twice.
            name = "" if message.startswith(case.key) else f"{case.key}: "
            print(f"{prog}: error: {tag}{name}{message}", file=sys.stderr, flush=True)
            continue
        results.append(CaseResult(case.key, "done", seconds))
        print(f"{prog}: {tag}{case.key}: done in {seconds:.1f} s", file=out, flush=True)
    report = BatchReport(results, shard)
    if summary:
        print(report.table(), file=out, flush=True)
    return report
