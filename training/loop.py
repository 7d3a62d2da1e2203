"""One training loop for every recipe: streaming synthetic batches, bf16
autocast and channels-last on CPU, checkpoints every few minutes and on
SIGTERM/SIGINT, resume from the last checkpoint, a JSON-lines log with loss
and validation metrics, and a PNG plot of both.

A recipe provides: ``build_model()``, ``dataset(start, rank, world)``,
``loss(model, batch) -> tensor``, ``validate(model) -> {name: value}`` and
``metadata()`` (what the exported model needs at inference)."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from synthtools.weights import save_model


def code_revision() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Log:
    """Append-only JSON lines: {"step", "time", "loss"} or {"step", "val": {...}}."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        rows = []
        if path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            rows = [r for r in rows if r["step"] <= resume_step]  # drop what the crash lost
        self.rows = rows
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def add(self, **row: Any) -> None:
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def last_val(self) -> dict[str, float]:
        vals = [r["val"] for r in self.rows if "val" in r]
        return vals[-1] if vals else {}


def plot_log(log_path: Path, png: Path) -> None:
    """Loss (raw and smoothed) and validation metrics against steps."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()]
    loss = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    vals = [(r["step"], r["val"]) for r in rows if "val" in r]
    fig, ax = plt.subplots(1, 2, figsize=(12, 4))
    if loss:
        s, l = zip(*loss)
        ax[0].plot(s, l, lw=0.5, alpha=0.4)
        k = max(1, len(l) // 50)
        sm = [sum(l[max(0, i - k):i + 1]) / len(l[max(0, i - k):i + 1]) for i in range(len(l))]
        ax[0].plot(s, sm, lw=1.5)
        ax[0].set_yscale("log")
    ax[0].set(xlabel="step", ylabel="training loss", title="loss")
    if vals:
        names = sorted({k for _, v in vals for k in v})
        for name in names:
            pts = [(s, v[name]) for s, v in vals if name in v]
            ax[1].plot(*zip(*pts), marker=".", label=name)
        ax[1].legend(fontsize=6, ncol=2)
    ax[1].set(xlabel="step", ylabel="validation", title="real validation cases")
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


class GeneratorCheckError(RuntimeError):
    """The generator produces samples no network should train on."""


def preflight(recipe, n: int = 4, seed: int = 12345) -> None:
    """Draw ``n`` samples and stop with a clear message on the paper's
    failure modes: NaNs, all-zero or constant images, targets that lost the
    anatomy (moved out of the FOV or cropped away)."""
    from training.generator.synth import generator
    ds = recipe.dataset(start=0)
    problems = []
    for k in range(n):
        sample = ds.sample(stream=10_000 + k, step=seed)
        for key, v in sample.items():
            if v.is_floating_point() and not torch.isfinite(v).all():
                problems.append(f"sample {k}: {key} has NaN/Inf values")
        img = sample["image"]
        if float(img.abs().max()) == 0:
            problems.append(f"sample {k}: image is all zero")
        elif float(img.std()) < 1e-4:
            problems.append(f"sample {k}: image is constant")
        check = getattr(recipe, "sample_problems", None)
        problems += [f"sample {k}: {p}" for p in (check(sample) if check else [])]
    if len(problems) > n // 2:  # an occasional empty crop is fine, a pattern is not
        raise GeneratorCheckError("generator check failed: " + "; ".join(problems[:4]))


class RepeatDataset(torch.utils.data.IterableDataset):
    """One fixed sample forever: the paper's sanity check (loss must reach ~0)."""

    def __init__(self, sample: dict):
        self.sample = sample

    def __iter__(self):
        while True:
            yield self.sample


def sanity_dataset(recipe, out: Path) -> RepeatDataset:
    """Synthesise one sample, write it to ``out`` for inspection, repeat it."""
    import nibabel as nib
    import numpy as np
    sample = recipe.dataset(start=0).sample(stream=0, step=0)
    for key, v in sample.items():
        arr = v.float().numpy()
        arr = arr[0] if arr.ndim == 4 else arr
        nib.save(nib.Nifti1Image(arr.astype(np.float32), np.diag([*(recipe.voxsize,) * 3, 1.0])),
                 str(out / f"sanity_{key}.nii.gz"))
    return RepeatDataset(sample)


def _save_checkpoint(path: Path, model, opt, step: int, seconds: float) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "seconds": seconds}, tmp)
    os.replace(tmp, path)


def train(recipe, out_dir: str | Path, steps: int | None = None, minutes: float | None = None,
          log=print, sanity: bool = False, check: bool = True) -> dict[str, Any]:
    """Train ``recipe`` into ``out_dir`` until ``steps`` total steps or
    ``minutes`` of wall time; resumes from ``out_dir/checkpoint.pt``.
    ``sanity``: train on one fixed synthetic sample (written to out_dir)."""
    cfg = recipe.cfg["train"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(cfg.get("threads", 2)))
    torch.manual_seed(int(cfg.get("seed", 0)))
    device = torch.device(cfg.get("device", "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device = 'cuda' but torch sees no CUDA GPU")
    model = recipe.build_model().to(device)
    channels_last = bool(cfg.get("channels_last", True)) and getattr(model, "ndim", 3) == 3
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    opt = torch.optim.Adam(model.parameters(), lr=float(cfg.get("lr", 1e-4)))
    ckpt = out / "checkpoint.pt"
    step, seconds = 0, 0.0
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, seconds = int(state["step"]), float(state.get("seconds", 0.0))
        log(f"resumed from {ckpt} at step {step}")
    elif cfg.get("init"):
        init = torch.load(cfg["init"], map_location="cpu", weights_only=True)
        model.load_state_dict({k: v.float() for k, v in init.get("model", init).items()})
        log(f"initialised from {cfg['init']}")
    history = Log(out / "log.jsonl", step)
    total = steps if steps is not None else int(cfg.get("steps", 10_000))
    deadline = time.time() + 60 * minutes if minutes else math.inf
    every = 60 * float(cfg.get("checkpoint_minutes", 10))
    stop = {"flag": False}

    def on_signal(signum, frame):
        stop["flag"] = True
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    if check and not sanity:
        preflight(recipe)
    # On a GPU the generator runs in the main process on the GPU (no workers):
    # synthesis there is cheap next to the copies it would otherwise need.
    workers = 0 if sanity or device.type == "cuda" else int(cfg.get("workers", 1))
    dataset = sanity_dataset(recipe, out) if sanity else recipe.dataset(start=step)
    if device.type == "cuda" and hasattr(dataset, "device"):
        dataset.device = device
    loader = DataLoader(dataset, batch_size=int(cfg.get("batch", 1)), num_workers=workers,
                        persistent_workers=workers > 0)
    bf16 = bool(cfg.get("bf16", True))
    log_every, val_every = int(cfg.get("log_every", 10)), int(cfg.get("val_every", 500))
    last_ckpt, t_start, running = time.time(), time.time(), []
    model.train()
    try:
        for batch in loader:
            if step >= total or time.time() > deadline or stop["flag"]:
                break
            t0 = time.time()
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            if channels_last:
                batch = {k: v.contiguous(memory_format=torch.channels_last_3d) if v.ndim == 5 else v
                         for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = recipe.loss(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at step {step}: check the generator settings")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            seconds += time.time() - t0
            running.append(float(loss.detach()))
            if step % log_every == 0:
                history.add(step=step, time=round(time.time() - t_start, 1), loss=sum(running) / len(running))
                running = []
            if val_every and step % val_every == 0:
                _validate(recipe, model, history, step, log)
            if time.time() - last_ckpt > every:
                _save_checkpoint(ckpt, model, opt, step, seconds)
                plot_log(out / "log.jsonl", out / "log.png")
                last_ckpt = time.time()
    finally:
        _save_checkpoint(ckpt, model, opt, step, seconds)
        for s, h in old.items():
            signal.signal(s, h)
    plot_log(out / "log.jsonl", out / "log.png")
    log(f"stopped at step {step} ({seconds / 60:.1f} min of training steps)")
    return {"step": step, "seconds": seconds, "val": history.last_val()}


def _validate(recipe, model, history: Log, step: int, log) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        metrics = recipe.validate(model)
    model.train()
    if metrics:
        history.add(step=step, val={k: round(v, 4) for k, v in metrics.items()})
        log(f"step {step} val " + " ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    return metrics


def export(recipe, out_dir: str | Path, dest: str | Path, name: str) -> Path:
    """Write shipped weights (fp16, no optimizer) + metadata from the checkpoint."""
    out = Path(out_dir)
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    model = recipe.build_model()
    model.load_state_dict(state["model"])
    history = Log(out / "log.jsonl", int(state["step"]))
    meta = recipe.metadata()
    meta.update(name=name, steps=int(state["step"]), training_minutes=round(state.get("seconds", 0) / 60, 1),
                code_revision=code_revision(), validation=history.last_val(), recipe=recipe.name,
                config=recipe.cfg)
    folder = save_model(model, meta, dest)
    # The training record travels with the weights: loss + validation curves.
    plot_log(out / "log.jsonl", out / "log.png")
    for src, name in ((out / "log.jsonl", "training_log.jsonl"), (out / "log.png", "training_log.png")):
        if src.exists():
            (folder / name).write_bytes(src.read_bytes())
    return folder
