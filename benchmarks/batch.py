"""Batch inference vs separate calls: ``synthstrip`` on N scans in one call
(model loaded once) against N single-scan calls, same scans, same threads.

    python benchmarks/batch.py [-n 10] [--threads 2] [--out benchmarks/results]

The N scans are copies of the bundled example scan, each shifted in world
space (a new header) so no two inputs are the same file. Writes
``batch.md`` and ``batch.json``: total and per-scan wall time of both ways,
interpreter start and imports included (what a user waits for)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from benchmarks.machine import child_env, cpu_name  # noqa: E402


def make_scans(folder: Path, n: int) -> list[Path]:
    from synthtools.data import example_scan
    img = nib.load(str(example_scan()))
    data = np.asarray(img.dataobj)
    paths = []
    for k in range(n):
        aff = img.affine.copy()
        aff[:3, 3] += [2.0 * k, -1.5 * k, 1.0 * k]   # mm: a different position per scan
        path = folder / f"scan{k:02d}.nii.gz"
        nib.save(nib.Nifti1Image(data, aff, img.header), str(path))
        paths.append(path)
    return paths


def timed(cmd: list[str], threads: int) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=child_env(threads), check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=10, help="number of scans (default 10)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    a = p.parse_args(argv)
    tool = [sys.executable, "-m", "synthtools.cli.strip", "-t", str(a.threads)]
    load = os.getloadavg()[0]   # other work on the machine slows both ways alike
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scans = make_scans(tmp, a.n)
        batch_dir = tmp / "batch"
        t_batch = timed([*tool, "-i", *map(str, scans), "-m", f"{batch_dir}/"], a.threads)
        t_single = sum(timed([*tool, "-i", str(s), "-m", str(tmp / f"single_{s.name}")], a.threads)
                       for s in scans)
        same = all(np.array_equal(np.asarray(nib.load(str(batch_dir / s.name.replace(".nii.gz", "_mask.nii.gz"))).dataobj),
                                  np.asarray(nib.load(str(tmp / f"single_{s.name}")).dataobj)) for s in scans)
    res = {"n": a.n, "threads": a.threads, "cpu": cpu_name(), "batch_total_s": round(t_batch, 1),
           "single_total_s": round(t_single, 1), "batch_per_scan_s": round(t_batch / a.n, 2),
           "single_per_scan_s": round(t_single / a.n, 2), "speedup": round(t_single / t_batch, 2),
           "masks_identical": same, "load_average_at_start": round(load, 2)}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "batch.json").write_text(json.dumps(res, indent=1) + "\n")
    md = ["# Batch inference vs separate calls", "",
          f"`python benchmarks/batch.py -n {a.n} --threads {a.threads}`: `synthstrip -m` on {a.n} copies of the "
          f"bundled example scan (each with its own header), CPU {res['cpu']}. Wall time of the whole "
          "command (interpreter start, imports, model load, reading and writing included).", "",
          "| way | total (s) | per scan (s) |", "|---|---:|---:|",
          f"| one call, {a.n} inputs (`-i a b c ... -m outdir/`) | {t_batch:.1f} | {t_batch / a.n:.2f} |",
          f"| {a.n} separate calls | {t_single:.1f} | {t_single / a.n:.2f} |", "",
          f"Batch speed-up: **{res['speedup']:.2f}x**; masks of both ways identical: {same}. "
          f"Load average when started: {load:.1f} on {os.cpu_count()} CPUs."]
    (a.out / "batch.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
