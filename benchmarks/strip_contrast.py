"""Does the brain mask depend on the contrast? One anatomy, five sequences.

BrainWeb subject04's crisp tissue model (1 mm, 12 classes) is imaged with the
signal equations of ``synthtools.training.generator.mr_contrast.signal`` under BrainWeb's
own tissue parameters and five fixed textbook protocols (T1w spoiled gradient
echo, MPRAGE, T2w and PD spin echo, FLAIR), with 3 % Rician noise. The
anatomy is the same in every image, so a mask that follows the anatomy has
the same volume in all five: the spread (max - min, ml) measures how much a
method's boundary moves with the contrast alone, with no reference-mask
convention involved. Dice against the BrainWeb masks (cord below the foramen
magnum excluded) is reported too. deepbet runs as the peer when installed.

    python benchmarks/strip_contrast.py [--model PATH] [--out benchmarks/results]

Writes strip_contrast.json and strip_contrast.md to ``--out``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from benchmarks.machine import cpu_name, limit_threads  # noqa: E402

CASE = "validation/brainweb_subject04/"
# BrainWeb's simulator parameters per class (T1 ms, T2 ms, PD): background, CSF,
# grey matter, white matter, fat, muscle, muscle/skin, skull, vessels, around
# fat, dura mater, bone marrow.
BRAINWEB_TISSUES = np.array([
    (0, 0, 0), (2569, 329, 1.0), (833, 83, 0.86), (500, 70, 0.77), (350, 70, 1.0), (900, 47, 1.0),
    (2569, 329, 1.0), (0, 0, 0), (0, 0, 0), (500, 70, 0.77), (2569, 329, 1.0), (500, 70, 0.77)], float)
PROTOCOLS = {
    "T1w (SPGR)": ("spgr", {"tr": 18, "te": 10, "fa": 30}),
    "MPRAGE": ("mprage", {"ti": 900, "te": 3}),
    "T2w (SE)": ("t2_se", {"tr": 3300, "te": 100}),
    "PD (SE)": ("pd_se", {"tr": 3300, "te": 15}),
    "FLAIR": ("flair", {"tr": 9000, "te": 100, "ti_null": 1.0, "t1_csf": 2569}),
}


def tissue_image(labels: np.ndarray, sequence: str, settings: dict, rng: np.random.Generator) -> np.ndarray:
    """The class map imaged with one protocol, 3 % Rician noise (of the maximum)."""
    from synthtools.training.generator.mr_contrast import signal
    t1, t2, pd = (torch.from_numpy(BRAINWEB_TISSUES[:, k]) for k in range(3))
    # Signal-less classes (air, bone, vessels) have T1 = T2 = 0: give them
    # finite times, their PD of 0 keeps them dark.
    table = signal(t1.clamp_min(1.0), t2.clamp_min(1.0), pd, sequence, settings).numpy()
    img = table[labels]
    sd = 0.03 * img.max()
    return np.abs(img + rng.normal(0, sd, img.shape) + 1j * rng.normal(0, sd, img.shape)).astype(np.float32)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="synthstrip")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-peer", action="store_true", help="skip deepbet")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args()
    limit_threads(args.threads)
    from benchmarks.strip import build_deepbet, build_ours
    from synthtools.io import load_volume
    from synthtools.skullstrip import channel_of
    from synthtools.weights import load_model
    from synthtools.evaluation import data_root
    from synthtools.metrics import dice, neck_crop
    root = data_root() / CASE
    if not (root / "crisp_labels_1mm_majority.nii.gz").is_file():
        raise SystemExit(f"BrainWeb subject04 not found under {root}")
    lab = load_volume(root / "crisp_labels_1mm_majority.nii.gz")
    labels = np.asarray(lab.data).round().astype(int)
    refs = {"csf": load_volume(root / "mask_intracranial_csf_gm_wm_filled_1mm.nii.gz").data > 0.5,
            "nocsf": load_volume(root / "mask_brain_gm_wm_filled_1mm.nii.gz").data > 0.5}
    region = neck_crop(refs["csf"], lab.affine)
    ml = float(np.prod(lab.voxsize)) / 1000.0
    # The skull-stripping benchmark's own method builders (flip on, border 1 mm).
    run = argparse.Namespace(model=args.model, threads=args.threads, border=1.0, flip=True)
    model = load_model(args.model, "cpu")
    methods = {f"ours {b}": (build_ours(argparse.Namespace(**vars(run), brain=b))[0], b)
               for b in ("csf", "nocsf") if channel_of(model, b) is not None}
    if not args.no_peer and importlib.util.find_spec("deepbet"):
        methods["deepbet"] = (build_deepbet(run)[0], "nocsf")
    rng = np.random.default_rng(0)
    rows = {}
    for name, (sequence, settings) in PROTOCOLS.items():
        vol = dataclasses.replace(lab, data=tissue_image(labels, sequence, settings, rng))
        for method, (predict, brain) in methods.items():
            m = np.asarray(predict(vol)) > 0
            rows.setdefault(method, {})[name] = {
                "ml": float((m & region).sum() * ml), "dice": dice(m & region, refs[brain] & region)}
            print(f"# {name:12s} {method:11s} {rows[method][name]['ml']:7.0f} ml  Dice {rows[method][name]['dice']:.4f}",
                  file=sys.stderr, flush=True)
    spread = {m: max(r["ml"] for r in v.values()) - min(r["ml"] for r in v.values()) for m, v in rows.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    raw = {"date": _dt.date.today().isoformat(), "cpu": cpu_name(), "threads": args.threads, "model": args.model,
           "protocols": {k: [s, v] for k, (s, v) in PROTOCOLS.items()}, "results": rows, "spread_ml": spread}
    (args.out / "strip_contrast.json").write_text(json.dumps(raw, indent=1) + "\n")
    lines = ["# Mask volume across contrasts, one anatomy", "",
             f"`python benchmarks/strip_contrast.py` on {raw['date']}, model `{args.model}` (flip on, border 1 mm), "
             "BrainWeb subject04 imaged with five protocols (BrainWeb tissue parameters, 3 % Rician noise). "
             "Volume in the scoring region (cord below the foramen magnum excluded); Dice against the BrainWeb "
             "mask of the method's convention (csf: intracranial; nocsf: grey + white matter).", "",
             "| protocol | " + " | ".join(f"{m} ml (Dice)" for m in rows) + " |", "|---|" + "---:|" * len(rows)]
    for name in PROTOCOLS:
        lines.append(f"| {name} | " + " | ".join(f"{rows[m][name]['ml']:.0f} ({rows[m][name]['dice']:.3f})"
                                                 for m in rows) + " |")
    lines.append("| **spread (max - min), ml** | " + " | ".join(f"**{spread[m]:.0f}**" for m in rows) + " |")
    (args.out / "strip_contrast.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(spread))
    return 0


if __name__ == "__main__":
    sys.exit(main())
