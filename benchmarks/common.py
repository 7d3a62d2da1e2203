"""The harness every benchmark shares: subprocesses that can be killed with
their children, their wall time and peak RSS, tool versions, and the images
the speed runs time. Standard-library only at import time: a benchmark's
parent process stays small (on Linux a child starts with its parent's peak
RSS), heavy imports happen inside the functions that need them."""
from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path


def peak_rss_gib(who: str = "self") -> float:
    """Peak resident set size (GiB) of this process or of its largest waited-for child."""
    import resource
    kib = resource.getrusage(resource.RUSAGE_SELF if who == "self" else resource.RUSAGE_CHILDREN).ru_maxrss
    if sys.platform == "darwin":  # bytes there
        kib /= 1024
    return kib / 1024 ** 2


def version_of(dist: str) -> str | None:
    """The installed version of a distribution, None if it is not installed."""
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def run_killable(cmd: list[str], env: dict, timeout: float | None) -> tuple[int | None, str, str, float]:
    """Run ``cmd`` in its own process group; on timeout kill the whole group
    (ROBEX and other grandchildren included). Returns (rc or None on timeout,
    stdout, stderr, wall seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err, time.perf_counter() - t0
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        return None, out, err, time.perf_counter() - t0


def timed(cmd: list[str], env: dict, timeout: float | None) -> dict:
    """Wall time and peak RSS of one command (``/usr/bin/time -v`` if present)."""
    if os.access("/usr/bin/time", os.X_OK):
        full = ["/usr/bin/time", "-v", *cmd]
    else:  # shim: run the command and report the largest child's ru_maxrss
        shim = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
                "print('Maximum resident set size (kbytes): %d' % "
                "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)")
        full = [sys.executable, "-c", shim, *cmd]
    rc, out, err, wall = run_killable(full, env, timeout)
    if rc is None:
        return {"status": "timeout", "error": f"timed out after {timeout:g} s", "wall_s": wall}
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    rss = int(m.group(1)) / 1024 ** 2 if m else None
    if rc != 0:
        tail = [ln for ln in err.strip().splitlines() if not ln.startswith("\t")][-4:]
        return {"status": "failed", "error": f"exit {rc}: " + " | ".join(tail), "wall_s": wall}
    return {"status": "ok", "wall_s": wall, "peak_rss_gb": rss}


def timed_median(cmd: list[str], env: dict, repeats: int, timeout: float | None = 900) -> dict:
    """:func:`timed` ``repeats`` times after one warm-up (file caches, lazy
    imports): median wall time and the largest peak RSS, or the first failure."""
    timed(cmd, env, timeout)
    runs = [timed(cmd, env, timeout) for _ in range(repeats)]
    bad = [r for r in runs if r["status"] != "ok"]
    if bad:
        return {"status": "failed", "error": bad[0]["error"]}
    return {"status": "ok", "wall_s": statistics.median(r["wall_s"] for r in runs),
            "peak_rss_gb": max(r["peak_rss_gb"] or 0 for r in runs), "repeats": repeats}


def last_result(tag: str, stdout: str | None) -> dict | None:
    """The JSON of a worker's last ``tag``-prefixed line on stdout (None if none)."""
    lines = [ln for ln in (stdout or "").splitlines() if ln.startswith(tag)]
    return json.loads(lines[-1][len(tag):]) if lines else None


# ----------------------------------------------------------- images

def load_image(case):
    """Frame 0 of the case's image as float32 (what every method gets)."""
    from synthtools.evaluation import data_root
    from synthtools.io import Volume, load_volume
    img = load_volume(data_root() / case.image, allow_4d=True)
    if img.data.ndim == 4:
        img = Volume(img.data[..., 0], img.affine, img.header, img.path)
    return img


def make_head(path: Path) -> str:
    """A 1 mm 256^3 head (LIA) from BrainWeb T1 or the ROBEX atlas; returns its source."""
    import nibabel as nib
    import numpy as np

    from synthtools.conform import conform
    from synthtools.evaluation import STRIP_CASES
    for name in ("brainweb_T1", "robex_T1"):
        case = next(c for c in STRIP_CASES if c.name == name)
        if case.available():
            break
    else:
        raise SystemExit("speed: neither BrainWeb T1 nor the ROBEX atlas found (set SYNTHTOOLS_DATA)")
    vol = load_image(case)
    conf = conform(vol, voxsize=1, orientation="LIA", shape=(256, 256, 256))
    data = conf.data.numpy()
    if float(data.max()) <= 100:  # a [0, 1]-style float image: spread it over int16 levels
        data = data * (1000.0 / max(float(data.max()), 1e-6))
    data = np.clip(np.round(data), -32768, 32767).astype(np.int16)  # like a scanner's int16 file
    img = nib.Nifti1Image(data, conf.affine)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))
    return case.name
