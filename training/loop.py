"""One training loop for every recipe: streaming synthetic batches, bf16
autocast and channels-last on CPU, checkpoints every few minutes and on
SIGTERM/SIGINT, resume from the last checkpoint, a JSON-lines log with loss
and validation metrics, and a PNG plot of both.

A recipe provides: ``build_model()``, ``dataset(start, rank, world)``,
``loss(model, batch) -> tensor``, ``validate(model) -> {name: value}`` and
``metadata()`` (what the exported model needs at inference).

Distributed: started by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``), ``train`` joins the process group (NCCL on CUDA, Gloo on
CPU), wraps the model in DistributedDataParallel and gives every rank its own
sample stream. Rank 0 alone writes the checkpoint, log, plot and runs
validation; every rank resumes from the same checkpoint, and the stop decision
(steps, ``minutes``, SIGTERM/SIGINT) is agreed every step, so all ranks stop
at the same step. One optimizer step sees ``batch x world x grad_accum``
samples (the global batch)."""
from __future__ import annotations

import contextlib
import datetime
import gc
import hashlib
import json
import math
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from synthtools.weights import save_model

from .config import RUN_CONFIG_HEADER, TrainSection


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


class NullLog:
    """What ranks other than 0 keep instead of the log: nothing."""

    rows: list = []

    def add(self, **row: Any) -> None:
        pass

    def last_val(self) -> dict[str, float]:
        return {}


def plot_log(log_path: Path, png: Path) -> None:
    """Loss (raw and smoothed) and validation metrics against steps."""
    import matplotlib   # a dependency: a missing one is an error, never a silently absent PNG
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
        groups = [n for n in names if n.startswith("mean_")]
        for name in names:
            pts = [(s, v[name]) for s, v in vals if name in v]
            if not groups:
                ax[1].plot(*zip(*pts), marker=".", label=name)
            elif name in groups:   # one curve per contrast/site/domain group
                ax[1].plot(*zip(*pts), marker=".", lw=2, label=name[5:])
            else:                  # the cases behind them, faint
                ax[1].plot(*zip(*pts), lw=0.5, color="0.75", zorder=0)
        ax[1].legend(fontsize=6 if not groups else 8, ncol=2)
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


def sanity_dataset(recipe, out: Path, write: bool = True) -> RepeatDataset:
    """Synthesise one sample, write it to ``out`` for inspection, repeat it."""
    import nibabel as nib
    import numpy as np
    sample = recipe.dataset(start=0).sample(stream=0, step=0)
    for key, v in sample.items() if write else ():
        arr = v.float().numpy()
        arr = arr[0] if arr.ndim == 4 else arr
        nib.save(nib.Nifti1Image(arr.astype(np.float32), np.diag([*(recipe.voxsize,) * 3, 1.0])),
                 str(out / f"sanity_{key}.nii.gz"))
    return RepeatDataset(sample)


class EMA:
    """Exponential moving average of a model's weights (decay per step, e.g.
    0.999: a horizon of ~1000 steps). With batch 1 on CPU the raw weights
    jitter from step to step; the average is what we validate and ship."""

    def __init__(self, model: torch.nn.Module, decay: float, state: dict | None = None):
        if not 0 < decay < 1:
            raise ValueError(f"train.ema must be in (0, 1), got {decay}")
        self.decay = decay
        src = state if state is not None else model.state_dict()
        self.state = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                      for k, v in src.items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.state[k].lerp_(v.detach().float(), 1 - self.decay)
            else:
                self.state[k].copy_(v)


OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "cosine", "poly")


def make_optimizer(model: torch.nn.Module, cfg: TrainSection) -> torch.optim.Optimizer:
    """``train.optimizer``: ``adam`` (default; no weight decay) or ``adamw``
    (decoupled ``train.weight_decay``, default 1e-4, on convolution weights
    only: normalisation scales and biases stay free)."""
    kind, lr = cfg.optimizer, cfg.lr
    if kind not in OPTIMIZERS:
        raise ValueError(f"train.optimizer must be one of {OPTIMIZERS}, got {kind!r}")
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    decay = [p for p in model.parameters() if p.ndim > 1]
    free = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": free, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def lr_at(step: int, cfg: TrainSection) -> float:
    """Learning rate of optimizer step ``step`` (0-based): a linear warm-up
    over ``train.warmup`` steps from lr/100, then ``train.schedule``:
    ``constant`` (default), ``cosine`` or ``poly`` (power 0.9, nnU-Net's) from
    ``train.lr`` down to ``train.lr_min`` (default lr/100) at
    ``train.steps``. A function of the step alone, so a resumed run
    continues the same curve."""
    lr, kind, warmup = cfg.lr, cfg.schedule, cfg.warmup
    if kind not in SCHEDULES:
        raise ValueError(f"train.schedule must be one of {SCHEDULES}, got {kind!r}")
    if step < warmup:
        return lr * (0.01 + 0.99 * step / warmup)
    if kind == "constant":
        return lr
    low = cfg.lr_min if cfg.lr_min is not None else lr / 100
    total = cfg.steps
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * t)) if kind == "cosine" else (1 - t) ** 0.9
    return low + (lr - low) * shape


REWARM_STEPS = 200


def rewarm(step: int, since: int | None) -> float:
    """Factor on the learning rate after resuming from a compact checkpoint
    (no optimizer state) at step ``since``: Adam's first steps with fresh
    moments are sign-like, as large as the learning rate on every weight, so
    the rate ramps linearly from 1 % back to the schedule's over
    ``REWARM_STEPS`` steps. 1 when there is nothing to ease in."""
    if since is None or step - since >= REWARM_STEPS:
        return 1.0
    return 0.01 + 0.99 * (step - since) / REWARM_STEPS


def compact_checkpoint(path: str | Path, dtype: torch.dtype = torch.float16) -> dict[str, int]:
    """Rewrite a run's checkpoint in place for committing: weights and their
    average (EMA) in ``dtype``, no optimizer state (a resume rebuilds it and
    re-warms, :func:`rewarm`). Returns the sizes in bytes before and after."""
    path = Path(path)
    before = path.stat().st_size
    state = torch.load(path, map_location="cpu", weights_only=True)

    def small(d: dict) -> dict:
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in d.items()}
    payload = {k: v for k, v in state.items() if k not in ("opt", "model", "ema")}
    payload["model"] = small(state["model"])
    if "ema" in state:
        payload["ema"] = small(state["ema"])
    _save(path, payload)
    return {"before": before, "after": path.stat().st_size}


def _save(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _save_checkpoint(path: Path, model, opt, step: int, seconds: float, ema: EMA | None = None,
                     best: float | None = None) -> None:
    payload = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "seconds": seconds}
    if ema is not None:
        payload["ema"] = ema.state
    if best is not None:
        payload["best"] = best
    _save(path, payload)


def _final_checkpoint(path: Path, model, opt, step: int, seconds: float, ema: EMA | None,
                      best: float | None) -> None:
    """The checkpoint written when a run stops. A scheduler's SIGTERM to the
    whole process group (Slurm's scancel, pkill) also kills the DataLoader
    worker, and torch's SIGCHLD handler then raises inside whatever runs
    next, this save included; the write is atomic, so it is simply retried."""
    for attempt in range(3):
        try:
            _save_checkpoint(path, model, opt, step, seconds, ema, best)
            return
        except RuntimeError as e:
            if "DataLoader worker" not in str(e) or attempt == 2:
                raise


def val_score(metrics: dict[str, float]) -> float | None:
    """One number to rank validations by: the mean over cases (group means
    ``mean_*`` are summaries of the same cases, so they are left out, and so
    is ``consistency_*``, agreement between our own outputs, not accuracy)."""
    if "mean" in metrics:
        return float(metrics["mean"])
    xs = [v for k, v in metrics.items() if not k.startswith(("mean_", "consistency_"))]
    return sum(xs) / len(xs) if xs else None


def checkpoint_state(path: str | Path) -> dict:
    """Weights and step of one checkpoint file (``best.pt``, ``checkpoint.pt``
    or a copy of either): the weight average (EMA) where it holds one."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {"model": state.get("ema", state["model"]), "step": int(state["step"]),
            "seconds": state.get("seconds", 0.0), "score": state.get("score"), "source": Path(path).name}


def shipped_state(run: Path, which: str = "best") -> dict:
    """Weights and step a run would ship: ``best`` (``best.pt``, the best
    validation so far, falling back to the last checkpoint) or ``last``; the
    weight average (EMA) where the run kept one."""
    best = run / "best.pt"
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    if which == "best" and best.exists():
        return checkpoint_state(best)
    return {**checkpoint_state(run / "checkpoint.pt"), "score": None}


@dataclass
class Dist:
    """Where this process sits in a distributed run (world 1: not distributed)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False   # we initialised the process group, so we destroy it

    @property
    def on(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if ``flag`` is true on any rank (one all_reduce)."""
        if not self.on:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)


def setup_distributed(device_name: str, timeout_minutes: float = 30.0) -> Dist:
    """Join the process group torchrun describes in the environment
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``);
    a plain process (no ``WORLD_SIZE`` or 1) stays single-process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return Dist()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        cuda = torch.device(device_name).type == "cuda"
        if cuda:
            torch.cuda.set_device(local_rank)
        # Ranks wait for rank 0 while it validates or checkpoints: a generous timeout.
        dist.init_process_group(backend="nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
        owns = True
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, owns_group=owns)


def state_digest(model: torch.nn.Module | dict) -> str:
    """sha256 of a model's state dict (names, dtypes, shapes and values, in
    name order): equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    for name, v in sorted(state.items()):
        v = v.detach().cpu().contiguous()
        h.update(f"{name}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def init_file(name: str) -> Path:
    """``train.init``: a checkpoint/weights file, or a model folder or shipped
    model name (its weights file), so a config can say ``init = "synthstrip"``."""
    p = Path(name)
    if p.is_file():
        return p
    from synthtools.weights import ModelError, read_metadata, resolve
    try:
        folder = resolve(name)
    except ModelError:
        raise FileNotFoundError(f"train.init = {name!r}: no such file or model") from None
    return folder / read_metadata(folder).get("weights", "weights.pt")


def load_init(model: torch.nn.Module, weights: dict[str, torch.Tensor], partial: bool = False,
              widen: bool = False) -> list[str]:
    """Start ``model`` from ``weights``. ``partial`` (transfer from another
    task, e.g. a skull-stripper's encoder for segmentation): copy every tensor
    whose name and shape match and keep the new model's own initialisation for
    the rest (typically the output head); returns the names kept new.
    ``widen``: ``model`` is a wider U-Net than the one of ``weights``; embed
    them so that it starts computing exactly the same output
    (:mod:`synthtools.training.widen`). A 2.5D network (``recipe.slab``)
    starts from a single-slice one's weights, embedded so that it computes
    the same output (``embed_slab_input``). Otherwise any mismatch is an
    error, so a wrong file cannot slip through."""
    arch = getattr(model, "config", {})
    first = weights.get("down.0.0.weight")
    if arch.get("ndim") == 2 and arch.get("in_channels", 1) > 1 and first is not None and first.shape[1] == 1:
        from .widen import embed_slab_input   # a 2.5D network from a single-slice one
        weights = embed_slab_input(weights, arch["in_channels"])
    if widen:
        from .widen import widen_unet_state
        if partial:
            raise ValueError("train.init_widen and train.init_partial do not combine")
        if arch.get("norm") not in (None, "instance"):
            raise ValueError(f"train.init_widen embeds plain or instance-norm U-Nets, not {arch['norm']!r} ones")
        model.load_state_dict(widen_unet_state(weights, model.state_dict(), arch["in_channels"],
                                               arch["out_channels"]))
        return []
    if not partial:
        model.load_state_dict({k: v.float() for k, v in weights.items()})
        return []
    own = model.state_dict()
    take = {k: v.float() for k, v in weights.items() if k in own and own[k].shape == v.shape}
    if not take:
        raise ValueError("train.init_partial: no tensor of the init file matches this model")
    model.load_state_dict(take, strict=False)
    return sorted(set(own) - set(take))


def train(recipe, out_dir: str | Path, steps: int | None = None, minutes: float | None = None,
          log=print, sanity: bool = False, check: bool = True) -> dict[str, Any]:
    """Train ``recipe`` into ``out_dir`` until ``steps`` total steps or
    ``minutes`` of wall time; resumes from ``out_dir/checkpoint.pt``.
    ``sanity``: train on one fixed synthetic sample (written to out_dir).
    Under ``torchrun`` every rank calls this; see the module docstring."""
    cfg = recipe.cfg.train
    ddp = setup_distributed(cfg.device, cfg.dist_timeout_minutes)
    ok = False
    try:
        result = _train(recipe, cfg, Path(out_dir), steps, minutes, log, sanity, check, ddp)
        ok = True
        return result
    finally:
        if ddp.owns_group:
            # Gloo aborts a process ("terminate called without an active
            # exception") when its process group dies while the DDP reducer
            # still holds it, or while a peer has already torn its side down.
            # So: free DDP first (it sits in reference cycles), let every rank
            # arrive, then destroy. After a failure a barrier could hang on the
            # rank that died, so destroy directly.
            gc.collect()
            if ok:
                dist.barrier()
            dist.destroy_process_group()


RUN_CONFIG = "config.toml"


def save_run_config(recipe, out: Path) -> None:
    """The run's effective config (file plus ``--set`` overrides) as
    ``RUN_CONFIG`` in the run folder, so ``synthgen burst`` and ``export``
    can take the run alone. ``train.device`` is the machine's, not the
    run's: it is left out, so a run resumed elsewhere starts on the CPU.
    The config file's leading comment (``Config.note``) is kept under the
    header line."""
    from .presets import dump_toml
    tables = recipe.cfg.to_dict()
    tables.get("train", {}).pop("device", None)
    tmp = out / (RUN_CONFIG + ".tmp")
    note = recipe.cfg.note
    tmp.write_text(dump_toml(tables, RUN_CONFIG_HEADER + (f"\n\n{note}" if note else "")))
    os.replace(tmp, out / RUN_CONFIG)


def thread_governor(cfg: TrainSection, device: torch.device):
    """A :class:`synthtools.threads.ThreadGovernor` for a CPU run with
    ``train.load_aware`` (default true; ``SYNTHTOOLS_LOAD_AWARE=0`` also
    turns it off): ``train.threads`` is the most it uses, fewer while other
    processes keep CPUs busy (checked every minute)."""
    from synthtools.threads import ThreadGovernor, granted_threads
    if device.type != "cpu" or not cfg.load_aware or os.environ.get("SYNTHTOOLS_LOAD_AWARE", "1") == "0":
        return None
    most = min(cfg.threads, granted_threads())
    return ThreadGovernor(most) if most > 1 else None


def _train(recipe, cfg: TrainSection, out: Path, steps, minutes, log, sanity, check, ddp: Dist) -> dict[str, Any]:
    if not ddp.main:
        log = lambda *a, **k: None  # noqa: E731  (rank 0 speaks for the run)
    out.mkdir(parents=True, exist_ok=True)
    if ddp.main and not sanity:
        save_run_config(recipe, out)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    governor = thread_governor(cfg, device)
    if governor is not None:
        torch.set_num_threads(governor.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device = 'cuda' but torch sees no CUDA GPU")
    if device.type == "cuda" and ddp.on:
        device = torch.device("cuda", ddp.local_rank)
    model = recipe.build_model().to(device)
    channels_last = cfg.channels_last and getattr(model, "ndim", 3) == 3
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    opt = make_optimizer(model, cfg)
    ckpt = out / "checkpoint.pt"
    step, seconds, state = 0, 0.0, {}
    rewarm_from = None
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state["model"].items()})
        step, seconds = int(state["step"]), float(state.get("seconds", 0.0))
        if "opt" in state:
            opt.load_state_dict(state["opt"])   # its lr is reset by the schedule every step
        else:   # a compact checkpoint: fresh Adam moments, eased in by a short re-warm-up
            rewarm_from = step
        log(f"resumed from {ckpt} at step {step}" + ("" if "opt" in state else " (compact: optimizer state rebuilt)"))
    elif cfg.init:
        init = torch.load(init_file(cfg.init), map_location="cpu", weights_only=True)
        # train.init_into: a submodule that has the init's layout (e.g. a
        # registration network's feature U-Net "unet" from a segmenter).
        target = model.get_submodule(cfg.init_into) if cfg.init_into else model
        skipped = load_init(target, init.get("model", init), partial=cfg.init_partial, widen=cfg.init_widen)
        log(f"initialised from {cfg.init}" + (f" (kept new: {', '.join(skipped)})" if skipped else ""))
    if ddp.on:
        # Every rank must have read the same checkpoint (RUN on a shared file system).
        t = torch.tensor([step, -step], device=device, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if int(t[0]) != -int(t[1]):
            raise RuntimeError(f"ranks resumed from different steps ({-int(t[1])}..{int(t[0])}): "
                               f"{out} must be on a file system every node sees")
    decay = cfg.ema
    # A run that starts averaging late (or an old checkpoint) starts from its weights.
    ema = EMA(model, decay, state.get("ema")) if decay else None
    best = {"score": state.get("best")}
    history = Log(out / "log.jsonl", step) if ddp.main else NullLog()
    total = steps if steps is not None else cfg.steps
    deadline = time.time() + 60 * minutes if minutes else math.inf
    every = 60 * cfg.checkpoint_minutes
    accum = cfg.grad_accum
    if accum < 1:
        raise ValueError(f"train.grad_accum must be >= 1, got {accum}")
    clip = cfg.clip_grad   # max gradient norm; 0: no clipping
    stop = {"flag": False}

    def on_signal(signum, frame):
        stop["flag"] = True
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if check and not sanity:
            # Rank 0 checks the generator; every rank stops on its verdict.
            problem = None
            if ddp.main:
                try:
                    preflight(recipe)
                except GeneratorCheckError as e:
                    problem = str(e)
            if ddp.on:
                box = [problem]
                dist.broadcast_object_list(box, src=0)
                problem = box[0]
            if problem:
                raise GeneratorCheckError(problem)
        # On a GPU the generator runs in the main process on the GPU (no workers):
        # synthesis there is cheap next to the copies it would otherwise need.
        workers = 0 if sanity or device.type == "cuda" else cfg.workers
        batch_size = cfg.batch
        if sanity:
            dataset = sanity_dataset(recipe, out, write=ddp.main)
        else:
            dataset = recipe.dataset(start=step, rank=ddp.rank, world=ddp.world)
        if hasattr(dataset, "per_step"):   # number the samples by training step (exact resume)
            dataset.batch, dataset.per_step = batch_size, accum
        if device.type == "cuda" and hasattr(dataset, "device"):
            dataset.device = device
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                            persistent_workers=workers > 0)
        net = model
        if ddp.on:
            from torch.nn.parallel import DistributedDataParallel
            net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        bf16 = cfg.bf16
        log_every, val_every = cfg.log_every, cfg.val_every
        last_ckpt, t_start, running = time.time(), time.time(), []
        model.train()
        batches = iter(loader)
        try:
            while True:
                if step >= total or ddp.any(time.time() > deadline or stop["flag"], device):
                    break
                t0 = time.time()
                for group in opt.param_groups:   # the config's schedule, never the saved lr
                    group["lr"] = lr_at(step, cfg) * rewarm(step, rewarm_from)
                opt.zero_grad(set_to_none=True)
                loss_sum, bad = 0.0, False
                for micro in range(accum):
                    batch = next(batches)
                    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                    if channels_last:
                        batch = {k: v.contiguous(memory_format=torch.channels_last_3d) if v.ndim == 5 else v
                                 for k, v in batch.items()}
                    # DDP all-reduces gradients on the last micro-step only.
                    sync = micro == accum - 1 or not ddp.on
                    with contextlib.nullcontext() if sync else net.no_sync():
                        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                            loss = recipe.loss(net, batch)
                        finite = bool(torch.isfinite(loss))
                        if not finite and not ddp.on:
                            raise FloatingPointError(
                                f"non-finite loss at step {step}: check the generator settings")
                        bad |= not finite
                        (loss / accum if accum > 1 else loss).backward()
                    loss_sum += float(loss.detach())
                # Agreed before the optimizer step, so no rank steps on NaN gradients.
                if ddp.on and ddp.any(bad, device):
                    raise FloatingPointError(f"non-finite loss at step {step} (on some rank): "
                                             "check the generator settings")
                if clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                opt.step()
                if ema is not None:
                    ema.update(model)
                step += 1
                seconds += time.time() - t0
                running.append(loss_sum / accum)
                if governor is not None and governor() is not None:
                    log(f"step {step}: {governor.threads} thread(s), other processes busy")
                if step % log_every == 0:
                    mean = sum(running) / len(running)
                    if ddp.on:   # the global batch's loss: mean over ranks
                        t = torch.tensor([mean], device=device, dtype=torch.float64)
                        dist.all_reduce(t)
                        mean = float(t) / ddp.world
                    history.add(step=step, time=round(time.time() - t_start, 1), loss=mean, lr=float(f"{opt.param_groups[0]['lr']:.3g}"),
                                threads=torch.get_num_threads())
                    running = []
                if ddp.main and val_every and step % val_every == 0:
                    _validate_and_keep_best(recipe, model, ema, history, step, seconds, best, out, log)
                if ddp.main and time.time() - last_ckpt > every:
                    _save_checkpoint(ckpt, model, opt, step, seconds, ema, best["score"])
                    plot_log(out / "log.jsonl", out / "log.png")
                    last_ckpt = time.time()
        except RuntimeError as e:
            # Schedulers signal the whole process group: the DataLoader workers
            # die with the main process's SIGTERM. That is a normal stop.
            if not (stop["flag"] and "DataLoader worker" in str(e)):
                raise
            log(f"stopping on signal at step {step}")
        finally:
            if ddp.main:
                _final_checkpoint(ckpt, model, opt, step, seconds, ema, best["score"])
        del net, batches, loader   # DDP and the workers go now, not at interpreter exit
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if cfg.debug_rank_digests:
        (out / f"rank{ddp.rank}.digest.json").write_text(json.dumps(
            {"rank": ddp.rank, "world": ddp.world, "step": step, "sha256": state_digest(model)}) + "\n")
    if ddp.main:
        plot_log(out / "log.jsonl", out / "log.png")
    if ddp.on:
        dist.barrier()   # the checkpoint is written when train() returns, on every rank
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


def _validate_and_keep_best(recipe, model, ema: EMA | None, history: Log, step: int, seconds: float,
                            best: dict, out: Path, log) -> None:
    """Validate the weights we would ship (the EMA when kept) and save them
    to ``best.pt`` when they beat every earlier validation of the run."""
    net = model
    if ema is not None:
        net = recipe.build_model()
        net.load_state_dict(ema.state)
    metrics = _validate(recipe, net, history, step, log)
    score = val_score(metrics)
    # Dice: higher is better; registration error (mm): lower is better.
    sign = 1.0 if getattr(recipe, "higher_is_better", True) else -1.0
    if score is not None and (best["score"] is None or sign * score > sign * best["score"]):
        best["score"] = score
        weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
        _save(out / "best.pt", {"model": weights, "step": step, "seconds": seconds, "score": score})
        log(f"step {step}: best validation so far ({score:.4f}), saved best.pt")


def _add_lineage(meta: dict[str, Any], path: Path) -> None:
    """A run continued from other runs' weights (a pilot arm, an earlier run
    whose checkpoint was copied) lists them in ``lineage.json``:
    ``{"runs": [{"run": ..., "steps": N, "minutes": M}, ...], "init": ..., "note": ...}``.
    Their steps and minutes are added to this run's, so ``steps`` in the
    metadata counts every training step behind the weights."""
    if not path.is_file():
        return
    lineage = json.loads(path.read_text())
    runs = lineage.get("runs", [])
    try:
        steps = sum(int(r["steps"]) for r in runs)
        minutes = sum(float(r["minutes"]) for r in runs)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: every run needs 'steps' and 'minutes' ({e})") from None
    meta["run_steps"] = meta["steps"]
    meta["steps"] += steps
    meta["training_minutes"] = round(meta["training_minutes"] + minutes, 1)
    meta["lineage"] = lineage
    if "init" in lineage:   # where the chain began (the config's train.init is not this run's start)
        meta["init"] = lineage["init"]


def average_weights(own: dict, other: dict, other_weight: float) -> dict:
    """(1 - w) * own + w * other, tensor by tensor, in float32 (a "model soup").
    Meaningful only for two points of one training lineage (same
    architecture, weights that never left a common basin)."""
    if not 0.0 <= other_weight <= 1.0:
        raise ValueError(f"averaging weight must be in [0, 1], got {other_weight}")
    if set(own) != set(other):
        raise ValueError("cannot average: the two state dicts have different keys")
    out = {}
    for k, a in own.items():
        b = other[k]
        if a.shape != b.shape:
            raise ValueError(f"cannot average: {k} has shape {tuple(a.shape)} vs {tuple(b.shape)}")
        out[k] = ((1 - other_weight) * a.float() + other_weight * b.float()).to(a.dtype) \
            if a.is_floating_point() else a
    return out


def export(recipe, out_dir: str | Path, dest: str | Path, name: str, which: str = "best",
           average: str | Path | None = None, average_weight: float = 0.5,
           atlases_from: str | Path | None = None) -> Path:
    """Write shipped weights (fp16, no optimizer) + metadata from a run:
    ``which`` = ``best`` (best validation, else last) or ``last``. With
    ``average`` (a checkpoint file: best.pt / checkpoint.pt of a run of the
    same lineage), ship ``(1 - average_weight) * run + average_weight * it``.
    ``atlases_from`` (a model name or folder): copy its segmentation atlases
    and their metadata, so the exported model runs the whole pipeline."""
    out = Path(out_dir)
    state = shipped_state(out, which)
    model = recipe.build_model()
    log_file = out / "log.jsonl"
    rows = [json.loads(x) for x in log_file.read_text().splitlines() if x.strip()] if log_file.exists() else []
    vals = [r["val"] for r in rows if "val" in r and r["step"] == state["step"]]
    soup = None
    if average:
        other = checkpoint_state(average)
        state["model"] = average_weights(state["model"], other["model"], average_weight)
        soup = {"checkpoint": str(average), "step": other["step"], "weight": average_weight}
        vals = []   # the logged validation was of the run's own weights, not of the average
    model.load_state_dict(state["model"])
    meta = recipe.metadata()
    meta.update(name=name, steps=state["step"], training_minutes=round(state["seconds"] / 60, 1),
                code_revision=code_revision(), validation=vals[-1] if vals else {}, recipe=recipe.name,
                weights_from=state["source"], config=recipe.cfg.to_dict())
    t = recipe.cfg.train
    if t.init:   # what this run started from: a model (its metadata) or a checkpoint (its step)
        path = init_file(t.init)
        meta["init"] = {"from": t.init, "partial": t.init_partial}
        if t.init_into:
            meta["init"]["into"] = t.init_into
        if t.init_widen:
            meta["init"]["widened"] = True
        if (path.parent / "metadata.json").is_file():
            src = json.loads((path.parent / "metadata.json").read_text())
            meta["init"].update(steps=int(src.get("steps", 0)), sha256=src.get("sha256"))
        else:
            before = torch.load(path, map_location="cpu", weights_only=True)
            meta["init"]["steps"] = int(before.get("step", 0)) if isinstance(before, dict) else 0
    if soup:
        meta["averaged_with"] = soup
    _add_lineage(meta, out / "lineage.json")
    if atlases_from:
        from .atlases import copy_atlases
        meta["atlas"] = copy_atlases(atlases_from, Path(dest), meta["output"].get("labels", []))
    folder = save_model(model, meta, dest)
    # The training record travels with the weights in the repository (loss +
    # validation curves); the wheel leaves these logs out (pyproject package-data).
    plot_log(out / "log.jsonl", out / "log.png")
    for src, name in ((out / "log.jsonl", "training_log.jsonl"), (out / "log.png", "training_log.png")):
        if src.exists():
            (folder / name).write_bytes(src.read_bytes())
    return folder
