"""The benchmarks' shared harness (benchmarks/common.py) and the
skull-stripping summary (benchmarks/strip_report.py), without running a
benchmark: processes killed with their children, result lines, means with
failures counted as 0, and the strip command's --help."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks import common, strip_report
    return common, strip_report


def _dead(pid: int) -> bool:
    """Gone, or a zombie waiting for its (new) parent to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_run_killable_kills_the_whole_group_on_timeout(bench):
    common, _ = bench
    # A child that starts a grandchild and waits: the timeout must reach both.
    rc, out, _, wall = common.run_killable(["sh", "-c", "sleep 30 & echo $!; wait"], dict(os.environ), 1.0)
    assert rc is None and wall < 10
    grandchild = int(out.split()[0])
    time.sleep(0.2)
    assert _dead(grandchild)
    rc, out, err, _ = common.run_killable([sys.executable, "-c", "print('hi'); raise SystemExit(3)"],
                                          dict(os.environ), 30)
    assert (rc, out.strip()) == (3, "hi")


def test_last_result_reads_the_last_tagged_line(bench):
    common, _ = bench
    out = 'noise\n@@T {"a": 1}\nmore noise\n@@T {"a": 2}\n'
    assert common.last_result("@@T ", out) == {"a": 2}
    assert common.last_result("@@T ", "nothing tagged") is None
    assert common.last_result("@@T ", None) is None


def test_strip_summary_counts_failures_as_zero(bench):
    _, report = bench
    cases = [{"name": "a", "group": "T1", "available": True}, {"name": "b", "group": "T1", "available": True},
             {"name": "c", "group": "CT", "available": True}, {"name": "d", "group": "T2", "available": False}]
    ok = {"status": "ok", "run_s": 2.0, "setup_s": 1.0, "wall_s": 5.0, "peak_rss_gb": 1.5}
    results = {"ours": {"a": dict(ok, dice=0.9, sd95_mm=2.0), "b": {"status": "timeout", "error": "slow"},
                        "c": dict(ok, dice=0.6, sd95_mm=4.0, peak_rss_gb=2.5)}}
    s = report.summarize({"cases": cases, "results": results}, ["ours", "peer"], {"peer": "not installed"})
    assert s["groups"] == ["T1", "CT"]            # GROUP_ORDER, unavailable cases left out
    ours = s["methods"]["ours"]
    assert ours["mean_dice_per_group"] == {"T1": pytest.approx(0.45), "CT": pytest.approx(0.6)}
    assert ours["mean_sd95_mm_per_group"] == {"T1": 2.0, "CT": 4.0}   # distances: ok cases only
    assert ours["mean_dice_all_cases"] == pytest.approx(0.5)
    assert (ours["cases_ok"], ours["cases_run"], ours["max_peak_rss_gb"]) == (2, 3, 2.5)
    assert ours["failed"] == {"b": "timeout: slow"}
    assert s["methods"]["peer"] == {"status": "unavailable", "reason": "not installed"}


def test_strip_benchmark_help_runs_without_heavy_imports():
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "strip.py"), "--help"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "--speed" in p.stdout and "--peers" in p.stdout
