"""``synthtools models``: the shipped models, read from their metadata.

    synthtools models [--json] [--models-dir DIR]
    python -m synthtools models

One block per model folder (``models/<name>/metadata.json``): name, task,
code revision, training steps and minutes, sha256 of the weights (and
whether the file on disk matches it, with ``--verify``), and the headline
validation metrics of its model card. Exit code 2 for bad arguments or
when no model is found.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NoReturn, Sequence

from .common import Parser, UsageError
from .entry import entry

PROG = "synthtools"


def build_parser() -> Parser:
    p = Parser(prog=f"{PROG} models", description="List the shipped models: name, task, training steps, "
               "sha256 of the weights and headline validation metrics (from each model's metadata.json).")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of the text table")
    p.add_argument("--verify", action="store_true", help="also hash each weights file and compare with its sha256")
    p.add_argument("--models-dir", metavar="DIR", help="another models folder (default: the shipped one, "
                   "or $SYNTHTOOLS_MODELS)")
    return p


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def headline_metrics(meta: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of a model's ``metrics`` block: its own numbers
    (e.g. ``mean_dice_all_cases``), the ``summary`` block's means (e.g.
    ``ours_all_error_mm``), and the mean of each case that has one (e.g.
    ``cases.vxm_T1.mean``); peers' numbers, maxima and timings left out."""
    metrics = meta.get("metrics") or {}
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key.startswith("peer"):
            continue
        if _number(value):
            out[key] = float(value)
        elif key == "summary" and isinstance(value, dict):
            out.update({k: float(v) for k, v in value.items()
                        if _number(v) and k.startswith("ours_all") and "max" not in k and not k.endswith("_s")})
        elif key == "cases" and isinstance(value, dict):
            for case, v in value.items():
                for stat in ("mean", "tissue_mean"):
                    if isinstance(v, dict) and _number(v.get(stat)):
                        out[f"{case}.{stat}"] = float(v[stat])
                        break
    return out


def model_summary(folder: Path, verify: bool = False) -> dict[str, Any]:
    """Name, task, provenance, sha256 and headline metrics of one model folder."""
    from ..weights import read_metadata, sha256

    meta = read_metadata(folder)
    info: dict[str, Any] = {
        "name": meta.get("name", folder.name), "folder": str(folder), "task": meta.get("task"),
        "code_revision": meta.get("code_revision"), "steps": meta.get("steps"),
        "training_minutes": meta.get("training_minutes"), "sha256": meta.get("sha256"),
        "metrics_date": (meta.get("metrics") or {}).get("date"),
        "metrics_description": (meta.get("metrics") or {}).get("description"),
        "headline": headline_metrics(meta),
    }
    if verify:
        weights = folder / meta.get("weights", "weights.pt")
        info["sha256_ok"] = weights.is_file() and sha256(weights) == meta.get("sha256")
    return info


def list_models(models_dir: Path | None = None, verify: bool = False) -> list[dict[str, Any]]:
    """Summaries of every model folder (with a metadata.json) under ``models_dir``."""
    from ..weights import models_dir as shipped

    root = Path(models_dir) if models_dir is not None else shipped()
    if not root.is_dir():
        raise UsageError(f"{root}: models folder not found")
    folders = sorted(p.parent for p in root.glob("*/metadata.json"))
    return [model_summary(f, verify) for f in folders]


def format_text(models: list[dict[str, Any]]) -> str:
    lines = []
    for m in models:
        minutes = m["training_minutes"]
        trained = f"{m['steps']} steps" + (f", {minutes:g} min" if _number(minutes) else "")
        lines.append(f"{m['name']}  ({m['task']}, code {m['code_revision']}, {trained})")
        ok = {True: "  [weights match]", False: "  [WEIGHTS DO NOT MATCH]"}.get(m.get("sha256_ok"), "")
        lines.append(f"  sha256   {m['sha256']}{ok}")
        if m["headline"]:
            text = ", ".join(f"{k} {v:.4g}" for k, v in m["headline"].items())
            lines.append(f"  metrics  {text}" + (f"  ({m['metrics_date']})" if m["metrics_date"] else ""))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def run_models(argv: Sequence[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    models = list_models(Path(args.models_dir) if args.models_dir else None, args.verify)
    if not models:
        raise UsageError("no models found (no */metadata.json in the models folder)")
    sys.stdout.write(json.dumps(models, indent=2) + "\n" if args.json else format_text(models))
    return 1 if any(m.get("sha256_ok") is False for m in models) else 0


def _run(argv: Sequence[str] | None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["-h"], ["--help"]) or not args:
        print(f"usage: {PROG} models [--json] [--verify] [--models-dir DIR]\n\n"
              "Subcommands:\n  models   list the shipped models (see 'synthtools models -h')\n"
              "The tools themselves: synthstrip, synthseg, synthmorph, synthtools-bids, synthgen.")
        return 0 if args else 2
    if args[0] == "models":
        return run_models(args[1:])
    raise UsageError(f"unknown subcommand '{args[0]}' (use: models; see {PROG} -h)")


def run(argv: Sequence[str] | None = None) -> int:
    return entry(PROG, _run, argv)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console entry point ``synthtools``."""
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
