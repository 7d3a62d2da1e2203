"""Benchmark of inter-subject deformable registration: ours against ANTsPy SyN.

Cases (different brains, never trained on): the voxelmorph test scan (T1,
FreeSurfer aseg, skull-stripped) and BrainWeb subject04 (whole head,
simulated T1/T2/PD, crisp tissue classes), in both directions, same and
cross contrast. Score: Dice of the moving image's labels moved into the
fixed space (nearest neighbour) against the fixed image's labels, per tissue
class (the aseg merged into BrainWeb's CSF / GM / WM with
``synthtools.metrics.tissue_classes``). GM and WM are the headline; the
aseg's CSF label covers little of BrainWeb's CSF class, so CSF Dice is low
for every method and only shown. Folding: fraction of voxels of the fixed
grid whose Jacobian determinant of the map is <= 0.

Methods, each given the images exactly as stored:

  ours    ``synthmorph register -m joint``: the shipped synthmorph-affine
          (network + local-NCC^2 refinement), then the test-time SVF fit
          (``synthtools.morph.svf_fit``) at ``-r`` 0.5; the affine result
          alone is scored too;
  ants    ANTsPy ``registration(type_of_transform="SyN")`` (affine + SyN with
          its defaults: Mattes MI, 3 levels).

Time per pair: wall seconds of the registration alone (images in memory),
both on ``--threads`` CPU threads. Speed (unless ``--no-speed``): the whole
``synthmorph register -m joint`` command on two 1 mm 256^3 heads, wall time
and peak RSS. Output (``--out``, default benchmarks/results):
reg_deform.md/.json/.png and the peer's reg_deform_ants.json::

    python benchmarks/deform.py                       # ours + ANTs
    python benchmarks/deform.py --peers reuse         # ANTs from reg_deform_ants.json
    python benchmarks/deform.py --peers reuse --no-speed --network RUN_EXPORT --out /tmp/x
                                                      # + a trained SVF network as the deformable step
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
from benchmarks.machine import child_env, cpu_name, import_ants, limit_threads, peer_results  # noqa: E402

VXM = ("validation/voxelmorph_test_scan/vol.nii.gz", "validation/voxelmorph_test_scan/seg.nii.gz")
BRAINWEB = {c: (f"validation/brainweb_subject04/{c}w_sim.nii.gz",
                "validation/brainweb_subject04/crisp_labels_1mm_majority.nii.gz")
            for c in ("T1", "T2", "PD")}
CLASSES = {"CSF": 1, "GM": 2, "WM": 3}


def load_pairs(root: Path) -> list[dict]:
    """(moving, fixed) pairs with labels as BrainWeb classes (0 other, 1-3)."""
    from synthtools.io import load_volume
    from synthtools.metrics import tissue_classes
    if not all((root / p).exists() for p in (*VXM, *BRAINWEB["T1"])):
        return []

    def side(image, labels, aseg):
        lab = np.rint(load_volume(root / labels, dtype=None).data).astype(np.int32)
        lab = tissue_classes(lab) if aseg else np.where(np.isin(lab, list(CLASSES.values())), lab, 0)
        return load_volume(root / image), lab.astype(np.uint8)

    vxm = side(*VXM, aseg=True)
    pairs = []
    for c, (img, lab) in BRAINWEB.items():
        if (root / img).exists():
            bw = side(img, lab, aseg=False)
            pairs.append({"name": f"vxm_T1_to_brainweb_{c}", "moving": vxm, "fixed": bw})
            if c == "T1":
                pairs.append({"name": "brainweb_T1_to_vxm_T1", "moving": bw, "fixed": vxm})
    return pairs


def score(moved: np.ndarray, ref: np.ndarray) -> dict:
    from synthtools.metrics import dice
    out = {c: round(dice(moved == k, ref == k), 4) for c, k in CLASSES.items()}
    out["gm_wm"] = round((out["GM"] + out["WM"]) / 2, 4)
    return out


def folding(warp) -> float:
    """Fraction of fixed-grid voxels where the map (fixed voxel -> moving RAS)
    folds: its Jacobian determinant has the opposite sign of the grid's
    own voxel -> RAS matrix (or is 0)."""
    import torch

    from synthtools.morph.transforms import to_dense
    from synthtools.warp import jacobian_determinant
    coords = torch.from_numpy(to_dense(warp, warp.grid)).movedim(0, -1)   # moving RAS mm per fixed voxel
    det = jacobian_determinant(coords) * np.sign(np.linalg.det(warp.grid.affine[:3, :3]))
    return float((det <= 0).double().mean())


def run_ours(pairs: list[dict], regularization: float, network: str | None = None) -> dict:
    """Joint registration: the shipped affine model, then the test-time fit
    or, with ``network`` (an SVF model folder), that network."""
    from synthtools.morph.register import register
    from synthtools.morph.transforms import apply_transform, as_geometry
    from synthtools.weights import load_model
    from synthtools.io import Volume
    model = load_model("synthmorph-affine")
    deform = load_model(network) if network else model
    res = {}
    for p in pairs:
        (mov, mlab), (fix, flab) = p["moving"], p["fixed"]
        t0 = time.perf_counter()
        reg = register(mov, fix, "joint", {"linear": model, "deform": deform}, regularization=regularization,
                       inverse=False)
        wall = time.perf_counter() - t0
        labels = Volume(mlab, mov.affine, None)
        moved = np.rint(apply_transform(reg.transform, labels, as_geometry(fix), order=0)).astype(np.uint8)
        res[p["name"]] = {"run_s": round(wall, 2), **score(moved, flab), "neg_jacobian": folding(reg.transform)}
        print(p["name"], res[p["name"]], flush=True)
    return {"cases": res, "model": "models/synthmorph-affine + " + (str(network) if network else "synthtools.morph.svf_fit"),
            "regularization": regularization}


def run_affine_only(pairs: list[dict]) -> dict:
    from synthtools.io import Volume
    from synthtools.morph.register import register_linear
    from synthtools.morph.transforms import apply_transform, as_geometry
    from synthtools.weights import load_model
    model = load_model("synthmorph-affine")
    res = {}
    for p in pairs:
        (mov, mlab), (fix, flab) = p["moving"], p["fixed"]
        t = register_linear(model, mov, fix)
        moved = apply_transform(t, Volume(mlab, mov.affine, None), as_geometry(fix), order=0)
        res[p["name"]] = score(np.rint(moved).astype(np.uint8), flab)
    return {"cases": res}


def run_ants(pairs: list[dict], threads: int) -> dict:
    import nibabel as nib
    ants, missing = import_ants(threads)
    if missing:
        return missing
    res = {}
    with tempfile.TemporaryDirectory(prefix="deformbench-") as tmp:
        for p in pairs:
            paths = {}
            for role, (vol, lab) in (("fixed", p["fixed"]), ("moving", p["moving"])):
                paths[role] = Path(tmp) / f"{role}.nii.gz"
                nib.save(nib.Nifti1Image(np.asarray(vol.data, np.float32), vol.affine), str(paths[role]))
                paths[role + "_lab"] = Path(tmp) / f"{role}_lab.nii.gz"
                nib.save(nib.Nifti1Image(lab.astype(np.float32), vol.affine), str(paths[role + "_lab"]))
            fixed, moving = ants.image_read(str(paths["fixed"])), ants.image_read(str(paths["moving"]))
            t0 = time.perf_counter()
            reg = ants.registration(fixed, moving, type_of_transform="SyN")
            wall = time.perf_counter() - t0
            moved = ants.apply_transforms(fixed, ants.image_read(str(paths["moving_lab"])), reg["fwdtransforms"],
                                          interpolator="genericLabel").numpy()
            jac = ants.create_jacobian_determinant_image(fixed, reg["fwdtransforms"][0]).numpy()
            res[p["name"]] = {"run_s": round(wall, 2), **score(np.rint(moved).astype(np.uint8), p["fixed"][1]),
                              "neg_jacobian": float((jac <= 0).mean())}
            print("ants", p["name"], res[p["name"]], flush=True)
    from importlib import metadata
    return {"status": "ok", "cases": res, "version": metadata.version("antspyx"),
            "call": "ants.registration(fixed, moving, type_of_transform='SyN')"}


def run_speed(threads: int, repeats: int) -> dict:
    """``synthmorph register -m joint`` on two 1 mm 256^3 heads (the BrainWeb
    T1 head of benchmarks/strip.py and a copy moved by a known affine)."""
    import nibabel as nib

    from reg import random_transform
    from benchmarks.common import make_head, timed_median
    from synthtools.conform import resample
    with tempfile.TemporaryDirectory(prefix="deformspeed-") as tmp:
        tmp = Path(tmp)
        fixed = tmp / "fixed.nii.gz"
        source = make_head(fixed)
        img = nib.load(str(fixed))
        t = random_transform(0, img.affine[:3, :3] @ (np.array(img.shape) / 2) + img.affine[:3, 3], "affine", 20, 20)
        moved = resample(np.asarray(img.dataobj, np.float32), t @ img.affine, img.affine, img.shape)
        nib.save(nib.Nifti1Image(np.round(moved).astype(np.int16), img.affine), str(tmp / "moving.nii.gz"))
        cmd = [sys.executable, "-m", "synthtools.cli.morph", "register", "-m", "joint", str(tmp / "moving.nii.gz"),
               str(fixed), "-o", str(tmp / "moved.nii.gz"), "-t", str(tmp / "warp.nii.gz"), "-j", str(threads)]
        res = timed_median(cmd, child_env(threads), repeats)
    return {**res, "source": source, "threads": threads} if res["status"] == "ok" else res


def markdown(data: dict) -> str:
    ours, aff, ants = data["ours"]["cases"], data["affine_only"]["cases"], data.get("ants", {})
    has_ants = ants.get("status") == "ok"
    lines = [f"# Inter-subject deformable registration ({data['date']}, {data['cpu']}, {data['threads']} threads)",
             "", "Dice of moved tissue labels (GM, WM; CSF shown, see benchmarks/deform.py), fraction of folding "
             "voxels, wall time of the registration alone. Ours: `synthmorph register -m joint -r "
             f"{data['ours']['regularization']}`"
             + (f"; ANTsPy {ants['version']} `{ants['call']}`." if has_ants else f"; ANTs: {ants.get('error', 'not run')}."),
             "", "| pair | affine only GM / WM | ours GM / WM (CSF) | ANTs SyN GM / WM (CSF) | ours folding | "
             "ANTs folding | ours s | ANTs s |", "|---|---|---|---|---|---|---|---|"]
    for name, r in ours.items():
        a = ants["cases"].get(name) if has_ants else None
        f = aff[name]
        lines.append(f"| {name} | {f['GM']:.3f} / {f['WM']:.3f} | {r['GM']:.3f} / {r['WM']:.3f} ({r['CSF']:.3f}) | "
                     + (f"{a['GM']:.3f} / {a['WM']:.3f} ({a['CSF']:.3f}) | " if a else "- | ")
                     + f"{r['neg_jacobian']:.1e} | " + (f"{a['neg_jacobian']:.1e} | " if a else "- | ")
                     + f"{r['run_s']:.0f} | " + (f"{a['run_s']:.0f} |" if a else "- |"))
    s = data["summary"]
    lines += ["", f"Mean GM/WM Dice: affine only {s['affine_gm_wm']:.3f}, ours {s['ours_gm_wm']:.3f}"
              + (f", ANTs SyN {s['ants_gm_wm']:.3f}" if "ants_gm_wm" in s else "") + "."]
    if "ants_s" in s:
        lines.append(f"Mean time per pair: ours {s['ours_s']:.1f} s, ANTs SyN {s['ants_s']:.1f} s "
                     f"(ratio {s['ants_s'] / s['ours_s']:.1f}x), same machine and threads"
                     + ("" if data.get("same_run_peer", True) else
                        "; ANTs was timed in an earlier run (reg_deform_ants.json), not necessarily under the same load")
                     + ".")
    if "network_gm_wm" in s:
        net = data["network"]
        lines.append(f"Joint with a trained SVF network as the deformable step ({net['model']}): mean GM/WM "
                     f"{s['network_gm_wm']:.3f} in {s['network_s']:.1f} s a pair, folding at most "
                     f"{max(r['neg_jacobian'] for r in net['cases'].values()):.1e}.")
    sp = data.get("speed", {})
    if sp.get("status") == "ok":
        lines.append(f"Joint registration of two 1 mm 256^3 heads (whole command): {sp['wall_s']:.1f} s, "
                     f"peak RSS {sp['peak_rss_gb']:.2f} GiB ({sp['threads']} threads, median of {sp.get('repeats', '?')}).")
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = list(data["ours"]["cases"])
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(9, 4))
    series = [("affine only", data["affine_only"]["cases"]), ("ours (joint)", data["ours"]["cases"])]
    if data.get("ants", {}).get("status") == "ok":
        series.append(("ANTs SyN", data["ants"]["cases"]))
    for k, (label, cases) in enumerate(series):
        ax.bar(x + (k - 1) * 0.27, [cases[n]["gm_wm"] for n in names], 0.27, label=label)
    ax.set_xticks(x, [n.replace("_to_", "\n-> ") for n in names], fontsize=8)
    ax.set_ylabel("mean GM/WM Dice")
    ax.set_ylim(0.4, 1.0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", default="ants", choices=["ants", "reuse", "none"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-r", "--regularization", type=float, default=0.5)
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--speed-repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--network", help="also score joint registration with this SVF model folder as the deformable step")
    a = ap.parse_args(argv)
    limit_threads(a.threads)
    import torch

    from synthtools.evaluation import data_root
    torch.set_num_threads(a.threads)
    pairs = load_pairs(data_root())
    if not pairs:
        print(f"SKIP: voxelmorph test scan or BrainWeb subject04 missing under {data_root()}")
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ants = peer_results(a.peers, out / "reg_deform_ants.json", lambda: run_ants(pairs, a.threads), a.threads)
    data = {"date": _dt.date.today().isoformat(), "cpu": cpu_name(), "threads": a.threads, "torch": torch.__version__,
            "affine_only": run_affine_only(pairs), "ours": run_ours(pairs, a.regularization),
            "same_run_peer": a.peers == "ants"}
    if ants is not None:
        data["ants"] = ants
    if a.network:
        data["network"] = run_ours(pairs, a.regularization, a.network)
    if not a.no_speed:
        data["speed"] = run_speed(a.threads, a.speed_repeats)
    cases = data["ours"]["cases"]
    s = {"affine_gm_wm": statistics.fmean(r["gm_wm"] for r in data["affine_only"]["cases"].values()),
         "ours_gm_wm": statistics.fmean(r["gm_wm"] for r in cases.values()),
         "ours_s": statistics.fmean(r["run_s"] for r in cases.values())}
    if a.network:
        s["network_gm_wm"] = statistics.fmean(r["gm_wm"] for r in data["network"]["cases"].values())
        s["network_s"] = statistics.fmean(r["run_s"] for r in data["network"]["cases"].values())
    if ants is not None and ants.get("status") == "ok":
        s["ants_gm_wm"] = statistics.fmean(r["gm_wm"] for r in ants["cases"].values())
        s["ants_s"] = statistics.fmean(r["run_s"] for r in ants["cases"].values())
    data["summary"] = {k: round(v, 4) for k, v in s.items()}
    (out / "reg_deform.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    (out / "reg_deform.md").write_text(markdown(data))
    plot(data, out / "reg_deform.png")
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
