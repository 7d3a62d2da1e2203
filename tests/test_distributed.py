"""Distributed training: two Gloo ranks under torchrun train a tiny recipe in
lockstep (identical weights on both ranks), checkpoint once, and resume; the
sample numbering behind the per-rank streams; gradient accumulation."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from synthtools.training.generator.dataset import LabelMapDataset
from synthtools.training.loop import state_digest, train
from synthtools.training.recipes import get_recipe, load_config

from conftest import write_label_map  # noqa: E402  (tests/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]

needs_dist = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with Gloo is not available")


TINY_TOML = """\
[recipe]
name = "skullstrip"
voxsize = 8.0
shape = [16, 16, 16]

[model]
features = [4, 8]
convs = 1

[train]
label_maps = "{maps}"
workers = 0
val_every = 0
log_every = 1
threads = 1
bf16 = true
grad_accum = 2
seed = 0
debug_rank_digests = true

[validation]
cases = []
"""


def torchrun(config: Path, run: Path, steps: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "synthtools.training.cli", "train", str(config), "-o", str(run), "--steps", str(steps)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def digests(run: Path) -> list[dict]:
    return [json.loads((run / f"rank{r}.digest.json").read_text()) for r in range(2)]


@needs_dist
def test_torchrun_two_ranks_lockstep_and_resume(tmp_path):
    maps = tmp_path / "maps"
    maps.mkdir()
    write_label_map(maps / "a.nii.gz", (32, 32, 32), voxsize=6.0)
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TOML.format(maps=maps.as_posix()))
    run = tmp_path / "run"

    p = torchrun(config, run, 4)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    d = digests(run)
    assert [x["rank"] for x in d] == [0, 1] and all(x["world"] == 2 and x["step"] == 4 for x in d)
    assert d[0]["sha256"] == d[1]["sha256"]           # DDP kept the ranks identical
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 4 and state_digest(state["model"]) == d[0]["sha256"]
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # rank 0 alone writes the log

    p = torchrun(config, run, 6)                      # both ranks resume from the checkpoint
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    d2 = digests(run)
    assert all(x["step"] == 6 for x in d2) and d2[0]["sha256"] == d2[1]["sha256"] != d[0]["sha256"]
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 6
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and all(np.isfinite(r["loss"]) for r in rows)


class Probe(LabelMapDataset):
    """Yields (rank, sample index) instead of synthesising."""

    def sample(self, stream, step):
        return torch.tensor([stream, step])


@pytest.mark.parametrize("workers,batch,per_step,start", [(0, 1, 1, 0), (2, 3, 1, 5), (2, 2, 2, 7)])
def test_sample_numbering_follows_training_steps(workers, batch, per_step, start):
    """Whatever the worker count, a rank consumes samples start*per_step*batch,
    +1, ... in order: resuming at step ``start`` continues the stream exactly
    and ranks (the seed's stream) never overlap."""
    streams = {}
    for rank in (0, 1):
        ds = Probe(["unused"], make=None, start=start, rank=rank, world=2)
        ds.batch, ds.per_step = batch, per_step
        it = iter(DataLoader(ds, batch_size=batch, num_workers=workers))
        got = torch.cat([next(it) for _ in range(6 * per_step)])
        assert (got[:, 0] == rank).all()
        first = start * per_step * batch
        assert got[:, 1].tolist() == list(range(first, first + 6 * per_step * batch))
        streams[rank] = {tuple(x) for x in got.tolist()}
    assert not streams[0] & streams[1]


def test_grad_accum_matches_bigger_batch(tmp_path):
    """batch 2 x 1 micro-step and batch 1 x 2 micro-steps see the same samples
    and (MSE is a mean) the same gradient: the same weights after 2 steps."""
    maps = tmp_path / "maps"
    maps.mkdir()
    write_label_map(maps / "a.nii.gz", (32, 32, 32), voxsize=6.0)
    weights = []
    for batch, accum in ((2, 1), (1, 2)):
        cfg = load_config("skullstrip", {
            "recipe.voxsize": 8.0, "recipe.shape": [16, 16, 16], "model.features": [4, 8], "model.convs": 1,
            "train.workers": 0, "train.label_maps": str(maps), "train.val_every": 0, "train.log_every": 1,
            "train.threads": 1, "train.bf16": False, "train.batch": batch, "train.grad_accum": accum,
            "validation.cases": []})
        run = tmp_path / f"b{batch}a{accum}"
        train(get_recipe(cfg), run, steps=2, log=lambda *a: None, check=False)
        weights.append(torch.load(run / "checkpoint.pt", weights_only=True)["model"])
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=1e-4, atol=1e-6)
