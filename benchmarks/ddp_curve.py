"""Distributed training check: the loss curve of a 2-process CPU run
(``torchrun``, Gloo, batch 1 per rank) against a 1-process run with the
same global batch (batch 2), same recipe, config and steps.

    python benchmarks/ddp_curve.py [--steps 300] [--out benchmarks/results]

Writes ``ddp_curve.md`` (final smoothed losses, wall times) and
``ddp_curve.png`` (both curves, raw and smoothed). Samples differ between
the two runs (every rank draws its own stream), so the curves agree in
trend and level, not step by step."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from benchmarks.machine import child_env  # noqa: E402

# The skull-stripping recipe at pilot size (4 mm, 48^3 crops, a small U-Net),
# so a few hundred steps take minutes on two cores.
OVERRIDES = ["recipe.voxsize=4.0", "recipe.shape=[48,48,48]", "model.features=[8,16,32]",
             "train.workers=0", "train.val_every=0", "train.log_every=10", "train.lr=1e-3", "train.ema=0"]


def run(cmd: list[str], threads: int) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=child_env(threads), check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def losses(folder: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (folder / "log.jsonl").read_text().splitlines() if x.strip()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def smooth(values: list[float], k: int = 5) -> list[float]:
    return [sum(values[max(0, i - k + 1):i + 1]) / len(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    train = ["-m", "synthtools.training.cli", "train", "skullstrip", "--steps", str(a.steps), "--set", *OVERRIDES]
    with tempfile.TemporaryDirectory() as tmp:
        one, two = Path(tmp) / "one", Path(tmp) / "two"
        wall_one = run([sys.executable, *train[:4], "-o", str(one), *train[4:], "train.batch=2", "train.threads=2"], 2)
        wall_two = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        *train[:4], "-o", str(two), *train[4:], "train.batch=1", "train.threads=1"], 1)
        curves = {"1 process, batch 2": losses(one), "2 processes (torchrun, Gloo), batch 1 each": losses(two)}
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    final = {}
    for (name, pts), color in zip(curves.items(), ("C0", "C1")):
        s, l = zip(*pts)
        sm = smooth(list(l))
        ax.plot(s, l, color=color, lw=0.5, alpha=0.4)
        ax.plot(s, sm, color=color, lw=2, label=name)
        final[name] = (sm[-1], sum(l[: max(1, len(l) // 10)]) / max(1, len(l) // 10))
    ax.set(xlabel="step (global batch 2)", ylabel="training loss (MSE, mm^2)", yscale="log",
           title="skull-stripping recipe, 4 mm pilot size")
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.out / "ddp_curve.png", dpi=90)
    md = ["# Distributed vs single-process training", "",
          f"`python benchmarks/ddp_curve.py --steps {a.steps}`: skullstrip recipe at pilot size "
          f"({' '.join(OVERRIDES)}), same seed and global batch 2. Curves: `ddp_curve.png`. "
          f"Load average when started: {load:.1f} on {os.cpu_count()} CPUs.", "",
          "| run | first 10% mean loss | final loss (mean of last 5 logs) | wall (s) |", "|---|---:|---:|---:|"]
    for (name, (last, first)), wall in zip(final.items(), (wall_one, wall_two)):
        md.append(f"| {name} | {first:.3f} | {last:.3f} | {wall:.0f} |")
    (a.out / "ddp_curve.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
