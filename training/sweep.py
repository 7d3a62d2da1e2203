"""Randomization-range sweeps (the paper's grid search): fix every generator
setting but one, train one short run per value -- each warm-started from the
same weights -- and compare validation Dice on real scans per case group.

  DIR/NN_<value>/       one run folder per value (checkpoint, log, val.json);
                        rerunning the sweep resumes / reuses them
  DIR/sweep.md          table: value x group mean Dice
  DIR/sweep.json        every metric of every value
  DIR/sweep.png         validation Dice vs value, one line per group
"""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch


def parse_value(text: str) -> Any:
    """A value as written on the command line: Python/TOML-like literal
    (``[0, 0.1]``, ``0.5``, ``true``) or a bare string."""
    t = text.strip()
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        v = ast.literal_eval(t)
    except (ValueError, SyntaxError):
        return t
    return list(v) if isinstance(v, tuple) else v


def _slug(value: Any) -> str:
    s = re.sub(r"[^0-9A-Za-z.+-]+", "_", json.dumps(value)).strip("_")
    return s[:40] or "value"


def resolve_init(path: str | Path) -> Path:
    """A checkpoint file, a run folder (its checkpoint.pt) or a model folder
    (its weights.pt)."""
    p = Path(path)
    if p.is_dir():
        for name in ("checkpoint.pt", "weights.pt"):
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"{path}: no checkpoint.pt or weights.pt in this folder")
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    return p


def evaluate_run(recipe, run: Path) -> dict[str, float]:
    """Validation metrics of a run folder's checkpoint."""
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    net = recipe.build_model()
    net.load_state_dict(state["model"])
    net.eval()
    with torch.no_grad():
        metrics = recipe.validate(net)
    return {k: round(float(v), 4) for k, v in metrics.items()}


def run_sweep(config: str | Path, param: str, values: Sequence[Any], out: str | Path, steps: int,
              init: str | Path | None = None, overrides: dict[str, Any] | None = None,
              all_cases: bool = False, log: Callable = print) -> list[dict[str, Any]]:
    """Train ``steps`` steps per value of ``param`` (a dotted config key) from
    the same ``init`` weights, validate each, write the summary files."""
    from .loop import train
    from .recipes import get_recipe, load_config
    init_path = str(resolve_init(init)) if init else None
    fixed: dict[str, Any] = {"train.val_every": 0}   # scored once, after training
    if init_path:
        fixed["train.init"] = init_path
    if all_cases:
        fixed["validation.cases"] = None
    # Every value is checked against the schema before the first run starts.
    cfgs = [load_config(config, {**(overrides or {}), param: value, **fixed}) for value in values]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for k, (value, cfg) in enumerate(zip(values, cfgs)):
        recipe = get_recipe(cfg)
        run = out / f"{k:02d}_{_slug(value)}"
        log(f"[{k + 1}/{len(values)}] {param} = {json.dumps(value)} -> {run}")
        train(recipe, run, steps=steps, log=log)
        metrics = evaluate_run(recipe, run)
        (run / "val.json").write_text(json.dumps({"param": param, "value": value, "val": metrics}, indent=1) + "\n")
        results.append({"value": value, "run": run.name, "val": metrics})
    write_summary(results, param, out, steps=steps, init=init_path, config=str(config))
    return results


def _groups(results) -> list[str]:
    return sorted({k for r in results for k in r["val"] if k.startswith("mean_")})


def write_summary(results: list[dict[str, Any]], param: str, out: Path, **info: Any) -> None:
    groups = _groups(results)
    (out / "sweep.json").write_text(json.dumps({"param": param, **info, "results": results}, indent=1) + "\n")
    head = ["value", *[g[5:] for g in groups], "mean", "run"]
    lines = [f"# Sweep of `{param}`", "",
             "; ".join(f"{k}: {v}" for k, v in info.items() if v is not None), "",
             "Validation Dice per case group (mean over the group's cases); mean: over groups.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        vals = [r["val"].get(g) for g in groups]
        present = [v for v in vals if v is not None]
        mean = f"{np.mean(present):.3f}" if present else "-"
        cells = [json.dumps(r["value"]), *[f"{v:.3f}" if v is not None else "-" for v in vals], mean, r["run"]]
        lines.append("| " + " | ".join(cells) + " |")
    if not groups:
        lines += ["", "No validation metrics: no validation case or real pair was available."]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    plot_sweep(results, param, out / "sweep.png")


def plot_sweep(results: list[dict[str, Any]], param: str, png: Path) -> None:
    """Dice vs value, one line per group (numbers on a numeric axis, other
    values such as ranges as categories in the given order)."""
    import matplotlib   # a dependency: a missing one is an error, never a silently absent PNG
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    values = [r["value"] for r in results]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    x = values if numeric else list(range(len(values)))
    fig, ax = plt.subplots(figsize=(6, 4))
    for g in _groups(results):
        pts = [(xi, r["val"][g]) for xi, r in zip(x, results) if g in r["val"]]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=g[5:])
    if not numeric:
        ax.set_xticks(x)
        ax.set_xticklabels([json.dumps(v) for v in values], rotation=20, fontsize=8)
    ax.set(xlabel=param, ylabel="validation Dice", title=f"sweep: {param}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
