"""Wall time of each CLI beside another multi-threaded job (a shared node).

Issue 30, defect 1: with torch's default threads (one per core of the
machine) the tools collapsed next to another busy job (rigid registration
47 s by default against 11 s on one thread). This runs every CLI on real
scans from the data root, in subprocesses, in these arms:

* ``after default`` / ``after 1 thread``: this checkout's CLIs, default
  threads (:mod:`synthtools.threads`) and ``--threads 1``;
* ``before default``: the pre-fix CLIs (``--before-bin``, e.g. a venv with
  the main branch installed; skipped if absent), torch's default threads;
* ``after 2 threads, active wait``: optional (``--extra-arms``): the
  resolver's idle-CPU cap and passive waiting turned off, to show which
  part of the fix does the work;

each *contended* (beside a 2-thread torch 3D convolution loop started just
before, as another user's job) and, for the defaults, *uncontended* (no
loop). Arms are interleaved within each repeat, so slow drifts of the
machine's load hit every arm alike. Results: ``benchmarks/results/
contention.md`` and ``.json``.

    flock /tmp/cpu.lock python benchmarks/contention.py --repeats 2 --extra-arms
    # or one tool at a time (the lock is released in between), rows appended:
    flock /tmp/cpu.lock python benchmarks/contention.py --tools synthseg --repeats 1 --append
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import cpu_name  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HOG = """
import sys, time, torch
torch.set_num_threads(2)
x, w = torch.randn(1, 8, 64, 64, 64), torch.randn(8, 8, 3, 3, 3)
end = time.time() + float(sys.argv[1])
while time.time() < end:
    torch.nn.functional.conv3d(x, w, padding=1)
"""


def data_root() -> Path:
    return Path(os.environ.get("SYNTHTOOLS_DATA", REPO.parent / "shared" / "data"))


def commands(bin_dir: Path, out: Path, tools: list[str], seg_input: str | None = None) -> dict[str, list[str]]:
    """Each tool's command line (without thread flags) on real scans;
    ``seg_input``: another scan for synthseg (e.g. a 2 mm T1, for short runs)."""
    val = data_root() / "validation"
    t1 = val / "brainweb_subject04" / "T1w_sim.nii.gz"
    moving = val / "lesjak_longitudinal_ms_p01" / "raw" / "study2_T1W.nii.gz"
    cmds = {
        "synthstrip": [str(bin_dir / "synthstrip"), "-i", str(t1), "-m", str(out / "mask.nii.gz")],
        "synthseg": [str(bin_dir / "synthseg"), "-i", str(seg_input or t1), "-o", str(out / "seg.nii.gz")],
        "register rigid": [str(bin_dir / "synthmorph"), "register", "-m", "rigid", str(moving), str(t1),
                           "-t", str(out / "rigid.lta")],
        "register joint": [str(bin_dir / "synthmorph"), "register", "-m", "joint", str(moving), str(t1),
                           "-t", str(out / "joint.nii.gz")],
    }
    return {k: v for k, v in cmds.items() if k in tools}


THREAD_FLAG = {"synthstrip": "-t", "synthseg": "-t", "register rigid": "-j", "register joint": "-j"}


def run_once(cmd: list[str], env: dict) -> tuple[float, str, int, list[str]]:
    """Wall time (s), the threads the tool reported, exit code, its warnings."""
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    found = re.search(r"cpu \((\d+) threads?\)", res.stdout + res.stderr)
    if res.returncode != 0:
        print(f"  ! exit {res.returncode}: {(res.stderr or res.stdout).strip().splitlines()[-1:]}", flush=True)
    warnings = [x for x in res.stderr.splitlines() if ": warning:" in x]
    return wall, found.group(1) if found else "", res.returncode, warnings


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tools", default="synthstrip,synthseg,register rigid,register joint")
    ap.add_argument("--after-bin", default=str(Path(sys.executable).parent), help="bin folder of this checkout's CLIs")
    ap.add_argument("--before-bin", default=str(REPO.parent / "venv" / "bin"),
                    help="bin folder of the pre-fix CLIs (skipped if missing)")
    ap.add_argument("--before-commit", default="", help="what --before-bin runs, for the report")
    ap.add_argument("--no-uncontended", action="store_true", help="skip the arms without the other job")
    ap.add_argument("--extra-arms", action="store_true",
                    help="also 2 threads with passive waiting but no idle-CPU cap, and 2 threads with active "
                    "waiting (the whole fix off)")
    ap.add_argument("--one-thread-alone", action="store_true",
                    help="also run --threads 1 without the other job (does the default cost anything alone?)")
    ap.add_argument("--seg-input", help="synthseg's input (default: the BrainWeb T1, 1 mm); e.g. "
                    "validation/fsl_mni152_2mm/MNI152_T1_2mm.nii.gz under the data root for short runs")
    ap.add_argument("--append", action="store_true", help="add to the rows already in OUT.json")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "contention"))
    args = ap.parse_args()

    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    after, before = Path(args.after_bin), Path(args.before_bin)
    have_before = (before / "synthstrip").exists() and before.resolve() != after.resolve()
    work = Path(tempfile.mkdtemp(prefix="contention_"))
    base_env = {k: v for k, v in os.environ.items()
                if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY",
                             "KMP_BLOCKTIME", "SLURM_CPUS_PER_TASK", "SYNTHTOOLS_LOAD_AWARE")}
    # (name, bin, extra env, threads flag value or None, contended)
    arms = [("after default", after, {}, None, True),
            ("after 1 thread", after, {}, "1", True)]
    if have_before:
        arms.append(("before default", before, {}, None, True))
    if args.extra_arms:
        arms.append(("after 2 threads, passive wait", after, {}, "2", True))
        arms.append(("after 2 threads, active wait", after, {"OMP_WAIT_POLICY": "ACTIVE"}, "2", True))
    if not args.no_uncontended:
        arms.append(("after default", after, {}, None, False))
        if args.one_thread_alone:
            arms.append(("after 1 thread", after, {}, "1", False))
        if have_before:
            arms.append(("before default", before, {}, None, False))

    rows: list[dict] = []
    if args.append and Path(args.out).with_suffix(".json").exists():
        rows = json.loads(Path(args.out).with_suffix(".json").read_text())["runs"]
    print(f"cpus {os.cpu_count()}, load {loadavg()}, tools {tools}, arms {len(arms)}", flush=True)
    try:
        for rep in range(args.repeats):
            for tool in tools:
                for name, bin_dir, extra, threads, contended in arms:
                    # A fresh folder per run: the tools skip outputs that are already complete.
                    out = work / f"{rep}_{len(rows)}"
                    out.mkdir()
                    seg_input = None if args.seg_input is None else str(data_root() / args.seg_input) \
                        if not os.path.isabs(args.seg_input) else args.seg_input
                    cmd = commands(bin_dir, out, [tool], seg_input)[tool]
                    if threads is not None:
                        cmd += [THREAD_FLAG[tool], threads]
                    hog = None
                    if contended:
                        hog = subprocess.Popen([sys.executable, "-c", HOG, "100000"], env=base_env)
                        time.sleep(1.0)   # the other job is running before ours starts
                    load = loadavg()
                    try:
                        wall, used, code, warnings = run_once(cmd, dict(base_env, **extra))
                    finally:
                        if hog is not None:
                            hog.terminate()
                            hog.wait()
                    rows.append(dict(started=time.strftime("%H:%M:%S", time.gmtime()), repeat=rep, tool=tool, arm=name, contended=contended, seconds=round(wall, 2),
                                     threads=used, exit=code, load_at_start=load, warnings=warnings))
                    print(f"[{rep}] {tool:15s} {name:30s} {'contended' if contended else 'alone':9s} "
                          f"{wall:7.1f} s threads={used or '?'} load={load}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_report(rows, Path(args.out), args, have_before)


def write_report(rows: list[dict], out: Path, args, have_before: bool) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(cpu=cpu_name(), cpus=os.cpu_count(), affinity=len(os.sched_getaffinity(0)), seg_input=args.seg_input,
                repeats=sorted({r["repeat"] + 1 for r in rows}), before_bin=args.before_bin if have_before else None,
                before_commit=args.before_commit, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, runs=rows), indent=1) + "\n")

    def med(tool: str, arm: str, contended: bool) -> float | None:
        xs = [r["seconds"] for r in rows if r["tool"] == tool and r["arm"] == arm and r["contended"] == contended
              and r["exit"] == 0]
        return statistics.median(xs) if xs else None

    def threads(tool: str, arm: str, contended: bool) -> str:
        return "/".join(sorted({r["threads"] for r in rows if r["tool"] == tool and r["arm"] == arm
                                and r["contended"] == contended and r["threads"]})) or "?"

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"

    lines = ["# CLI wall time beside another multi-threaded job", "",
             f"{meta['cpu']}, {meta['cpus']} CPUs; {meta['date']}; median over the interleaved repeats "
             "(seconds, whole command including model load; the repeats of each tool are in the last table).", "",
             "Contended: a 2-thread torch conv3d loop (another user's job) runs during the command. "
             "`default / 1 thread` is the issue's target (at most 1.3).", "",
             "| tool | after: default | after: 1 thread | default / 1 thread | before: default | "
             "before / after (default) | threads used (after default) |",
             "|---|---|---|---|---|---|---|"]
    for tool in dict.fromkeys(r["tool"] for r in rows):
        d, one, b = med(tool, "after default", True), med(tool, "after 1 thread", True), med(tool, "before default", True)
        lines.append(f"| {tool} | {fmt(d)} | {fmt(one)} | {fmt(d / one) if d and one else '-'} | {fmt(b)} | "
                     f"{fmt(b / d) if b and d else '-'} | {threads(tool, 'after default', True)} |")
    extra = [r for r in rows if r["arm"].startswith("after 2 threads")]
    if extra:
        lines += ["", "Which part of the fix does the work, contended: `--threads 2` (no idle-CPU cap) with "
                  "passive OpenMP waiting (the CLIs' default now) and with `OMP_WAIT_POLICY=ACTIVE`:", "",
                  "| tool | 2 threads, passive | / 1 thread | 2 threads, active | / 1 thread |", "|---|---|---|---|---|"]
        for tool in dict.fromkeys(r["tool"] for r in extra):
            p, a = med(tool, "after 2 threads, passive wait", True), med(tool, "after 2 threads, active wait", True)
            one = med(tool, "after 1 thread", True)
            lines.append(f"| {tool} | {fmt(p)} | {fmt(p / one) if p and one else '-'} | {fmt(a)} | "
                         f"{fmt(a / one) if a and one else '-'} |")
    alone = [r for r in rows if not r["contended"]]
    if alone:
        lines += ["", "Uncontended (no conv loop started by the benchmark):", "",
                  "| tool | after: default | after: 1 thread | default / 1 thread | before: default | after / before "
                  "| threads used (after) |",
                  "|---|---|---|---|---|---|---|"]
        for tool in dict.fromkeys(r["tool"] for r in alone):
            d, b = med(tool, "after default", False), med(tool, "before default", False)
            one = med(tool, "after 1 thread", False)
            lines.append(f"| {tool} | {fmt(d)} | {fmt(one)} | {fmt(d / one) if d and one else '-'} | {fmt(b)} | "
                         f"{fmt(d / b) if d and b else '-'} | {threads(tool, 'after default', False)} |")
    lines += ["", "Every run (UTC start, seconds, exit code, threads the tool reported, 1-minute load average "
              "at its start):", "", "| start | repeat | tool | arm | contended | seconds | exit | threads | load |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.get('started', '')} | {r['repeat']} | {r['tool']} | {r['arm']} | {r['contended']} | {r['seconds']} | {r['exit']} | "
              f"{r['threads'] or '?'} | {r['load_at_start']} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:20]))


if __name__ == "__main__":
    main()
