"""What the benchmarks report about the machine they ran on."""
from __future__ import annotations

import os
import platform
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
               "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "NUMBA_NUM_THREADS")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what platform knows."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return cpu


def limit_threads(n: int, env: dict | None = None) -> dict:
    """Cap every thread pool a method may use (set before heavy imports)."""
    env = os.environ if env is None else env
    for var in THREAD_VARS:
        env[var] = str(n)
    return env


def child_env(threads: int) -> dict:
    """Environment of a benchmark subprocess: the repository importable, threads capped."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return limit_threads(threads, env)
