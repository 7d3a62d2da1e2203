"""What the benchmarks report about the machine they ran on."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path
from typing import Callable

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


def set_model_metrics(folder: Path, metrics: dict) -> None:
    """Record a benchmark in a model folder's metadata.json (``metrics``),
    written atomically. The weights' hash covers the weights only, so the
    model stays loadable."""
    meta_path = Path(folder) / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["metrics"] = metrics
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, meta_path)


def peer_results(peers: str, peer_file: Path, run_peer: Callable[[], dict], threads: int) -> dict | None:
    """A peer's results: ``peers`` = "ants" runs ``run_peer()`` and saves it
    (with date, CPU, threads) to ``peer_file``; "reuse" reads that file
    (SystemExit if missing); "none" gives None."""
    if peers == "ants":
        res = run_peer()
        res.update(date=_dt.date.today().isoformat(), cpu=cpu_name(), threads=threads)
        Path(peer_file).write_text(json.dumps(res, indent=1) + "\n")
        return res
    if peers == "reuse":
        if not Path(peer_file).is_file():
            raise SystemExit(f"--peers reuse: {peer_file} not found (run with --peers ants first)")
        return json.loads(Path(peer_file).read_text())
    return None


def import_ants(threads: int):
    """ANTsPy limited to ``threads``: (module, None), or (None, the peer's
    "unavailable" result) when antspyx is not installed (the peer is optional)."""
    limit_threads(threads)
    try:
        import ants
    except ImportError as e:
        return None, {"status": "unavailable", "error": f"antspyx not installed ({e})"}
    return ants, None
