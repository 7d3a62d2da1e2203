"""Resumable, splittable batches (synthtools.batch): shards, done-markers,
skip/overwrite, per-case error isolation and the summary."""
from __future__ import annotations

import io
import json
import os
import random

import pytest

from synthtools.batch import (Case, ShardError, is_complete, parse_shard, resolve_shard, run_batch, select_shard,
                              shard_from_env, sidecar_marker, write_marker)


# ------------------------------------------------------------------ shards --

@pytest.mark.parametrize("text,expected", [("0/1", (0, 1)), ("3/10", (3, 10)), (" 9 / 10 ", (9, 10))])
def test_parse_shard(text, expected):
    assert parse_shard(text) == expected


@pytest.mark.parametrize("text", ["10/10", "1/0", "-1/3", "a/b", "3", "1/2/3", ""])
def test_parse_shard_refuses(text):
    with pytest.raises(ShardError, match="--shard"):
        parse_shard(text)


@pytest.mark.parametrize("n_items", [0, 1, 7, 23])
@pytest.mark.parametrize("count", [1, 3, 10])
def test_shards_partition_the_list_evenly(n_items, count):
    items = [f"sub-{k:03d}" for k in range(n_items)]
    shards = [select_shard(items, (i, count)) for i in range(count)]
    flat = [x for s in shards for x in s]
    assert sorted(flat) == sorted(items) and len(flat) == len(set(flat))   # a partition
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_shards_do_not_depend_on_listing_order():
    items = [f"sub-{k:02d}_T1w.nii.gz" for k in range(17)]
    shuffled = items[:]
    random.Random(1).shuffle(shuffled)
    assert shuffled != items
    for i in range(4):
        assert select_shard(items, (i, 4)) == select_shard(shuffled, (i, 4))


def test_shard_from_slurm_array():
    assert shard_from_env({}) is None
    # --array=0-9
    env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "10", "SLURM_ARRAY_TASK_MIN": "0",
           "SLURM_ARRAY_TASK_MAX": "9"}
    assert shard_from_env(env) == (3, 10)
    # --array=1-10: IDs start at 1
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "1",
                           "SLURM_ARRAY_TASK_MAX": "10"}) == (0, 10)
    # --array=0-18:2 (10 tasks), count derived from min/max/step
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "18", "SLURM_ARRAY_TASK_MIN": "0",
                           "SLURM_ARRAY_TASK_MAX": "18", "SLURM_ARRAY_TASK_STEP": "2"}) == (9, 10)


@pytest.mark.parametrize("env", [
    {"SLURM_ARRAY_TASK_ID": "3"},                                                  # no count
    {"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "4"},                   # not a number
    {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "9",
     "SLURM_ARRAY_TASK_COUNT": "3"},                                               # --array=1,5,9
])
def test_shard_from_slurm_array_refuses(env):
    with pytest.raises(ShardError):
        shard_from_env(env)


def test_slurm_array_only_when_asked():
    # An array task that was handed its own chunk must not be split again:
    # the environment is read for '--shard slurm' only.
    env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "10"}
    assert resolve_shard("1/2", env) == (1, 2)
    assert resolve_shard(None, env) is None
    assert resolve_shard("slurm", env) == (3, 10)
    assert resolve_shard(" SLURM ", env) == (3, 10)
    assert resolve_shard(None, {}) is None
    with pytest.raises(ShardError, match="--shard slurm.*SLURM_ARRAY_TASK_ID is not set"):
        resolve_shard("slurm", {})


# ----------------------------------------------------------------- markers --

def test_marker_records_outputs_sizes_and_params(tmp_path):
    a, b = tmp_path / "a.nii.gz", tmp_path / "b.tsv"
    a.write_bytes(b"x" * 100)
    b.write_text("t\n")
    marker = sidecar_marker(a)
    assert os.path.basename(marker) == ".a.nii.gz.done.json"
    outputs = [str(a), str(b)]
    params = {"model": "abc", "tools": ("strip", "seg")}
    assert not is_complete(marker, outputs, params)
    write_marker(marker, outputs, params)
    assert is_complete(marker, outputs, params)
    assert not is_complete(marker, outputs, {"model": "other", "tools": ("strip", "seg")})   # new model
    assert not is_complete(marker, outputs[:1], params)                                      # other outputs
    a.write_bytes(b"x" * 50)                                                                 # truncated
    assert not is_complete(marker, outputs, params)
    a.write_bytes(b"x" * 100)
    b.unlink()                                                                               # deleted
    assert not is_complete(marker, outputs, params)
    b.write_text("t\n")
    assert is_complete(marker, outputs, params)
    with open(marker, "w") as f:                                                             # corrupt marker
        f.write("{not json")
    assert not is_complete(marker, outputs, params)


# ------------------------------------------------------------------- batch --

def _cases(tmp_path, names, params=None):
    return [Case(key=n, outputs=[str(tmp_path / f"{n}.txt"), str(tmp_path / f"{n}.tsv")], params=params or {})
            for n in names]


def _writer(calls, fail=()):
    def process(case):
        calls.append(case.key)
        if case.key in fail:
            # Half-written case: one output, then a failure.
            open(case.outputs[0], "w").write("partial")
            raise ValueError(f"cannot process {case.key}\nsecond line")
        for p in case.outputs:
            with open(p, "w") as f:
                f.write(case.key)
    return process


def test_failures_are_isolated_and_reported(tmp_path, capsys):
    cases = _cases(tmp_path, ["a", "b", "c", "d"])
    calls: list[str] = []
    report = run_batch(cases, _writer(calls, fail={"b"}), prog="t")
    assert calls == ["a", "b", "c", "d"]                 # the batch went on after b
    assert [r.status for r in report.results] == ["done", "failed", "done", "done"]
    assert report.exit_code == 1 and report.failed == 1
    out, err = capsys.readouterr()
    assert "t: error: [2/4] b: ValueError: cannot process b second line" in err   # one line
    assert "[4/4] d: done" in out
    assert "4 cases: 3 done, 0 skipped (complete), 1 failed" in out
    summary = out[out.index("case"):].splitlines()
    assert summary[0].split() == ["case", "status", "seconds", "message"]
    assert summary[2].split()[:2] == ["b", "failed"]
    assert not os.path.exists(cases[1].marker)          # the failed case is not complete


def test_second_run_skips_complete_cases_and_redoes_failed(tmp_path):
    cases = _cases(tmp_path, ["a", "b", "c"])
    first: list[str] = []
    run_batch(cases, _writer(first, fail={"b"}), stream=io.StringIO())
    second: list[str] = []
    report = run_batch(cases, _writer(second), stream=io.StringIO())
    assert second == ["b"]                               # only the failed case again
    assert [r.status for r in report.results] == ["skipped", "done", "skipped"]
    assert report.exit_code == 0
    third: list[str] = []
    run_batch(cases, _writer(third), stream=io.StringIO())
    assert third == []                                   # everything complete


def test_overwrite_redoes_everything(tmp_path):
    cases = _cases(tmp_path, ["a", "b"])
    run_batch(cases, _writer([]), stream=io.StringIO())
    calls: list[str] = []
    report = run_batch(cases, _writer(calls), overwrite=True, stream=io.StringIO())
    assert calls == ["a", "b"] and report.count("done") == 2


def test_changed_params_or_deleted_output_redo_the_case(tmp_path):
    cases = _cases(tmp_path, ["a", "b"], params={"sha256": "1"})
    run_batch(cases, _writer([]), stream=io.StringIO())
    os.remove(cases[0].outputs[1])
    calls: list[str] = []
    run_batch(cases, _writer(calls), stream=io.StringIO())
    assert calls == ["a"]
    calls.clear()
    run_batch(_cases(tmp_path, ["a", "b"], params={"sha256": "2"}), _writer(calls), stream=io.StringIO())
    assert calls == ["a", "b"]


def test_a_case_that_writes_nothing_fails(tmp_path):
    cases = _cases(tmp_path, ["a"])
    report = run_batch(cases, lambda case: None, stream=io.StringIO())
    assert report.results[0].status == "failed" and "output not written" in report.results[0].message
    assert not os.path.exists(cases[0].marker)


def test_interrupt_stops_the_batch(tmp_path):
    def process(case):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_batch(_cases(tmp_path, ["a", "b"]), process, stream=io.StringIO())


def test_marker_file_is_json_with_sizes(tmp_path):
    cases = _cases(tmp_path, ["a"])
    run_batch(cases, _writer([]), stream=io.StringIO())
    record = json.loads(open(cases[0].marker).read())
    assert record["outputs"] == {os.path.abspath(p): len("a") for p in cases[0].outputs}
