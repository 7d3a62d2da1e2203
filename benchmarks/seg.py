"""Benchmark of whole-brain segmentation: ours against single-atlas ANTs SyN.

Accuracy (default) on the real labelled validation cases
(``synthtools.evaluation.SEG_CASES``, never trained on):

  vxm_T1            voxelmorph test scan (skull-stripped T1, FreeSurfer aseg):
                    Dice per SynthSeg label present in the aseg, their mean,
                    the mean over the large structures, and WM/GM/CSF tissue
                    Dice (both label maps merged into tissue classes). Also
                    "*_protocol": the same against the aseg relabelled into
                    the training protocol (synthtools.metrics.aseg_in_protocol:
                    choroid plexus in the lateral ventricles, corpus callosum
                    and WM hypointensities in the white matter), which no
                    SynthSeg-protocol segmenter can otherwise match;
  brainweb_T1/T2/PD BrainWeb subject04 simulations (whole head): WM/GM/CSF
                    tissue Dice against the phantom's crisp classes.

Methods, both scored on the target's own grid:

  ours   synthtools.seg.segment(model, volume, flip=True, refine=True,
         atlases=N).labels (``--model``, default the shipped 'synthseg'), the
         whole image as given, with the CLI's defaults: the left/right
         test-time flip, the model's default number N of atlases
         (synthtools/seg/atlas.py) and the intensity refinement
         (synthtools/seg/refine.py). Reported beside them: the same without
         atlases (a second run), and the network's own labels (the first
         run's network posteriors, no atlas, no refinement);
  ants   ANTsPy (antspyx) ``registration(type_of_transform="SyN")`` (Mattes
         mutual information, so it works across contrasts) of ONE labelled
         atlas to the target, then the atlas labels moved with
         ``genericLabel`` interpolation. We have no second real scan with an
         aseg, so the atlas is ``label_maps/training_seg_01`` (an aseg-style
         whole-head map, 1 mm) rendered as a T1-like image with the fixed
         intensities of ``synthtools.seg.atlas.T1_INTENSITY`` (blurred by 1 voxel)
         and reduced to the brain. The atlas is skull-stripped, so for the
         whole-head BrainWeb targets the peer gets the target multiplied by
         the dataset's intracranial mask: generous to the peer, which never
         sees skull or neck (ours does).

Contrast consistency (``synthtools.evaluation.CONSISTENCY_SETS``, no manual
labels): tissue-class Dice between our labels on the T1 and on each other
contrast of one anatomy (SPM avg152 T1/T2/PD on one grid; Lesjak study 1
and 2 T1W/T2W/FLAIR lined up by the dataset's own transforms), for the
full pipeline and the network alone, beside the grid ceiling: the score
of a perfect segmenter, BrainWeb's 1 mm anatomy drawn on each scan's grid
(1 on one grid; 0.84-0.88 for the Lesjak pairs, whose 3 mm and 4 mm
slices cannot agree on a thin cortex whatever the segmenter).

Speed (``--speed``): the full ``synthseg`` command on a 1 mm 256^3 head
(BrainWeb T1 conformed to 256^3, as benchmarks/strip.py makes it), under
``/usr/bin/time -v`` (wall and peak RSS), median of ``--speed-repeats``
after one warm-up; the ANTs time is its registration time per case above.

Output (``--out``, default benchmarks/results): seg.md, seg.json, seg.png;
``--write-metadata`` records the table in the model's metadata.json::

    python benchmarks/seg.py                       # ours + ANTs on all cases, speed
    python benchmarks/seg.py --peers ants --only ants   # the peer alone (seg_ants.json)
    python benchmarks/seg.py --peers reuse         # ours, with the saved peer results
    python benchmarks/seg.py --peers none --no-speed --model runs/seg/model
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
from benchmarks.machine import (child_env, cpu_name, import_ants, limit_threads, peer_results,  # noqa: E402
                                set_model_metrics)

ATLAS_MAP = "label_maps/training_seg_01.nii.gz"


def score(pred, ref, kind: str) -> dict:
    """Dice of one prediction on the target grid (see the module docstring)."""
    import numpy as np

    from synthtools.metrics import aseg_in_protocol, aseg_scores, tissue_classes, tissue_dice
    out = {}
    if kind == "aseg":
        for suffix, labels in (("", ref), ("_protocol", aseg_in_protocol(ref))):
            d, out["mean" + suffix], out["large" + suffix] = aseg_scores(pred, labels)
            out["label_dice" + suffix] = {str(k): round(v, 4) for k, v in d.items()}
        ref = tissue_classes(ref)
    out.update(tissue_dice(pred, ref))
    out["tissue_mean"] = float(np.mean([out["CSF"], out["GM"], out["WM"]]))
    return out


def load_cases(root: Path) -> list[dict]:
    """The SEG_CASES present under ``root``: image volume, reference labels, kind."""
    import numpy as np

    from synthtools.io import load_volume
    from synthtools.evaluation import SEG_CASES
    cases = []
    for c in SEG_CASES:
        if not c.available(root):
            continue
        ref = np.rint(load_volume(root / c.labels, dtype=None).data).astype(np.int32)
        cases.append({"name": c.name, "contrast": c.contrast, "kind": c.kind, "image": root / c.image,
                      "ref": ref})
    return cases


def run_ours(model_name: str, cases: list[dict]) -> dict:
    from synthtools.io import load_volume
    from synthtools.seg import segment
    from synthtools.weights import load_model
    t0 = time.perf_counter()
    model = load_model(model_name)
    setup = time.perf_counter() - t0
    from synthtools.seg.atlas import default_atlases
    from synthtools.seg.segmenter import _map_to_native
    atlases = default_atlases(model)
    res, network, plain = {}, {}, {}
    for c in cases:
        vol = load_volume(c["image"])
        t0 = time.perf_counter()
        result = segment(model, vol, flip=True, refine=True, atlases=atlases)   # the CLI's defaults
        res[c["name"]] = {"run_s": round(time.perf_counter() - t0, 2), **score(result.labels, c["ref"], c["kind"])}
        # The network's own answer: the same posteriors, mapped without atlases or refinement.
        arg = _map_to_native(result.conformed, result.network_posteriors, result.label_values, keep=False)[0]
        network[c["name"]] = score(result.label_values[arg], c["ref"], c["kind"])
        if atlases:
            t0 = time.perf_counter()
            labels = segment(model, vol, flip=True, refine=True).labels
            plain[c["name"]] = {"run_s": round(time.perf_counter() - t0, 2), **score(labels, c["ref"], c["kind"])}
    path = Path(model.path).resolve()
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path   # no machine paths in results
    return {"setup_s": round(setup, 2), "cases": res, "network_only": network, "no_atlases": plain,
            "atlases": atlases, "model": str(shown), "consistency": run_consistency(model, atlases)}


def run_consistency(model, atlases) -> dict:
    """Tissue-class Dice between our labels on different real contrasts of one
    anatomy (see the module docstring): the full pipeline and the network alone."""
    from synthtools.seg import segment
    from synthtools.evaluation import consistency_ceiling, score_consistency
    pipeline = score_consistency(lambda vol: segment(model, vol, flip=True, refine=True, atlases=atlases).labels)
    alone = score_consistency(lambda vol: segment(model, vol, flip=True).labels)
    return {"pipeline": {k: round(v, 4) for k, v in pipeline.items()},
            "network_only": {k: round(v, 4) for k, v in alone.items()},
            "ceiling": {k: round(v, 4) for k, v in consistency_ceiling().items()}}


def make_atlas(root: Path, tmp: Path) -> tuple[Path, Path]:
    """The single atlas: T1-like image and SynthSeg labels, brain only (NIfTI in ``tmp``)."""
    import nibabel as nib
    import numpy as np

    from synthtools.seg.atlas import atlas_image
    from synthtools.training.atlases import synthseg_labels
    img = nib.load(str(root / ATLAS_MAP))
    seg = synthseg_labels(np.rint(np.asanyarray(img.dataobj)).astype(np.int32))
    t1 = atlas_image(seg.astype(np.int32))
    paths = tmp / "atlas_t1.nii.gz", tmp / "atlas_seg.nii.gz"
    nib.save(nib.Nifti1Image(t1, img.affine), str(paths[0]))
    nib.save(nib.Nifti1Image(seg.astype(np.int16), img.affine), str(paths[1]))
    return paths


def run_ants(root: Path, cases: list[dict], threads: int) -> dict:
    import nibabel as nib
    import numpy as np
    ants, missing = import_ants(threads)
    if missing:
        return missing
    from synthtools.io import load_volume
    from synthtools.evaluation import STRIP_CASES
    res = {}
    with tempfile.TemporaryDirectory(prefix="segbench-") as tmp:
        tmp = Path(tmp)
        atlas_img, atlas_seg = make_atlas(root, tmp)
        moving, moving_seg = ants.image_read(str(atlas_img)), ants.image_read(str(atlas_seg))
        for c in cases:
            vol = load_volume(c["image"])
            data = np.asarray(vol.data, np.float32)
            if c["kind"] == "tissue":   # whole head: give the peer the intracranial mask
                mcase = next(s for s in STRIP_CASES if s.name == c["name"] and s.brain == "csf")
                data = data * (np.asarray(load_volume(root / mcase.mask).data) > 0.5)
            target = tmp / f"{c['name']}.nii.gz"
            nib.save(nib.Nifti1Image(data, vol.affine), str(target))
            fixed = ants.image_read(str(target))
            t0 = time.perf_counter()
            reg = ants.registration(fixed, moving, type_of_transform="SyN")
            moved = ants.apply_transforms(fixed, moving_seg, reg["fwdtransforms"], interpolator="genericLabel")
            wall = time.perf_counter() - t0
            pred = np.rint(moved.numpy()).astype(np.int32)
            res[c["name"]] = {"run_s": round(wall, 2), **score(pred, c["ref"], c["kind"])}
    from importlib import metadata
    return {"status": "ok", "cases": res, "version": metadata.version("antspyx"), "atlas": ATLAS_MAP}


def run_speed(model: str, threads: int, repeats: int) -> dict:
    from benchmarks.common import make_head, timed_median
    with tempfile.TemporaryDirectory(prefix="segspeed-") as tmp:
        head = Path(tmp) / "head.nii.gz"
        source = make_head(head)
        cmd = [sys.executable, "-m", "synthtools.cli.seg", str(head), str(Path(tmp) / "seg.nii.gz"),
               "-t", str(threads), "--model", model, "--overwrite"]   # repeats must not skip complete outputs
        res = timed_median(cmd, child_env(threads), repeats)
    return {**res, "source": source, "threads": threads} if res["status"] == "ok" else res


def markdown(data: dict) -> str:
    ours, ants = data["ours"], data.get("ants", {})
    has_ants = ants.get("status") == "ok"
    lines = [f"# Segmentation benchmark ({data['date']})", "",
             f"Machine: {data['cpu']}, {data['threads']} threads; torch {data['torch']}; model `{ours['model']}`"
             + (f"; ANTsPy {ants['version']} SyN, single atlas `{ants['atlas']}` (see benchmarks/seg.py)"
                if has_ants else f"; ANTs: {ants.get('error', 'not run')}"), "",
             f"'ours' is the `synthseg` default (network, {ours.get('atlases', 0)} atlases registered to the scan, "
             "intensity refinement); 'no atlases' the same without the atlases (`--atlases 0`); 'network only' "
             "the network's posteriors alone. '*_protocol': against the aseg relabelled into the training "
             "label protocol (choroid plexus in the lateral ventricles, corpus callosum and WM "
             "hypointensities in the white matter; `synthtools.metrics.aseg_in_protocol`); the plain "
             "'mean'/'large' are the issue's metric.", "",
             "| case | metric | ours | no atlases | network only | ANTs SyN atlas |", "|---|---|---|---|---|---|"]
    net, plain = ours.get("network_only", {}), ours.get("no_atlases", {})

    def cell(d: dict, k: str, spec: str = ".3f") -> str:
        return format(d[k], spec) if k in d else "n/a"

    for name, r in ours["cases"].items():
        a = ants["cases"].get(name, {}) if has_ants else {}
        n, p = net.get(name, {}), plain.get(name, {})
        keys = (["mean", "large", "mean_protocol", "large_protocol"] if "mean" in r else []) + \
            ["CSF", "GM", "WM", "tissue_mean"]
        for k in keys:
            lines.append(f"| {name} | {k} | {cell(r, k)} | {cell(p, k)} | {cell(n, k)} | {cell(a, k)} |")
        lines.append(f"| {name} | time (s) | {r['run_s']:.1f} | {cell(p, 'run_s', '.1f')} | - | "
                     f"{cell(a, 'run_s', '.1f')} |")
    if "mean" in ours["cases"].get("vxm_T1", {}):
        r, a = ours["cases"]["vxm_T1"], (ants["cases"].get("vxm_T1", {}) if has_ants else {})
        n = net.get("vxm_T1", {}).get("label_dice", {})
        p = plain.get("vxm_T1", {}).get("label_dice", {})
        rp = r.get("label_dice_protocol", {})
        lines += ["", "Dice per label, vxm_T1 (last column: ours against the aseg in the training protocol):",
                  "", "| label | ours | no atlases | network only | ANTs | ours, protocol |",
                  "|---|---|---|---|---|---|"]
        from synthtools.seg.lut import names_for
        for k, v in r["label_dice"].items():
            lines.append(f"| {k} {names_for([int(k)])[0]} | {v:.3f} | {p.get(k, float('nan')):.3f} | "
                         f"{n.get(k, float('nan')):.3f} | {a.get('label_dice', {}).get(k, float('nan')):.3f} | "
                         f"{rp.get(k, float('nan')):.3f} |")
    tw = ours["cases"]
    groups = {c: tw[f"brainweb_{c}"]["tissue_mean"] for c in ("T1", "T2", "PD") if f"brainweb_{c}" in tw}
    if groups:
        lines += ["", "Contrast invariance (BrainWeb tissue Dice, ours): "
                  + ", ".join(f"{c} {v:.3f}" for c, v in groups.items())
                  + f"; spread {max(groups.values()) - min(groups.values()):.3f}"]
        for cls in ("CSF", "GM", "WM"):
            vals = [tw[f"brainweb_{c}"][cls] for c in groups]
            lines.append(f"- {cls}: spread {max(vals) - min(vals):.3f}")
    cons = ours.get("consistency") or {}
    if cons.get("pipeline"):
        lines += ["", "Contrast consistency (tissue-class Dice between our labels on the T1 and on another "
                  "contrast of one anatomy; target >= 0.90). 'Grid ceiling': what a perfect segmenter scores, "
                  "one 1 mm anatomy drawn on each scan's own grid (`consistency_ceiling`):", "",
                  "| pair | ours | network only | grid ceiling |", "|---|---|---|---|"]
        nan = float("nan")
        for k, v in cons["pipeline"].items():
            lines.append(f"| {k.removeprefix('consistency_')} | {v:.3f} | "
                         f"{cons.get('network_only', {}).get(k, nan):.3f} | {cons.get('ceiling', {}).get(k, nan):.3f} |")
    sp = data.get("speed")
    if sp and sp.get("status") == "ok":
        lines += ["", f"Speed: `synthseg` on a 1 mm 256^3 head ({sp['source']}), {sp['threads']} threads: "
                  f"{sp['wall_s']:.1f} s wall (median of {sp['repeats']}), peak RSS {sp['peak_rss_gb']:.2f} GiB."]
        if has_ants:
            t = [r["run_s"] for r in ants["cases"].values()]
            lines.append(f"ANTs SyN per case: {min(t):.0f}-{max(t):.0f} s (registration + label transfer only).")
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ours, ants = data["ours"]["cases"], data.get("ants", {}).get("cases", {})
    names = list(ours)
    keys = [("vxm_T1", "mean")] if "mean" in ours.get("vxm_T1", {}) else []
    keys += [(n, "tissue_mean") for n in names]
    x = range(len(keys))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([i - 0.2 for i in x], [ours[n][k] for n, k in keys], 0.4, label="ours")
    if ants:
        ax.bar([i + 0.2 for i in x], [ants.get(n, {}).get(k, 0) for n, k in keys], 0.4, label="ANTs SyN atlas")
    ax.set_xticks(list(x), [f"{n}\n{k}" for n, k in keys], fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def write_metadata(folder: Path, data: dict) -> None:
    ours = data["ours"]["cases"]
    metrics = {"description": "Dice on real labelled scans (benchmarks/seg.py, native grid): vxm_T1 against its "
                              "FreeSurfer aseg (mean over present SynthSeg labels, large structures), BrainWeb "
                              "subject04 T1/T2/PD tissue classes (our labels merged into CSF/GM/WM); "
                              "'cases': the synthseg defaults (flip + intensity refinement), 'network_only': "
                              "the network's posteriors without the refinement",
               "date": data["date"], "cases": {n: {k: v for k, v in r.items() if k != "run_s"}
                                               for n, r in ours.items()},
               "network_only": data["ours"].get("network_only", {}),
               "contrast_consistency": data["ours"].get("consistency", {})}
    if data.get("ants", {}).get("status") == "ok":
        metrics["peer_ants_syn_atlas"] = {n: {k: v for k, v in r.items() if k != "label_dice"}
                                          for n, r in data["ants"]["cases"].items()}
    if data.get("speed", {}).get("status") == "ok":
        metrics["speed_256_1mm"] = {k: data["speed"][k] for k in ("wall_s", "peak_rss_gb", "threads")}
    set_model_metrics(folder, metrics)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="synthseg")
    ap.add_argument("--peers", default="ants", choices=["ants", "reuse", "none"],
                    help="ants: run the peer (writes seg_ants.json too); reuse: take seg_ants.json of --out")
    ap.add_argument("--only", choices=["ours", "ants"], help="run one method (with --peers ants: ANTs alone)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--speed-repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--write-metadata", action="store_true", help="record the results in the model's metadata.json")
    a = ap.parse_args(argv)
    limit_threads(a.threads)
    import torch

    from synthtools.evaluation import data_root
    torch.set_num_threads(a.threads)
    root = data_root()
    cases = load_cases(root)
    if not cases:
        print(f"SKIP: no segmentation validation case under {root}")
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ants = peer_results(a.peers, out / "seg_ants.json", lambda: run_ants(root, cases, a.threads), a.threads)
    if a.peers == "ants" and a.only == "ants":
        print(json.dumps(ants, indent=1))
        return 0
    data = {"date": _dt.date.today().isoformat(), "cpu": cpu_name(), "threads": a.threads,
            "torch": torch.__version__, "ours": run_ours(a.model, cases)}
    if a.peers != "none":
        data["ants"] = ants
    if not a.no_speed:
        data["speed"] = run_speed(data["ours"]["model"], a.threads, a.speed_repeats)
    (out / "seg.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    (out / "seg.md").write_text(markdown(data))
    plot(data, out / "seg.png")
    if a.write_metadata:
        write_metadata(REPO / data["ours"]["model"], data)
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
