"""How many CPU threads a command may use, and setting them once per process.

torch's default is the number of cores of the *machine*. On a shared node
(a Slurm job, a container with a CPU quota, a pinned process, or simply
beside another busy job) that is more threads than the process was given,
and the threads then wait on one another at every parallel operation: the
issue measured a rigid registration at 47 s by default against 11 s on one
thread. The default here is the smallest of what every layer grants:

1. an explicit ``--threads`` (it wins outright: the user asked for it);
2. ``OMP_NUM_THREADS`` (the first number of a nested list);
3. ``SLURM_CPUS_PER_TASK``;
4. the cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` /
   ``cpu.cfs_period_us``), rounded up;
5. the CPUs this process may run on (``os.sched_getaffinity``);
6. ``os.cpu_count()``;

then, unless the count was explicit, capped by the CPUs of that set that are
idle right now (a 0.2 s sample of ``/proc/stat``): on two cores beside a
two-thread job, one thread is faster than two that take turns.
:func:`prepare_environment` runs before torch and numpy are imported: it
sets the OpenMP/BLAS thread variables and passive OpenMP waiting, so idle
threads sleep instead of spinning against other processes.
"""
from __future__ import annotations

import math
import os
import time
from typing import Mapping, MutableMapping

__all__ = ["granted_threads", "cgroup_cpu_limit", "idle_cpus", "default_threads", "resolve_threads",
           "prepare_environment", "configure_torch", "ThreadGovernor"]

CGROUP_ROOT = "/sys/fs/cgroup"
PROC_STAT = "/proc/stat"
IDLE_SAMPLE_S = 0.2

# Set before the OpenMP/BLAS runtimes load (only where the user has not).
BLAS_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
WAIT_VARIABLES = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}


def _positive_int(text: str | None) -> int | None:
    """A positive count from an environment value ('4', '4,2' -> 4); None if unusable."""
    if not text:
        return None
    try:
        value = int(str(text).split(",")[0].strip())
    except ValueError:
        return None
    return value if value >= 1 else None


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def _own_cgroup_dirs(root: str, proc_cgroup: str) -> list[str]:
    """Folders (deepest first) that may hold this process's CPU limits:
    its cgroup and every parent, for v2 and for the v1 cpu controller."""
    text = _read(proc_cgroup) or ""
    dirs: list[str] = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "":                              # v2 unified hierarchy
            base = root
        elif "cpu" in controllers.split(","):              # v1 cpu controller
            base = os.path.join(root, controllers)
            if not os.path.isdir(base):
                base = os.path.join(root, "cpu")
        else:
            continue
        rel = rel.strip().strip("/")
        while True:
            dirs.append(os.path.join(base, rel) if rel else base)
            if not rel:
                break
            rel = os.path.dirname(rel)
    for extra in (root, os.path.join(root, "cpu"), os.path.join(root, "cpu,cpuacct")):
        if extra not in dirs:
            dirs.append(extra)
    return dirs


def cgroup_cpu_limit(root: str = CGROUP_ROOT, proc_cgroup: str = "/proc/self/cgroup") -> int | None:
    """CPUs allowed by the cgroup quota (rounded up, at least 1); None if unlimited.

    Reads cgroup v2 ``cpu.max`` ('QUOTA PERIOD' or 'max PERIOD') and v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1: unlimited), in
    this process's cgroup and its parents; the tightest wins.
    """
    limits: list[int] = []
    for folder in _own_cgroup_dirs(root, proc_cgroup):
        quota = period = None
        v2 = _read(os.path.join(folder, "cpu.max"))
        if v2 is not None:
            fields = v2.split()
            if len(fields) >= 2 and fields[0] != "max":
                quota, period = fields[0], fields[1]
        else:
            quota = (_read(os.path.join(folder, "cpu.cfs_quota_us")) or "").strip() or None
            period = (_read(os.path.join(folder, "cpu.cfs_period_us")) or "").strip() or None
        try:
            q, p = int(quota), int(period)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if q > 0 and p > 0:
            limits.append(max(1, math.ceil(q / p)))
    return min(limits) if limits else None


def _affinity() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return None


def granted_threads(environ: Mapping[str, str] | None = None, *, cgroup_root: str = CGROUP_ROOT,
                    proc_cgroup: str = "/proc/self/cgroup") -> int:
    """CPUs this process was granted: the minimum of ``OMP_NUM_THREADS``,
    ``SLURM_CPUS_PER_TASK``, the cgroup quota, the affinity set and
    ``os.cpu_count()`` (those that are set); at least 1."""
    env = os.environ if environ is None else environ
    affinity = _affinity()
    candidates = [
        _positive_int(env.get("OMP_NUM_THREADS")),
        _positive_int(env.get("SLURM_CPUS_PER_TASK")),
        cgroup_cpu_limit(cgroup_root, proc_cgroup),
        len(affinity) if affinity else None,
        os.cpu_count(),
    ]
    found = [c for c in candidates if c is not None]
    return max(1, min(found)) if found else 1


def _cpu_times(text: str, cpus: set[int] | None) -> tuple[float, float]:
    """(idle, total) jiffies over the per-CPU lines of /proc/stat in ``cpus``."""
    idle = total = 0.0
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu":
            continue
        try:
            index = int(name[3:])
        except ValueError:
            continue
        if cpus is not None and index not in cpus:
            continue
        values = [float(v) for v in rest.split()]
        if len(values) < 4:
            continue
        idle += values[3] + (values[4] if len(values) > 4 else 0.0)  # idle + iowait
        total += sum(values[:8])  # user..steal; guest time is already in user
    return idle, total


def idle_cpus(sample_s: float = IDLE_SAMPLE_S, proc_stat: str = PROC_STAT,
              cpus: set[int] | None = None) -> float | None:
    """How many of ``cpus`` (default: this process's affinity set) were idle
    over a ``sample_s`` second sample (a fraction of CPUs); None if unknown."""
    cpus = _affinity() if cpus is None else cpus
    first = _read(proc_stat)
    if first is None:
        return None
    time.sleep(sample_s)
    second = _read(proc_stat)
    if second is None:
        return None
    idle0, total0 = _cpu_times(first, cpus)
    idle1, total1 = _cpu_times(second, cpus)
    counted = len(cpus) if cpus else sum(1 for ln in second.splitlines() if ln[:3] == "cpu" and ln[3:4].isdigit())
    if total1 <= total0 or not counted:
        return None
    return counted * max(0.0, min(1.0, (idle1 - idle0) / (total1 - total0)))


def default_threads(environ: Mapping[str, str] | None = None, *, sample_s: float = IDLE_SAMPLE_S,
                    **granted_kwargs) -> int:
    """The granted CPUs (:func:`granted_threads`), capped by those idle now
    (rounded to the nearest whole CPU, at least 1). ``SYNTHTOOLS_LOAD_AWARE=0``
    in the environment turns the idle cap off."""
    env = os.environ if environ is None else environ
    granted = granted_threads(env, **granted_kwargs)
    if granted == 1 or env.get("SYNTHTOOLS_LOAD_AWARE", "1") == "0":
        return granted
    idle = idle_cpus(sample_s)
    if idle is None:
        return granted
    return max(1, min(granted, int(idle + 0.5)))


def resolve_threads(explicit: int | None = None, environ: Mapping[str, str] | None = None, **kwargs) -> int:
    """Thread count for this process: ``explicit`` (a --threads value) if
    given, else :func:`default_threads`. ValueError if ``explicit`` < 1."""
    if explicit is not None:
        if explicit < 1:
            raise ValueError(f"the number of threads must be at least 1, got {explicit}")
        return int(explicit)
    return default_threads(environ, **kwargs)


def prepare_environment(environ: MutableMapping[str, str] | None = None) -> None:
    """Before torch/numpy load their OpenMP and BLAS runtimes: passive waiting
    (idle OpenMP threads sleep instead of spinning against other processes)
    and BLAS/OpenMP pools no larger than the granted CPUs. Variables the user
    set are left alone."""
    env = os.environ if environ is None else environ
    for name, value in WAIT_VARIABLES.items():
        env.setdefault(name, value)
    granted = str(granted_threads(env))
    for name in BLAS_VARIABLES:
        env.setdefault(name, granted)


def configure_torch(threads: int) -> int:
    """Give torch ``threads`` intra-op threads and one inter-op thread (the
    CLIs run one operation at a time; a second pool would only compete).
    Returns ``threads``."""
    import torch

    torch.set_num_threads(int(threads))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only allowed before the first parallel work: keep what is there
        pass
    return int(threads)



class ThreadGovernor:
    """Keeps a long job's torch threads at the CPUs other processes leave it.

    A one-shot command picks its count once (:func:`default_threads`); a
    training run lasts hours while other jobs come and go. Two threads on
    two cores beside one busy process run about 5x slower per step than
    one thread (measured on the segmentation run: 3.1 s against 0.53 s),
    because every parallel operation waits for the descheduled thread.
    Call the governor once per step: every ``every_s`` seconds it measures,
    from two readings of ``/proc/stat`` and this process's CPU time, how
    many CPUs *other* processes kept busy, and sets
    ``max_threads - others`` threads (rounded, at least 1). Returns the new
    count when it changed, else None.
    """

    def __init__(self, max_threads: int, every_s: float = 60.0, proc_stat: str = PROC_STAT,
                 cpus: set[int] | None = None, clock=time.monotonic, own_cpu=time.process_time):
        self.max_threads = max(1, int(max_threads))
        self.every_s = float(every_s)
        self.proc_stat = proc_stat
        self.cpus = _affinity() if cpus is None else cpus
        self.clock, self.own_cpu = clock, own_cpu
        self.threads = self.max_threads
        self._last = self._reading()

    def _reading(self) -> tuple[float, float, float, float] | None:
        text = _read(self.proc_stat)
        if text is None:
            return None
        idle, total = _cpu_times(text, self.cpus)
        return self.clock(), self.own_cpu(), idle, total

    def others(self, before, after) -> float | None:
        """CPUs kept busy by other processes between two readings."""
        (t0, own0, idle0, total0), (t1, own1, idle1, total1) = before, after
        if t1 <= t0 or total1 <= total0:
            return None
        counted = len(self.cpus) if self.cpus else 1
        busy = counted * (1.0 - (idle1 - idle0) / (total1 - total0))
        return max(0.0, busy - (own1 - own0) / (t1 - t0))

    def __call__(self) -> int | None:
        if self._last is not None and self.clock() - self._last[0] < self.every_s:
            return None
        now = self._reading()
        before, self._last = self._last, now
        if before is None or now is None:
            return None
        others = self.others(before, now)
        if others is None:
            return None
        want = max(1, min(self.max_threads, int(self.max_threads - others + 0.5)))
        if want == self.threads:
            return None
        import torch
        torch.set_num_threads(want)
        self.threads = want
        return want
