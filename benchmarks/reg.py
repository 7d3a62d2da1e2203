"""Benchmark of linear registration (rigid or affine): ours against ANTsPy.

Error of a pull-back transform T (fixed RAS -> moving RAS): the mean distance
(mm) between where T and the reference send the fixed image's brain voxels
(``synthtools.metrics.displacement_error``). Cases (none is ever trained on):

  lesjak_*   the real Lesjak p01 pairs of ``synthtools.evaluation.REG_CASES``:
             T2W/FLAIR -> T1W within session 1 and session 2 -> session 1 per
             contrast (2D clinical scans, 3-4 mm slices, defaced whole heads),
             against the dataset's own ITK transforms;
  known_*    a real whole-head scan moved by a known random transform (seeded
             per case; rigid: rotations up to ``--max-rot`` degrees about each
             axis and translations up to ``--max-shift`` mm, both about the
             brain centroid; affine adds scaling 0.9-1.1 per axis) and
             resampled on its own grid (so part of the head may leave the
             field of view), registered to the unmoved scan of the same subject
             in the same or another contrast (BrainWeb subject04 T1/T2/PD,
             SPM avg152 T1/T2/PD, ROBEX atlas). Error in the fixed brain mask.

Methods, each given the images exactly as stored:

  ours   ``synthtools.morph.register.register_linear`` with ``--model``
         (default the shipped synthmorph-rigid / synthmorph-affine);
  ants   ANTsPy ``registration(type_of_transform="Rigid"/"Affine")`` with its
         defaults (Mattes mutual information, 4 levels, centre-of-mass
         initialisation), the ITK transform converted to our RAS pull-back.

Time per pair: wall seconds of the registration alone (images in memory),
both on ``--threads`` CPU threads. Speed (unless ``--no-speed``): the whole
``synthmorph register`` command on two 1 mm 256^3 heads, wall time and peak
RSS. Output (``--out``, default
benchmarks/results): reg_<mode>.md, reg_<mode>.json, reg_<mode>.png and the
peer's reg_<mode>_ants.json (``--peers reuse`` takes it again)::

    python benchmarks/reg.py --mode rigid                 # ours + ANTs
    python benchmarks/reg.py --mode rigid --only ants     # the peer alone (reg_rigid_ants.json)
    python benchmarks/reg.py --mode rigid --peers reuse --write-metadata
    python benchmarks/reg.py --mode rigid --peers none --model runs/rigid/model
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
from benchmarks.machine import (child_env, cpu_name, import_ants, limit_threads, peer_results,  # noqa: E402
                                set_model_metrics)

BW, SPM = "validation/brainweb_subject04/", "validation/spm12_mni_templates/"
BW_MASK = BW + "mask_intracranial_csf_gm_wm_filled_1mm.nii.gz"


@dataclass(frozen=True)
class KnownCase:
    """``moving`` (moved by a random transform) registered to ``fixed``;
    both are files under the data root, same subject, aligned in world space."""
    name: str
    moving: str
    fixed: str
    mask: str               # brain mask on the fixed grid (> 0.5)
    seed: int


KNOWN_CASES = [
    KnownCase("known_brainweb_T1_to_T1", BW + "T1w_sim.nii.gz", BW + "T1w_sim.nii.gz", BW_MASK, 1),
    KnownCase("known_brainweb_T2_to_T1", BW + "T2w_sim.nii.gz", BW + "T1w_sim.nii.gz", BW_MASK, 2),
    KnownCase("known_brainweb_PD_to_T1", BW + "PDw_sim.nii.gz", BW + "T1w_sim.nii.gz", BW_MASK, 3),
    KnownCase("known_brainweb_T1_to_T2", BW + "T1w_sim.nii.gz", BW + "T2w_sim.nii.gz", BW_MASK, 4),
    KnownCase("known_spm_T1_to_T1", SPM + "avg152T1.nii.gz", SPM + "avg152T1.nii.gz", SPM + "brainmask_prob_2mm.nii.gz", 5),
    KnownCase("known_spm_T2_to_T1", SPM + "avg152T2.nii.gz", SPM + "avg152T1.nii.gz", SPM + "brainmask_prob_2mm.nii.gz", 6),
    KnownCase("known_spm_PD_to_T1", SPM + "avg152PD.nii.gz", SPM + "avg152T1.nii.gz", SPM + "brainmask_prob_2mm.nii.gz", 7),
    KnownCase("known_robex_T1_to_T1", "validation/robex_atlas_t1/atlas.nii.gz", "validation/robex_atlas_t1/atlas.nii.gz",
              "validation/robex_atlas_t1/atlas_mask.nii.gz", 8),
]


def random_transform(seed: int, centre: np.ndarray, mode: str, max_rot: float, max_shift: float) -> np.ndarray:
    """A 4x4 RAS map about ``centre`` (mm): rotations U(-max_rot, max_rot)
    degrees about x, y, z, translations U(-max_shift, max_shift) mm, and for
    ``affine`` scalings U(0.9, 1.1) per axis."""
    rng = np.random.default_rng(seed)
    ax, ay, az = np.deg2rad(rng.uniform(-max_rot, max_rot, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    lin = rz @ ry @ rx
    if mode == "affine":
        lin = lin @ np.diag(rng.uniform(0.9, 1.1, 3))
    m = np.eye(4)
    m[:3, :3] = lin
    m[:3, 3] = centre - lin @ centre + rng.uniform(-max_shift, max_shift, 3)
    return m


def load_pairs(root: Path, mode: str, max_rot: float, max_shift: float) -> list[dict]:
    """Every available case: moving and fixed Volume, fixed brain mask, reference Affine."""
    from synthtools.conform import resample
    from synthtools.io import Volume, load_volume
    from synthtools.morph.transforms import Affine
    from synthtools.evaluation import LJ, REG_CASES, reference_transform
    pairs = []
    for c in REG_CASES:
        if not c.available(root):
            continue
        pairs.append({"name": c.name, "group": "lesjak",
                      "moving": load_volume(root / f"{LJ}raw/{c.moving}.nii.gz"),
                      "fixed": load_volume(root / f"{LJ}raw/{c.fixed}.nii.gz"),
                      "mask": load_volume(root / f"{LJ}derived/{c.fixed}_brainmask_derived.nii.gz").data > 0.5,
                      "ref": reference_transform(c, root)})
    for c in KNOWN_CASES:
        if not all((root / f).is_file() for f in (c.moving, c.fixed, c.mask)):
            continue
        fixed, source = load_volume(root / c.fixed), load_volume(root / c.moving)
        mask = load_volume(root / c.mask).data > 0.5
        if mask.shape != fixed.shape:
            raise SystemExit(f"{c.mask}: mask grid {mask.shape} differs from {c.fixed} {fixed.shape}")
        vox = np.argwhere(mask).mean(0)
        centre = fixed.affine[:3, :3] @ vox + fixed.affine[:3, 3]
        t = random_transform(c.seed, centre, mode, max_rot, max_shift)
        # moved(q) = source(inv(t) q): the anatomy at fixed point p sits at t p.
        moved = resample(np.asarray(source.data, np.float32), t @ source.affine, source.affine, source.shape)
        pairs.append({"name": c.name, "group": "known", "moving": Volume(moved, source.affine),
                      "fixed": fixed, "mask": mask, "ref": Affine(t)})
    return pairs


def error_mm(t, pair: dict) -> float:
    from synthtools.morph.transforms import as_geometry
    from synthtools.metrics import displacement_error
    return round(displacement_error(t, pair["ref"], as_geometry(pair["fixed"]), pair["mask"]), 3)


def run_ours(model_name: str, pairs: list[dict]) -> dict:
    from synthtools.morph.register import model_kind, register_linear
    from synthtools.weights import load_model
    t0 = time.perf_counter()
    model = load_model(model_name)
    setup = time.perf_counter() - t0
    res = {}
    for p in pairs:
        t0 = time.perf_counter()
        t = register_linear(model, p["moving"], p["fixed"])
        res[p["name"]] = {"run_s": round(time.perf_counter() - t0, 2), "error_mm": error_mm(t, p)}
    path = Path(model.path).resolve()
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path   # no machine paths in results
    return {"setup_s": round(setup, 2), "cases": res, "model": str(shown), "type": model_kind(model)}


def ants_to_ras(tx) -> np.ndarray:
    """An ANTs/ITK affine (LPS, y = A (x - c) + c + t, fixed -> moving) as a
    4x4 RAS pull-back."""
    par = np.asarray(tx.parameters, np.float64)
    c = np.asarray(tx.fixed_parameters, np.float64)
    lin, t = par[:9].reshape(3, 3), par[9:12]
    m = np.eye(4)
    m[:3, :3] = lin
    m[:3, 3] = t + c - lin @ c
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ m @ flip


def run_ants(pairs: list[dict], mode: str, threads: int) -> dict:
    import nibabel as nib
    ants, missing = import_ants(threads)
    if missing:
        return missing
    from synthtools.morph.transforms import Affine
    res = {}
    with tempfile.TemporaryDirectory(prefix="regbench-") as tmp:
        for p in pairs:
            imgs = []
            for role in ("fixed", "moving"):
                path = Path(tmp) / f"{role}.nii.gz"
                nib.save(nib.Nifti1Image(np.asarray(p[role].data, np.float32), p[role].affine), str(path))
                imgs.append(ants.image_read(str(path)))
            t0 = time.perf_counter()
            reg = ants.registration(imgs[0], imgs[1], type_of_transform=mode.capitalize())
            wall = time.perf_counter() - t0
            t = Affine(ants_to_ras(ants.read_transform(reg["fwdtransforms"][0])))
            res[p["name"]] = {"run_s": round(wall, 2), "error_mm": error_mm(t, p)}
    from importlib import metadata
    return {"status": "ok", "cases": res, "version": metadata.version("antspyx"),
            "call": f"ants.registration(fixed, moving, type_of_transform={mode.capitalize()!r})"}


def identity_errors(pairs: list[dict]) -> dict:
    from synthtools.morph.transforms import Affine
    return {p["name"]: error_mm(Affine(np.eye(4)), p) for p in pairs}


def run_speed(model: str, mode: str, threads: int, repeats: int) -> dict:
    """The full ``synthmorph register`` command on two 1 mm 256^3 heads (the
    BrainWeb T1 head of benchmarks/strip.py and a copy moved by a known
    transform), under ``/usr/bin/time -v``; median of ``repeats`` after one
    warm-up."""
    import nibabel as nib

    from benchmarks.common import make_head, timed_median
    from synthtools.conform import resample
    with tempfile.TemporaryDirectory(prefix="regspeed-") as tmp:
        tmp = Path(tmp)
        fixed = tmp / "fixed.nii.gz"
        source = make_head(fixed)
        img = nib.load(str(fixed))
        t = random_transform(0, img.affine[:3, :3] @ (np.array(img.shape) / 2) + img.affine[:3, 3], mode, 20, 20)
        moved = resample(np.asarray(img.dataobj, np.float32), t @ img.affine, img.affine, img.shape)
        nib.save(nib.Nifti1Image(np.round(moved).astype(np.int16), img.affine), str(tmp / "moving.nii.gz"))
        cmd = [sys.executable, "-m", "synthtools.cli.morph", "register", "-m", mode, str(tmp / "moving.nii.gz"),
               str(fixed), "-o", str(tmp / "moved.nii.gz"), "-t", str(tmp / "t.lta"), "-j", str(threads),
               "--model", model]
        res = timed_median(cmd, child_env(threads), repeats)
    return {**res, "source": source, "threads": threads} if res["status"] == "ok" else res


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.fmean(xs), 3) if xs else None


def summary(data: dict) -> dict:
    """Mean error and time per group (lesjak, known) and method."""
    out = {}
    methods = [m for m in ("ours", "ants") if data.get(m, {}).get("cases")]
    for m in methods:
        cases = data[m]["cases"]
        for g in ("lesjak", "known", "all"):
            names = [n for n in cases if g == "all" or n.startswith(g)]
            if names:
                out[f"{m}_{g}_error_mm"] = _mean(cases[n]["error_mm"] for n in names)
                out[f"{m}_{g}_max_error_mm"] = round(max(cases[n]["error_mm"] for n in names), 3)
                out[f"{m}_{g}_run_s"] = _mean(cases[n]["run_s"] for n in names)
    return out


def markdown(data: dict) -> str:
    ours, ants, s = data["ours"], data.get("ants", {}), data["summary"]
    has_ants = bool(ants.get("cases"))
    lines = [f"# Linear registration benchmark ({data['mode']})", "",
             f"{data['date']}, {data['cpu']}, {data['threads']} threads, torch {data['torch']}; ours: "
             f"`{ours['model']}`" + (f"; ANTs: antspyx {ants['version']}, `{ants['call']}`" if has_ants else ""),
             "", "Mean displacement error (mm) inside the fixed brain mask against the reference transform "
             "(`benchmarks/reg.py` docstring: lesjak = the dataset's own transforms, known = a seeded random "
             f"{data['mode']} transform, up to {data['max_rot']} degrees and {data['max_shift']} mm); "
             "time = seconds per registration." + (
                 f" The ANTs results were run on {ants.get('threads')} thread(s) on {ants.get('date')} (reused "
                 "file), so compare the times with care." if has_ants and ants.get("threads") != data["threads"]
                 else ""), "",
             "| case | no registration | ours error | ours s |" + (" ANTs error | ANTs s |" if has_ants else ""),
             "|---|---:|---:|---:|" + ("---:|---:|" if has_ants else "")]
    for name, r in ours["cases"].items():
        row = f"| {name} | {data['identity'][name]:.2f} | {r['error_mm']:.2f} | {r['run_s']:.1f} |"
        if has_ants:
            a = ants["cases"].get(name)
            row += f" {a['error_mm']:.2f} | {a['run_s']:.1f} |" if a else " n/a | n/a |"
        lines.append(row)
    lines.append("")
    for g in ("lesjak", "known", "all"):
        if f"ours_{g}_error_mm" not in s:
            continue
        text = (f"- {g}: ours mean {s[f'ours_{g}_error_mm']:.2f} mm (max {s[f'ours_{g}_max_error_mm']:.2f}), "
                f"{s[f'ours_{g}_run_s']:.1f} s per pair")
        if f"ants_{g}_error_mm" in s:
            text += (f"; ANTs mean {s[f'ants_{g}_error_mm']:.2f} mm (max {s[f'ants_{g}_max_error_mm']:.2f}), "
                     f"{s[f'ants_{g}_run_s']:.1f} s per pair; time ratio ANTs/ours "
                     f"{s[f'ants_{g}_run_s'] / max(s[f'ours_{g}_run_s'], 1e-9):.1f}x")
        lines.append(text)
    sp = data.get("speed", {})
    if sp.get("status") == "ok":
        lines.append(f"- speed: the whole `synthmorph register -m {data['mode']}` command on two 1 mm 256^3 heads: "
                     f"{sp['wall_s']:.1f} s wall, peak RSS {sp['peak_rss_gb']:.2f} GiB ({sp['threads']} threads, "
                     f"median of {sp['repeats']})")
    elif sp:
        lines.append(f"- speed: {sp.get('status')}: {sp.get('error')}")
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(data["ours"]["cases"])
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(names)), 4))
    series = [("no registration", [data["identity"][n] for n in names]),
              ("ours", [data["ours"]["cases"][n]["error_mm"] for n in names])]
    if data.get("ants", {}).get("cases"):
        series.append(("ANTs", [data["ants"]["cases"].get(n, {}).get("error_mm", np.nan) for n in names]))
    w = 0.8 / len(series)
    for k, (label, ys) in enumerate(series):
        ax.bar(x + (k - (len(series) - 1) / 2) * w, ys, w, label=label)
    ax.set_yscale("log")
    ax.set_xticks(x, [n.replace("lesjak_", "").replace("known_", "k:") for n in names], rotation=60, ha="right",
                  fontsize=7)
    ax.set_ylabel("mean error in the brain (mm)")
    ax.set_title(f"{data['mode']} registration, {data['date']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_metadata(folder: Path, data: dict) -> None:
    metrics = {"description": "mean displacement error (mm) in the fixed brain mask (benchmarks/reg.py): real "
                              "Lesjak p01 pairs against the dataset's transforms, real scans moved by known "
                              "random transforms", "date": data["date"],
               "cases": {n: r["error_mm"] for n, r in data["ours"]["cases"].items()},
               "summary": data["summary"]}
    if data.get("speed", {}).get("status") == "ok":
        metrics["speed_256_1mm"] = {k: data["speed"][k] for k in ("wall_s", "peak_rss_gb", "threads")}
    if data.get("ants", {}).get("cases"):
        metrics["peer_ants"] = {n: r["error_mm"] for n, r in data["ants"]["cases"].items()}
    set_model_metrics(folder, metrics)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", default="rigid", choices=["rigid", "affine"])
    ap.add_argument("--model", help="model folder or name (default synthmorph-<mode>)")
    ap.add_argument("--peers", default="ants", choices=["ants", "reuse", "none"],
                    help="ants: run the peer (writes reg_<mode>_ants.json); reuse: take that file from --out")
    ap.add_argument("--only", choices=["ants"], help="with --peers ants: run the peer alone")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-rot", type=float, default=20.0, help="degrees")
    ap.add_argument("--max-shift", type=float, default=20.0, help="mm")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--speed-repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--write-metadata", action="store_true", help="record the results in the model's metadata.json")
    a = ap.parse_args(argv)
    limit_threads(a.threads)
    import torch

    from synthtools.evaluation import data_root
    torch.set_num_threads(a.threads)
    pairs = load_pairs(data_root(), a.mode, a.max_rot, a.max_shift)
    if not pairs:
        print(f"SKIP: no registration validation case under {data_root()}")
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ants = peer_results(a.peers, out / f"reg_{a.mode}_ants.json", lambda: run_ants(pairs, a.mode, a.threads),
                        a.threads)
    if a.peers == "ants" and a.only == "ants":
        print(json.dumps(ants, indent=1))
        return 0
    data = {"date": _dt.date.today().isoformat(), "cpu": cpu_name(), "threads": a.threads, "mode": a.mode,
            "torch": torch.__version__, "max_rot": a.max_rot, "max_shift": a.max_shift,
            "identity": identity_errors(pairs), "ours": run_ours(a.model or f"synthmorph-{a.mode}", pairs)}
    if ants is not None:
        data["ants"] = ants
    if not a.no_speed:
        data["speed"] = run_speed(str(REPO / data["ours"]["model"]), a.mode, a.threads, a.speed_repeats)
    data["summary"] = summary(data)
    (out / f"reg_{a.mode}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    (out / f"reg_{a.mode}.md").write_text(markdown(data))
    plot(data, out / f"reg_{a.mode}.png")
    if a.write_metadata:
        write_metadata(REPO / data["ours"]["model"], data)
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
