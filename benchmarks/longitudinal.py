"""Benchmark of the unbiased within-subject template (``synthmorph template``,
:mod:`synthtools.morph.template`), issue 32.

Parts (each skipped when its data is absent):

  known    BrainWeb subject04 T1/T2/PD (one anatomy), each with a different
           known rigid header change (seeded; rotations up to ``--max-rot`` /
           sqrt(3) degrees about each axis, shifts up to ``--max-shift`` /
           sqrt(3) mm per axis, about the brain centre): every pairwise relative transform recovered from the
           template (``inv(Q_j) Q_i``) against the truth, mean displacement
           (mm) in the brain of input i; the crisp tissue labels (CSF, GM, WM)
           of every input resampled (nearest) into the template, mean Dice
           between every two inputs; bias (below).
  lesjak   Lesjak p01 T1W/T2W/FLAIR, 2 sessions, 6 inputs in one template:
           the 5 pairs of ``synthtools.evaluation.REG_CASES`` against the
           dataset's own transforms, next to our pairwise rigid mode (the
           same ``register_linear`` as ``synthmorph register -m rigid``) on
           the same pairs; the dataset's brain masks resampled into the
           template (ours) or into session 1's T1W (pairwise rigid of every
           image to it: ours and ANTs), mean Dice between every two inputs.
  bias     for each input, the template's distance to its original pose (mean
           displacement of its brain, ``|Q_i x - x|``), against the distance of
           the ideal unbiased mid-space (the Karcher mean of the true poses,
           :func:`~synthtools.morph.template.solve_poses` on the true
           transforms); the excess (ours - ideal) must be equal across inputs
           within 0.2 mm. For the pairwise methods the "template" is the first
           session's T1W.
  time     the template of 3 inputs against one pairwise rigid registration,
           and the templates of 4 and 6 (Lesjak) against 3 (its first
           session): CPU seconds per input for N = 3, 4, 6; wall and process
           CPU seconds, interleaved (the CPU may be shared).

Peer: ANTsPy ``registration(type_of_transform="Rigid")`` (Mattes MI,
defaults) of every Lesjak image to session 1's T1W. Output (``--out``,
default benchmarks/results): longitudinal.md and longitudinal.json::

    flock /tmp/cpu.lock python benchmarks/longitudinal.py --threads 1
    flock /tmp/cpu.lock python benchmarks/longitudinal.py --threads 1 --parts time --reuse
    flock /tmp/cpu.lock python benchmarks/longitudinal.py --threads 1 --parts lesjak --reuse --reuse-pairwise

The last reruns only the template side of the Lesjak part: the pairwise and
ANTs matrices (saved under ``lesjak.matrices`` and ``lesjak.ants.to_first``)
do not depend on the template.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
from benchmarks.machine import cpu_name, import_ants, limit_threads  # noqa: E402

BW = "validation/brainweb_subject04/"
LESJAK_SCANS = ["study1_T1W", "study1_T2W", "study1_FLAIR", "study2_T1W", "study2_T2W", "study2_FLAIR"]
TISSUES = (1, 2, 3)        # BrainWeb crisp labels: CSF, GM, WM


def _r(x: float, nd: int = 3) -> float:
    return round(float(x), nd)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2.0 * np.logical_and(a, b).sum() / s


def brain_points(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    v = np.argwhere(mask).astype(np.float64)
    return v @ affine[:3, :3].T + affine[:3, 3]


def mean_disp(m: np.ndarray, n: np.ndarray, pts: np.ndarray) -> float:
    """Mean distance (mm) between where 4x4 maps ``m`` and ``n`` send ``pts``."""
    d = (m - n)[:3]
    return float(np.mean(np.linalg.norm(pts @ d[:3, :3].T + d[:3, 3], axis=1)))


def pairwise_errors(poses, true_poses, points) -> dict:
    """Every ordered pair's relative pull-back i -> j from the poses against the truth."""
    out = {}
    for i, j in itertools.permutations(range(len(poses)), 2):
        est = np.linalg.inv(poses[j]) @ poses[i]
        ref = np.linalg.inv(true_poses[j]) @ true_poses[i]
        out[f"{i}->{j}"] = _r(mean_disp(est, ref, points[i]))
    return out


def bias(poses, ideal, points, names) -> dict:
    """Distance of the template to each input's pose (mm, over its brain),
    the ideal mid-space's, and the excess."""
    eye = np.eye(4)
    d = {n: mean_disp(q, eye, p) for n, q, p in zip(names, poses, points)}
    di = {n: mean_disp(q, eye, p) for n, q, p in zip(names, ideal, points)}
    excess = {n: d[n] - di[n] for n in names}
    return {"distance_mm": {n: _r(v) for n, v in d.items()}, "ideal_mm": {n: _r(v) for n, v in di.items()},
            "excess_mm": {n: _r(v) for n, v in excess.items()},
            "spread_mm": _r(max(excess.values()) - min(excess.values())),
            "offset_from_ideal_mm": {n: _r(mean_disp(q, qi, p)) for n, q, qi, p in zip(names, poses, ideal, points)}}


def ideal_poses(true_rel: dict, n: int, centre: np.ndarray):
    from synthtools.morph.template import solve_poses
    return solve_poses(n, true_rel, centre)


def timed(f, *a, **kw):
    t0 = time.perf_counter()
    out = f(*a, **kw)
    return out, time.perf_counter() - t0


# ------------------------------------------------------------------ known --

def run_known(root: Path, model, max_rot: float, max_shift: float) -> dict | None:
    from reg import random_transform
    from synthtools.io import Volume, load_volume
    from synthtools.morph.register import register_linear
    from synthtools.morph.template import build_template, resample_input, template_grid
    files = [BW + f for f in ("T1w_sim.nii.gz", "T2w_sim.nii.gz", "PDw_sim.nii.gz")]
    extra = [BW + "mask_intracranial_csf_gm_wm_filled_1mm.nii.gz", BW + "crisp_labels_1mm_majority.nii.gz"]
    if not all((root / f).is_file() for f in files + extra):
        return None
    mask = load_volume(root / extra[0]).data > 0.5
    labels = load_volume(root / extra[1], dtype=None)
    src = [load_volume(root / f) for f in files]
    centre = brain_points(mask, src[0].affine).mean(0)
    # Input k: the same voxels with the header moved by H_k (anatomy at p now at H_k p).
    hs = [random_transform(100 + k, centre, "rigid", max_rot, max_shift) for k in range(3)]
    vols = [Volume(np.asarray(v.data), h @ v.affine, None, f"{n}_moved") for v, h, n in zip(src, hs, ("T1", "T2", "PD"))]
    names = ["T1", "T2", "PD"]
    points = [brain_points(mask, v.affine) for v in vols]
    true_poses = [np.linalg.inv(h) for h in hs]           # input RAS -> the unmoved anatomy's RAS

    _, t_pair = timed(register_linear, model, vols[1], vols[0])     # first: it pays the warm-up
    res, t_tpl = timed(build_template, model, vols)
    res.grid = template_grid(res)
    lab = [resample_input(res, k, Volume(np.asarray(labels.data), v.affine), order=0)[0] for k, v in enumerate(vols)]
    dices = {}
    for i, j in itertools.combinations(range(3), 2):
        dices[f"{names[i]}-{names[j]}"] = _r(statistics.fmean(dice(lab[i] == t, lab[j] == t) for t in TISSUES), 4)
    true_rel = {(i, j): np.linalg.inv(true_poses[j]) @ true_poses[i] for i, j in itertools.permutations(range(3), 2)}
    ideal = ideal_poses(true_rel, 3, res.centre)
    errs = pairwise_errors(res.poses, true_poses, points)
    return {"inputs": names, "header_moves_deg_mm": [_motion(h) for h in hs],
            "pairwise_error_mm": errs, "max_pairwise_error_mm": max(errs.values()),
            "label_dice": dices, "min_label_dice": min(dices.values()),
            "bias": bias(res.poses, ideal, points, names),
            "time_template_s": _r(t_tpl, 1), "time_pair_s": _r(t_pair, 1), "time_ratio": _r(t_tpl / t_pair, 2),
            "template_grid": res.grid.describe()}


def _motion(h: np.ndarray) -> list[float]:
    from scipy.spatial.transform import Rotation
    ang = np.rad2deg(np.linalg.norm(Rotation.from_matrix(h[:3, :3]).as_rotvec()))
    return [_r(ang, 1), _r(np.linalg.norm(h[:3, 3]), 1)]


# ----------------------------------------------------------------- lesjak --

def run_lesjak(root: Path, model, threads: int, peers: str, previous: dict | None = None) -> dict | None:
    """``previous``: an earlier lesjak result whose pairwise and ANTs
    matrices (``matrices``) are reused instead of registering again (they do
    not depend on the template); its pairwise times are kept."""
    from synthtools.io import load_volume
    from synthtools.morph.register import register_linear
    from synthtools.morph.template import build_template, resample_input, template_grid
    from synthtools.evaluation import LJ, REG_CASES, lesjak_common_to_scan
    raw = [root / f"{LJ}raw/{s}.nii.gz" for s in LESJAK_SCANS]
    masks_f = [root / f"{LJ}derived/{s}_brainmask_derived.nii.gz" for s in LESJAK_SCANS]
    if not all(f.is_file() for f in raw + masks_f):
        return None
    vols = [load_volume(f) for f in raw]
    masks = [load_volume(f, dtype=None) for f in masks_f]
    points = [brain_points(np.asarray(m.data) > 0.5, m.affine) for m in masks]
    common = [lesjak_common_to_scan(s, root) for s in LESJAK_SCANS]   # common RAS -> scan RAS
    idx = {s: k for k, s in enumerate(LESJAK_SCANS)}
    out: dict = {"inputs": LESJAK_SCANS}

    res3, t3 = timed(build_template, model, vols[:3])
    res, t6 = timed(build_template, model, vols)
    out["time_template_3_s"], out["time_template_6_s"] = _r(t3, 1), _r(t6, 1)

    # Pairwise rigid (ours): every image to study1_T1W, and the REG_CASES pairs directly.
    old = (previous or {}).get("matrices")
    if old:
        to_first = {int(k): np.array(m) for k, m in old["pairwise_to_first"].items()}
        direct = {c: np.array(m) for c, m in old["pairwise_direct"].items()}
        out["time_pair_s"] = previous["time_pair_s"]
        out["pairwise_reused_from"] = previous.get("date", "an earlier run")
    else:
        to_first, times, direct = {0: np.eye(4)}, [], {}
        for k in range(1, 6):
            t, dt = timed(register_linear, model, vols[k], vols[0])
            to_first[k] = t.matrix                       # study1_T1W RAS -> scan k RAS
            times.append(dt)
        out["time_pair_s"] = _r(statistics.fmean(times), 1)
        for c in REG_CASES:
            i, j = idx[c.fixed], idx[c.moving]
            direct[c.name] = to_first[j] if i == 0 else register_linear(model, vols[j], vols[i]).matrix
    out["matrices"] = {"pairwise_to_first": {k: m.tolist() for k, m in to_first.items()},
                       "pairwise_direct": {c: m.tolist() for c, m in direct.items()}}
    out["time_ratio_3"] = _r(t3 / out["time_pair_s"], 2)
    cases = {}
    for c in REG_CASES:
        i, j = idx[c.fixed], idx[c.moving]
        ref = common[j] @ np.linalg.inv(common[i])   # fixed RAS -> moving RAS
        tpl = np.linalg.inv(res.poses[j]) @ res.poses[i]
        cases[c.name] = {"template": _r(mean_disp(tpl, ref, points[i])),
                         "pairwise": _r(mean_disp(direct[c.name], ref, points[i]))}
    out["cases"] = cases

    res.grid = template_grid(res)
    out["template_grid"] = res.grid.describe()
    in_tpl = [resample_input(res, k, m, order=0)[0] > 0.5 for k, m in enumerate(masks)]
    out["mask_dice_template"] = _mean_dice(in_tpl)
    first = masks[0]

    def into_first(mats):
        return [np.asarray(first.data) > 0.5] + [
            resample_mask(masks[k], mats[k], first) for k in range(1, 6)]

    def into_template(mats):
        """Masks on the template grid through a method's pull-backs
        study1_T1W -> scan k, placed by our template's pose of study1_T1W
        (one common frame change: the relative alignment is the method's)."""
        poses = [res.poses[0] @ np.linalg.inv(mats[k]) for k in range(6)]
        return [resample_mask(masks[k], np.linalg.inv(poses[k]), res.grid) for k in range(6)]
    tpl_to_first = {k: np.linalg.inv(res.poses[k]) @ res.poses[0] for k in range(6)}
    out["mask_dice_pairwise"] = _mean_dice(into_first(to_first))
    # The same grid for both methods (each evaluation grid favours nobody but itself).
    out["mask_dice_template_on_first_grid"] = _mean_dice(into_first(tpl_to_first))
    out["mask_dice_pairwise_on_template_grid"] = _mean_dice(into_template(to_first))

    true_rel = {(i, j): common[j] @ np.linalg.inv(common[i]) for i, j in itertools.permutations(range(6), 2)}
    # The ideal mid-space from the true relative transforms, same Karcher gauge and centre as ours.
    ideal = ideal_poses(true_rel, 6, res.centre)
    names = LESJAK_SCANS
    out["bias_template"] = bias(res.poses, ideal, points, names)
    pair_poses = [np.linalg.inv(to_first[k]) for k in range(6)]    # scan RAS -> study1_T1W RAS
    out["bias_pairwise"] = bias(pair_poses, ideal, points, names)

    if peers == "ants":
        prev_ants = (previous or {}).get("ants", {})
        if old and prev_ants.get("to_first"):
            ants = {k: v for k, v in prev_ants.items() if k in ("status", "time_pair_s", "version", "call")}
            ants["to_first"] = {int(k): np.array(m) for k, m in prev_ants["to_first"].items()}
        else:
            ants = run_ants(vols, threads)
        if ants.get("status") == "ok":
            mats = {0: np.eye(4), **{k: m for k, m in ants["to_first"].items()}}
            ants["to_first"] = {k: m.tolist() for k, m in ants["to_first"].items()}
            ants["mask_dice"] = _mean_dice(into_first(mats))
            ants["mask_dice_on_template_grid"] = _mean_dice(into_template(mats))
            ants["cases"] = {}
            for c in REG_CASES:
                i, j = idx[c.fixed], idx[c.moving]
                ref = common[j] @ np.linalg.inv(common[i])
                est = mats[j] @ np.linalg.inv(mats[i])    # through study1_T1W
                ants["cases"][c.name] = _r(mean_disp(est, ref, points[i]))
            ap = [np.linalg.inv(mats[k]) for k in range(6)]
            ants["bias"] = bias(ap, ideal, points, names)
        out["ants"] = ants
    return out


def resample_mask(mask, matrix: np.ndarray, onto) -> np.ndarray:
    from synthtools.morph.transforms import Affine, apply_transform
    return apply_transform(Affine(matrix), mask, onto, order=0) > 0.5


def _mean_dice(masks) -> float:
    return _r(statistics.fmean(dice(a, b) for a, b in itertools.combinations(masks, 2)), 4)


def run_ants(vols, threads: int) -> dict:
    import tempfile

    import nibabel as nib
    from reg import ants_to_ras
    ants, missing = import_ants(threads)
    if missing:
        return missing
    out, times = {}, []
    with tempfile.TemporaryDirectory(prefix="longbench-") as tmp:
        imgs = []
        for k, v in enumerate(vols):
            path = Path(tmp) / f"{k}.nii.gz"
            nib.save(nib.Nifti1Image(np.asarray(v.data, np.float32), v.affine), str(path))
            imgs.append(ants.image_read(str(path)))
        for k in range(1, len(vols)):
            t0 = time.perf_counter()
            reg = ants.registration(imgs[0], imgs[k], type_of_transform="Rigid")
            times.append(time.perf_counter() - t0)
            out[k] = ants_to_ras(ants.read_transform(reg["fwdtransforms"][0]))
    from importlib import metadata
    return {"status": "ok", "to_first": out, "time_pair_s": _r(statistics.fmean(times), 1),
            "version": metadata.version("antspyx"),
            "call": "ants.registration(study1_T1W, image, type_of_transform='Rigid')"}


# ------------------------------------------------------------------- time --

def run_time(root: Path, model) -> dict | None:
    """Wall and CPU (process) seconds, interleaved so that a change of load
    on a shared machine hits both: pairwise rigid (study1_T2W -> study1_T1W),
    template of the 3 session-1 scans, of 4 (and study2_T1W), pairwise
    again, template of all 6."""
    from synthtools.io import load_volume
    from synthtools.morph.register import register_linear
    from synthtools.morph.template import build_template
    from synthtools.evaluation import LJ
    raw = [root / f"{LJ}raw/{s}.nii.gz" for s in LESJAK_SCANS]
    if not all(f.is_file() for f in raw):
        return None
    vols = [load_volume(f) for f in raw]

    def clock(f, *a):
        w, c = time.perf_counter(), time.process_time()
        f(*a)
        return _r(time.perf_counter() - w, 1), _r(time.process_time() - c, 1)
    register_linear(model, vols[1], vols[0], refine=())       # warm-up
    p1 = clock(register_linear, model, vols[1], vols[0])
    t3 = clock(build_template, model, vols[:3])
    t4 = clock(build_template, model, vols[:4])
    p2 = clock(register_linear, model, vols[1], vols[0])
    t6 = clock(build_template, model, vols)
    pw, pc = (p1[0] + p2[0]) / 2, (p1[1] + p2[1]) / 2
    return {"pair_wall_s": [p1[0], p2[0]], "pair_cpu_s": [p1[1], p2[1]], "template3_wall_s": t3[0],
            "template3_cpu_s": t3[1], "template4_wall_s": t4[0], "template4_cpu_s": t4[1],
            "template6_wall_s": t6[0], "template6_cpu_s": t6[1],
            "ratio3_wall": _r(t3[0] / pw, 2), "ratio3_cpu": _r(t3[1] / pc, 2),
            "per_input_cpu_s": {"3": _r(t3[1] / 3, 1), "4": _r(t4[1] / 4, 1), "6": _r(t6[1] / 6, 1)},
            "per_input_after_3_cpu_s": _r((t6[1] - t3[1]) / 3, 1), "per_input_first_3_cpu_s": _r(t3[1] / 3, 1)}


# ----------------------------------------------------------------- report --

def markdown(d: dict) -> str:
    L = ["# Longitudinal template benchmark (issue 32)", "",
         f"{d['date']}, {d['cpu']}, {d['threads']} threads, torch {d['torch']}, model `{d['model']}`. "
         "Produced by `benchmarks/longitudinal.py` (method in its docstring). Errors: mean displacement (mm) "
         "in the brain of the pair's first image.", ""]
    k = d.get("known")
    if k:
        L += ["## Known motion (BrainWeb subject04 T1/T2/PD, header moves "
              + ", ".join(f"{a} deg / {t} mm" for a, t in k["header_moves_deg_mm"]) + ")", "",
              "| pair (i->j) | error (mm) |", "|---|---:|"]
        L += [f"| {k['inputs'][int(p[0])]}->{k['inputs'][int(p[-1])]} | {e:.3f} |" for p, e in k["pairwise_error_mm"].items()]
        L += ["", f"- max pairwise error {k['max_pairwise_error_mm']:.3f} mm (target <= 0.3)",
              "- tissue labels (CSF/GM/WM) resampled into the template, mean Dice: "
              + ", ".join(f"{p} {v:.4f}" for p, v in k["label_dice"].items())
              + f" (min {k['min_label_dice']:.4f}, target >= 0.97)",
              f"- bias: template distance to each input's pose {k['bias']['distance_mm']} mm, ideal mid-space "
              f"{k['bias']['ideal_mm']}, excess spread {k['bias']['spread_mm']:.3f} mm (target <= 0.2); offset from "
              f"the ideal mid-space {k['bias']['offset_from_ideal_mm']}",
              f"- time: template of 3 {k['time_template_s']} s, one pairwise rigid {k['time_pair_s']} s: "
              f"ratio {k['time_ratio']} (target <= 3); template grid {k['template_grid']}", ""]
    j = d.get("lesjak")
    if j:
        a = j.get("ants", {})
        has = a.get("status") == "ok"
        L += ["## Real sessions (Lesjak p01, T1W/T2W/FLAIR x 2 sessions, 6 inputs in one template)", "",
              "| pair | template (ours) | pairwise rigid (ours) |" + (" ANTs via study1_T1W |" if has else ""),
              "|---|---:|---:|" + ("---:|" if has else "")]
        for name, c in j["cases"].items():
            L.append(f"| {name} | {c['template']:.3f} | {c['pairwise']:.3f} |"
                     + (f" {a['cases'][name]:.3f} |" if has else ""))
        mt = statistics.fmean(c["template"] for c in j["cases"].values())
        mp = statistics.fmean(c["pairwise"] for c in j["cases"].values())
        L += [f"| mean | {mt:.3f} | {mp:.3f} |" + (f" {statistics.fmean(a['cases'].values()):.3f} |" if has else ""), "",
              "- brain masks (the dataset's), mean Dice between the 6 inputs resampled (nearest) into one grid:",
              f"  - on the template grid: template {j['mask_dice_template']:.4f}, pairwise rigid to study1_T1W "
              f"{j['mask_dice_pairwise_on_template_grid']:.4f}"
              + (f", ANTs to study1_T1W {a['mask_dice_on_template_grid']:.4f}" if has else ""),
              f"  - on study1_T1W's grid (its own mask not resampled): template "
              f"{j['mask_dice_template_on_first_grid']:.4f}, pairwise rigid {j['mask_dice_pairwise']:.4f}"
              + (f", ANTs {a['mask_dice']:.4f}" if has else ""), ""]
        L += ["| input | template distance (mm) | ideal | excess | pairwise-to-study1_T1W distance | excess |"
              + (" ANTs distance | excess |" if has else ""), "|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if has else "")]
        bt, bp, ba = j["bias_template"], j["bias_pairwise"], a.get("bias", {})
        for n in j["inputs"]:
            row = (f"| {n} | {bt['distance_mm'][n]:.2f} | {bt['ideal_mm'][n]:.2f} | {bt['excess_mm'][n]:+.2f} | "
                   f"{bp['distance_mm'][n]:.2f} | {bp['excess_mm'][n]:+.2f} |")
            if has:
                row += f" {ba['distance_mm'][n]:.2f} | {ba['excess_mm'][n]:+.2f} |"
            L.append(row)
        L += ["", f"- bias (spread of the excess distance over inputs; target <= 0.2 mm): template "
              f"{bt['spread_mm']:.3f}, pairwise rigid to study1_T1W {bp['spread_mm']:.3f}"
              + (f", ANTs {ba['spread_mm']:.3f}" if has else ""),
              f"- time: template of 3 (session 1) {j['time_template_3_s']} s, of 6 {j['time_template_6_s']} s; one "
              f"pairwise rigid {j['time_pair_s']} s (ratio for 3: {j['time_ratio_3']})"
              + (f"; ANTs {a['time_pair_s']} s per pair" if has else "")
              + f"; template grid {j['template_grid']}"]
        if a and not has:
            L.append(f"- ANTs: {a.get('status')}: {a.get('error')}")
    t = d.get("time")
    if t:
        L += ["", f"## Time (Lesjak p01, interleaved, wall and process CPU seconds, {d['threads']} threads)", "",
              f"- one pairwise rigid (study1_T2W -> study1_T1W): wall {t['pair_wall_s']} s, CPU {t['pair_cpu_s']} s",
              f"- template of 3 (session 1): wall {t['template3_wall_s']} s, CPU {t['template3_cpu_s']} s: ratio to "
              f"one pair {t['ratio3_wall']} (wall), {t['ratio3_cpu']} (CPU) (target <= 3)",
              *([f"- template of 4 (session 1 and study2_T1W): wall {t['template4_wall_s']} s, CPU "
                 f"{t['template4_cpu_s']} s"] if "template4_cpu_s" in t else []),
              f"- template of 6: wall {t['template6_wall_s']} s, CPU {t['template6_cpu_s']} s: "
              f"{t['per_input_after_3_cpu_s']} CPU s per input after the first 3 "
              f"({t['per_input_first_3_cpu_s']} per input for the first 3)",
              *(["- CPU s per input for N = 3, 4, 6: " + ", ".join(f"{v}" for v in t["per_input_cpu_s"].values())
                 + " (target: not rising with N)"] if "per_input_cpu_s" in t else [])]
    L += targets(d)
    return "\n".join(L) + "\n"


def targets(d: dict) -> list[str]:
    """The issue's targets, pass or fail, from the numbers above."""
    rows = []

    def row(name: str, ok: bool, value: str) -> None:
        rows.append(f"| {name} | {value} | {'pass' if ok else 'FAIL'} |")
    k, j, t = d.get("known"), d.get("lesjak"), d.get("time")
    if k:
        row("known: every pairwise error <= 0.3 mm", k["max_pairwise_error_mm"] <= 0.3, f"max {k['max_pairwise_error_mm']:.3f}")
        row("known: label Dice >= 0.97", k["min_label_dice"] >= 0.97, f"min {k['min_label_dice']:.4f}")
        row("known: bias spread <= 0.2 mm", k["bias"]["spread_mm"] <= 0.2, f"{k['bias']['spread_mm']:.3f}")
    if j:
        for name, c in j["cases"].items():
            row(f"lesjak: {name} template <= pairwise", c["template"] <= c["pairwise"],
                f"{c['template']:.3f} vs {c['pairwise']:.3f}")
        row("lesjak: mask Dice >= pairwise (template grid)",
            j["mask_dice_template"] >= j["mask_dice_pairwise_on_template_grid"],
            f"{j['mask_dice_template']:.4f} vs {j['mask_dice_pairwise_on_template_grid']:.4f}")
        row("lesjak: mask Dice >= pairwise (study1_T1W grid)",
            j["mask_dice_template_on_first_grid"] >= j["mask_dice_pairwise"],
            f"{j['mask_dice_template_on_first_grid']:.4f} vs {j['mask_dice_pairwise']:.4f}")
        row("lesjak: bias spread <= 0.2 mm", j["bias_template"]["spread_mm"] <= 0.2,
            f"{j['bias_template']['spread_mm']:.3f}")
    if t:
        row("time: template of 3 <= 3x one pair (CPU)", t["ratio3_cpu"] <= 3, f"{t['ratio3_cpu']:.2f}x")
        if "per_input_cpu_s" in t:
            per = list(t["per_input_cpu_s"].values())
            row("time: CPU per input not rising with N (3, 4, 6)", per[-1] <= per[0],
                ", ".join(f"{v}" for v in per) + " s")
    return ["", "## Targets (issue 32)", "", "| target | value | |", "|---|---|---|", *rows] if rows else []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", default="known,lesjak,time", help="comma list: known, lesjak, time")
    ap.add_argument("--peers", default="ants", choices=["ants", "none"])
    ap.add_argument("--max-rot", type=float, default=15.0, help="degrees")
    ap.add_argument("--max-shift", type=float, default=20.0, help="mm (per axis, the total stays <= 20)")
    ap.add_argument("--model", default="synthmorph-rigid")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--reuse", action="store_true", help="keep the parts not run from an earlier longitudinal.json")
    ap.add_argument("--reuse-pairwise", action="store_true",
                    help="lesjak: take the pairwise and ANTs matrices from an earlier longitudinal.json "
                    "(they do not depend on the template) instead of registering again")
    a = ap.parse_args(argv)
    limit_threads(a.threads)
    import torch

    from synthtools.weights import load_model
    from synthtools.evaluation import data_root
    torch.set_num_threads(a.threads)
    model = load_model(a.model)
    root = data_root()
    parts = a.parts.split(",")
    data = {"date": _dt.date.today().isoformat(), "cpu": cpu_name(), "threads": a.threads,
            "torch": torch.__version__, "model": a.model}
    old = Path(a.out) / "longitudinal.json"
    prev = json.loads(old.read_text()) if old.is_file() else None
    if a.reuse and prev:
        data.update({k: prev[k] for k in ("known", "lesjak", "time") if prev.get(k) and k not in parts})
    if "known" in parts:
        # Per-axis ranges scaled so that the total rotation and shift stay within the limits.
        data["known"] = run_known(root, model, a.max_rot / np.sqrt(3), a.max_shift / np.sqrt(3))
        print(json.dumps(data["known"], indent=1), flush=True)
    if "lesjak" in parts:
        data["lesjak"] = run_lesjak(root, model, a.threads, a.peers,
                                    prev.get("lesjak") if a.reuse_pairwise and prev else None)
        print(json.dumps(data["lesjak"], indent=1, default=str), flush=True)
    if "time" in parts:
        data["time"] = run_time(root, model)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "longitudinal.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    (out / "longitudinal.md").write_text(markdown(data))
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
