"""Resumable, splittable batches in the command-line tools (issue 30):
``synthstrip`` and ``synthseg`` skip inputs whose outputs are complete,
``--overwrite`` redoes them, ``--shard I/N`` (or ``--shard slurm``) splits
the inputs across array tasks, a failing input does not stop the others,
and shared --vol/--qc tables get one row per input however often it runs.
Tiny 4 mm models from conftest, in-process."""
from __future__ import annotations

import csv
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import files_under  # noqa: E402 (tests/ is on sys.path)
from synthtools.cli import seg as seg_cli
from synthtools.cli import strip as strip_cli
from synthtools.cli.common import OutputSet

pytestmark = pytest.mark.usefixtures("one_thread")


def run(cli, *args, capsys) -> tuple[int, str, str]:
    code = cli.run([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.fixture
def heads(make_head):
    return [make_head(f"h{k}.nii.gz") for k in range(3)]


# -------------------------------------------------------------- resume --

def test_strip_rerun_skips_complete_outputs_and_overwrite_redoes(heads, tiny_strip_model, tmp_path, capsys):
    masks = tmp_path / "masks"
    args = ["-i", *heads, "-m", f"{masks}/", "-o", f"{masks}/", "--model", tiny_strip_model]
    code, out, err = run(strip_cli, *args, capsys=capsys)
    assert code == 0, err
    assert "3 cases: 3 done, 0 skipped (complete), 0 failed" in out
    first = mtimes(masks)
    assert {n for n in first if not n.startswith(".")} == {f"h{k}_{s}.nii.gz" for k in range(3)
                                                           for s in ("mask", "stripped")}
    # Again: nothing runs, nothing is rewritten (the model is not even loaded).
    code, out, err = run(strip_cli, *args, capsys=capsys)
    assert code == 0 and "3 cases: 0 done, 3 skipped (complete), 0 failed" in out
    assert "model " not in out and mtimes(masks) == first
    # One output gone: only that input is redone.
    (masks / "h1_mask.nii.gz").unlink()
    code, out, err = run(strip_cli, *args, capsys=capsys)
    assert code == 0 and "3 cases: 1 done, 2 skipped (complete), 0 failed" in out
    assert (masks / "h1_mask.nii.gz").is_file()
    # An option that changes the result redoes everything; --overwrite too.
    code, out, _ = run(strip_cli, *args, "-b", "2", capsys=capsys)
    assert "3 cases: 3 done, 0 skipped" in out
    code, out, _ = run(strip_cli, *args, "-b", "2", "--overwrite", capsys=capsys)
    assert code == 0 and "3 cases: 3 done, 0 skipped" in out
    # Threads do not change a result: still complete.
    code, out, _ = run(strip_cli, *args, "-b", "2", "-t", "1", capsys=capsys)
    assert "3 cases: 0 done, 3 skipped" in out


def test_a_new_input_on_the_same_output_path_is_not_skipped(make_head, tiny_strip_model, tmp_path, capsys):
    small = make_head("a.nii.gz")
    other = make_head("b.nii.gz", shape=(36, 40, 32), voxsize=(2.0, 2.2, 2.4))
    out = tmp_path / "mask.nii.gz"
    assert run(strip_cli, small, "-m", out, "--model", tiny_strip_model, capsys=capsys)[0] == 0
    code, stdout, _ = run(strip_cli, small, "-m", out, "--model", tiny_strip_model, capsys=capsys)
    assert code == 0 and "complete, skipped" in stdout
    # Another input written to the same path: redone, on that input's grid.
    assert run(strip_cli, other, "-m", out, "--model", tiny_strip_model, capsys=capsys)[0] == 0
    assert nib.load(out).shape == (36, 40, 32)
    # The same input path with new content (a re-acquired scan): redone too.
    nib.save(nib.load(small), other)
    code, stdout, _ = run(strip_cli, other, "-m", out, "--model", tiny_strip_model, capsys=capsys)
    assert code == 0 and "skipped" not in stdout and nib.load(out).shape == (40, 44, 36)


# -------------------------------------------------------------- shards --

@pytest.mark.parametrize("count", [2, 3, 4])
def test_strip_shards_partition_the_inputs(heads, tiny_strip_model, tmp_path, capsys, count):
    masks = tmp_path / "masks"
    done: list[str] = []
    for index in range(count):
        # Inputs listed in another order for each task: the split must not depend on it.
        order = heads[index % 3:] + heads[:index % 3]
        code, out, err = run(strip_cli, "-i", *order, "-m", f"{masks}/", "--model", tiny_strip_model,
                             "--shard", f"{index}/{count}", capsys=capsys)
        assert code == 0, err
        before = set(done)
        done = sorted(n for n in files_under(masks) if not n.startswith("."))
        assert before <= set(done)
        assert f"shard {index}/{count}: " in out
        assert len(done) - len(before) == len(range(index, 3, count))   # each task writes its own share
    assert done == [f"h{k}_mask.nii.gz" for k in range(3)]


def test_shard_from_the_slurm_array_only_when_asked(heads, tiny_strip_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    # A task given its own chunk of inputs (the README's Slurm example): all of it is processed.
    code, out, err = run(strip_cli, "-i", *heads, "-m", f"{tmp_path}/all/", "--model", tiny_strip_model,
                         capsys=capsys)
    assert code == 0 and len(list((tmp_path / "all").glob("*_mask.nii.gz"))) == 3
    code, out, err = run(strip_cli, "-i", *heads, "-m", f"{tmp_path}/half/", "--model", tiny_strip_model,
                         "--shard", "slurm", capsys=capsys)
    assert code == 0 and "shard 1/2: 1 of 3 inputs" in out
    assert [p.name for p in (tmp_path / "half").glob("*_mask.nii.gz")] == ["h1_mask.nii.gz"]


@pytest.mark.parametrize("shard,text", [("3/3", "I must be 0..N-1"), ("a/b", "expected I/N"),
                                        ("slurm", "SLURM_ARRAY_TASK_ID is not set")])
def test_bad_shard_one_line_exit_2(cli_name, heads, tiny_strip_model, tiny_seg_model, tmp_path, capsys,
                                   monkeypatch, shard, text):
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    cli, model = (strip_cli, tiny_strip_model) if cli_name == "synthstrip" else (seg_cli, tiny_seg_model)
    code, out, err = run(cli, "-i", *heads, "-o", f"{tmp_path}/out/", "--model", model, "--shard", shard,
                         capsys=capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"{cli_name}: error: --shard") and text in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.fixture(params=["synthstrip", "synthseg"])
def cli_name(request):
    return request.param


# ----------------------------------------------------- isolation, summary --

def test_failures_are_isolated_and_summarised(heads, tiny_seg_model, tmp_path, capsys):
    bad = tmp_path / "bad.nii.gz"
    bad.write_text("not an image")
    code, out, err = run(seg_cli, "-i", heads[0], bad, heads[1], "-o", f"{tmp_path}/seg/", "--no-refine",
                         "--model", tiny_seg_model, capsys=capsys)
    assert code == 1
    assert "3 cases: 2 done, 0 skipped (complete), 1 failed" in out
    summary = [x for x in out.splitlines() if x.startswith(str(bad))]
    assert len(summary) == 1 and " failed " in summary[0]
    assert err.strip().splitlines()[-1] == "synthseg: error: 1 of 3 inputs failed"
    # The rerun does only the failed one (which fails again); the others are skipped.
    code, out, err = run(seg_cli, "-i", heads[0], bad, heads[1], "-o", f"{tmp_path}/seg/", "--no-refine",
                         "--model", tiny_seg_model, capsys=capsys)
    assert code == 1 and "3 cases: 0 done, 2 skipped (complete), 1 failed" in out


# ------------------------------------------------------- shared tables --

def test_seg_tables_one_row_per_input_across_reruns(heads, tiny_seg_model, tmp_path, capsys):
    vol, qc = tmp_path / "vol.csv", tmp_path / "qc.csv"
    args = ["-i", *heads, "-o", f"{tmp_path}/seg/", "--vol", vol, "--qc", qc, "--no-refine",
            "--model", tiny_seg_model]
    assert run(seg_cli, *args, capsys=capsys)[0] == 0
    first = rows(vol)
    assert [r[0] for r in first[1:]] == [str(h) for h in heads]
    code, out, _ = run(seg_cli, *args, capsys=capsys)
    assert code == 0 and "3 cases: 0 done, 3 skipped" in out and rows(vol) == first
    # --overwrite: every input again, each row replaced (same numbers), none added.
    code, out, _ = run(seg_cli, *args, "--overwrite", capsys=capsys)
    assert code == 0 and "3 cases: 3 done" in out
    assert sorted(rows(vol)[1:]) == sorted(first[1:]) and rows(vol)[0] == first[0]
    assert sorted(r[0] for r in rows(qc)[1:]) == sorted(str(h) for h in heads)
    # A table that lost an input's row: that input is not complete and is redone.
    vol.write_text("".join(",".join(r) + "\n" for r in first[:2]))
    code, out, _ = run(seg_cli, *args, capsys=capsys)
    assert code == 0 and "3 cases: 2 done, 1 skipped" in out
    assert sorted(rows(vol)[1:]) == sorted(first[1:])


def test_sharded_tasks_fill_one_table(heads, tiny_seg_model, tmp_path, capsys):
    vol = tmp_path / "vol.csv"
    for index in range(3):
        code, out, err = run(seg_cli, "-i", *heads, "--vol", vol, "--no-refine", "--model", tiny_seg_model,
                             "--shard", f"{index}/3", capsys=capsys)
        assert code == 0, err
    assert sorted(r[0] for r in rows(vol)[1:]) == sorted(str(h) for h in heads)


def test_table_updates_under_the_lock_lose_no_row(tmp_path):
    """Array tasks adding rows to one table at once: each read-modify-write
    holds the lock, so no task's row is lost (without it, most would be)."""
    table = tmp_path / "t.csv"

    def add(k: int) -> None:
        def edit(old: str) -> str:
            time.sleep(0.02)   # widen the window between the read and the write
            return old + f"row{k}\n"
        with OutputSet() as out:
            out.update(str(table), edit)

    threads = [threading.Thread(target=add, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(table.read_text().split()) == sorted(f"row{k}" for k in range(8))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_quiet_prints_nothing_on_a_skip(head_path, tiny_seg_model, tmp_path, capsys):
    args = [head_path, tmp_path / "seg.nii.gz", "--no-refine", "--model", tiny_seg_model, "-q"]
    assert run(seg_cli, *args, capsys=capsys) == (0, "", "")
    assert run(seg_cli, *args, capsys=capsys) == (0, "", "")
    assert np.asanyarray(nib.load(tmp_path / "seg.nii.gz").dataobj).any()


# ------------------------------------------------------ synthmorph apply --

def test_apply_resumes_and_shards(heads, tmp_path, capsys):
    from synthtools.cli import morph as morph_cli
    from synthtools.morph import Affine, as_geometry, write_transform

    grid = as_geometry(nib.load(heads[0]))
    shift = np.eye(4)
    shift[:3, 3] = [2.0, 0.0, 0.0]   # 2 mm: one voxel
    trans = Path(write_transform(Affine(shift, fixed=grid, moving=grid), tmp_path / "t.lta"))
    pairs = [str(x) for h in heads for x in (h, tmp_path / "moved" / h.name)]
    (tmp_path / "moved").mkdir()
    code, out, err = run(morph_cli, "apply", trans, *pairs, capsys=capsys)
    assert code == 0 and "3 cases: 3 done, 0 skipped" in out, err
    first = mtimes(tmp_path / "moved")
    moved = np.asanyarray(nib.load(tmp_path / "moved" / heads[0].name).dataobj)
    src = np.asanyarray(nib.load(heads[0]).dataobj)
    assert moved.shape == src.shape and not np.array_equal(moved, src)
    code, out, _ = run(morph_cli, "apply", trans, *pairs, capsys=capsys)
    assert code == 0 and "3 cases: 0 done, 3 skipped" in out and mtimes(tmp_path / "moved") == first
    # Another interpolation, or a rewritten transform: redone.
    code, out, _ = run(morph_cli, "apply", trans, *pairs, "-m", "nearest", capsys=capsys)
    assert "3 cases: 3 done" in out
    write_transform(Affine(np.eye(4), fixed=grid, moving=grid), trans)
    code, out, _ = run(morph_cli, "apply", trans, *pairs, "-m", "nearest", capsys=capsys)
    assert "3 cases: 3 done" in out
    assert np.array_equal(np.asanyarray(nib.load(tmp_path / "moved" / heads[0].name).dataobj), src)
    # Shards: one pair of three in shard 1/3 (sorted by image path: h1).
    code, out, _ = run(morph_cli, "apply", trans, *pairs, "-m", "nearest", "--overwrite", "--shard", "1/3",
                       capsys=capsys)
    assert code == 0 and "shard 1/3: 1 of 3 inputs" in out and str(heads[1]) in out and str(heads[0]) not in out
