"""Thread count of the CLIs (issue 30, defect 1): the resolver reads every
layer that grants CPUs (flag, OMP_NUM_THREADS, SLURM_CPUS_PER_TASK, cgroup
quota v1/v2, affinity, cpu_count) and the idle CPUs; the CLIs apply it once,
with passive OpenMP waiting set before torch loads."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from synthtools import threads
from synthtools.threads import (cgroup_cpu_limit, default_threads, granted_threads, idle_cpus,
                                prepare_environment, resolve_threads)

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A fake 16-core machine, 8 CPUs in the affinity set, no cgroup limit."""
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    root = tmp_path / "cgroup"
    root.mkdir()
    proc = write(tmp_path / "proc_cgroup", "0::/\n")
    return dict(cgroup_root=str(root), proc_cgroup=str(proc))


# ---------------------------------------------------------------- cgroups --

def test_cgroup_v2_quota_rounds_up_and_max_is_unlimited(tmp_path):
    root = tmp_path / "cg"
    proc = write(tmp_path / "pc", "0::/job/step\n")
    write(root / "cpu.max", "max 100000\n")
    assert cgroup_cpu_limit(str(root), str(proc)) is None
    write(root / "job" / "step" / "cpu.max", "250000 100000\n")          # 2.5 CPUs -> 3
    assert cgroup_cpu_limit(str(root), str(proc)) == 3
    write(root / "job" / "cpu.max", "150000 100000\n")                   # a parent is tighter: 1.5 -> 2
    assert cgroup_cpu_limit(str(root), str(proc)) == 2
    write(root / "job" / "cpu.max", "20000 100000\n")                    # a fifth of a CPU: still 1
    assert cgroup_cpu_limit(str(root), str(proc)) == 1


def test_cgroup_v1_quota_and_unlimited(tmp_path):
    root = tmp_path / "cg"
    proc = write(tmp_path / "pc", "5:memory:/x\n4:cpu,cpuacct:/slurm/job7\n")
    write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
    write(root / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit(str(root), str(proc)) is None
    write(root / "cpu,cpuacct" / "slurm" / "job7" / "cpu.cfs_quota_us", "400000\n")
    write(root / "cpu,cpuacct" / "slurm" / "job7" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit(str(root), str(proc)) == 4


def test_cgroup_garbage_and_missing_files_are_ignored(tmp_path):
    root = tmp_path / "cg"
    proc = write(tmp_path / "pc", "0::/a\n")
    write(root / "a" / "cpu.max", "lots 100000\n")
    assert cgroup_cpu_limit(str(root), str(proc)) is None
    assert cgroup_cpu_limit(str(tmp_path / "nowhere"), str(tmp_path / "no_proc")) is None


# ------------------------------------------------------------ the layers --

def test_granted_is_the_smallest_layer(machine, tmp_path):
    assert granted_threads({}, **machine) == 8                               # affinity < cpu_count
    assert granted_threads({"SLURM_CPUS_PER_TASK": "4"}, **machine) == 4
    assert granted_threads({"SLURM_CPUS_PER_TASK": "4", "OMP_NUM_THREADS": "3"}, **machine) == 3
    assert granted_threads({"SLURM_CPUS_PER_TASK": "2", "OMP_NUM_THREADS": "3"}, **machine) == 2
    assert granted_threads({"OMP_NUM_THREADS": "6,2"}, **machine) == 6       # nested list: the outer level
    write(Path(machine["cgroup_root"]) / "cpu.max", "100000 100000\n")
    assert granted_threads({"SLURM_CPUS_PER_TASK": "4"}, **machine) == 1     # the quota is tightest


def test_unusable_values_are_ignored(machine):
    for bad in ("", "0", "-2", "four", "2.5"):
        assert granted_threads({"OMP_NUM_THREADS": bad, "SLURM_CPUS_PER_TASK": bad}, **machine) == 8


def test_without_affinity_cpu_count_counts(machine, monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity")
    assert granted_threads({}, **machine) == 16


def test_explicit_flag_wins_and_must_be_positive(machine):
    assert resolve_threads(12, {"OMP_NUM_THREADS": "2"}, **machine) == 12
    with pytest.raises(ValueError):
        resolve_threads(0, {}, **machine)


# ------------------------------------------------------------- idle CPUs --

def stat(*rows) -> str:
    """/proc/stat text: one (user, idle) pair per CPU (other fields 0)."""
    total = [sum(r[0] for r in rows), 0, 0, sum(r[1] for r in rows), 0, 0, 0, 0, 0, 0]
    lines = ["cpu  " + " ".join(map(str, total))]
    lines += [f"cpu{k} {u} 0 0 {i} 0 0 0 0 0 0" for k, (u, i) in enumerate(rows)]
    return "\n".join(lines + ["intr 1 2 3", "ctxt 99"]) + "\n"


def test_idle_cpus_from_two_samples_of_proc_stat(monkeypatch):
    samples = iter([stat((100, 100), (100, 100), (100, 100)),
                    stat((200, 100), (110, 190), (150, 150))])   # CPU0 busy, CPU1 90% idle, CPU2 half
    monkeypatch.setattr(threads, "_read", lambda path: next(samples))
    assert idle_cpus(0.0, cpus={0, 1, 2}) == pytest.approx(3 * (0 + 90 + 50) / 300)
    samples = iter([stat((100, 100), (100, 100), (100, 100)),
                    stat((200, 100), (110, 190), (150, 150))])
    assert idle_cpus(0.0, cpus={1}) == pytest.approx(0.9)            # only the CPUs we may use


def test_governor_follows_the_cpus_other_processes_leave(monkeypatch):
    """Two CPUs; each minute the governor reads /proc/stat and our own CPU
    time. Someone else busy on one CPU: 1 thread; they leave: back to 2."""
    import torch
    before = torch.get_num_threads()
    clock, own = [0.0], [0.0]
    rows = [stat((0, 0), (0, 0))]
    monkeypatch.setattr(threads, "_read", lambda path: rows[-1])

    def minute(user0, user1, own_cpus):
        """60 s pass: CPU k busy user_k of the time, we used own_cpus CPUs."""
        (u0, i0), (u1, i1) = last[0], last[1]
        last[:] = [(u0 + 60 * user0, i0 + 60 * (1 - user0)), (u1 + 60 * user1, i1 + 60 * (1 - user1))]
        rows.append(stat(*last))
        clock[0] += 60.0
        own[0] += 60.0 * own_cpus
    last = [(0, 0), (0, 0)]
    gov = threads.ThreadGovernor(2, every_s=60.0, cpus={0, 1}, clock=lambda: clock[0], own_cpu=lambda: own[0])
    try:
        assert gov.threads == 2
        minute(1.0, 1.0, 1.0)                  # both busy, only one CPU of it ours
        assert gov() == 1 and torch.get_num_threads() == 1
        clock[0] += 10.0
        assert gov() is None                   # not a minute yet: no new reading
        minute(1.0, 1.0, 1.0)                  # still shared: no change
        assert gov() is None and gov.threads == 1
        minute(1.0, 0.05, 1.0)                 # the other job left
        assert gov() == 2 and torch.get_num_threads() == 2
        minute(1.0, 1.0, 2.0)                  # both busy, all ours: keep 2
        assert gov() is None and gov.threads == 2
    finally:
        torch.set_num_threads(before)


def test_training_governor_obeys_its_switches(monkeypatch):
    import torch
    from synthtools.training.config import TrainSection
    from synthtools.training.loop import thread_governor
    monkeypatch.setattr(threads, "granted_threads", lambda *a, **k: 2)
    monkeypatch.delenv("SYNTHTOOLS_LOAD_AWARE", raising=False)
    cpu = torch.device("cpu")
    two = TrainSection(threads=2)
    assert thread_governor(two, cpu).max_threads == 2
    assert thread_governor(TrainSection(threads=1), cpu) is None                     # nothing to give back
    assert thread_governor(TrainSection(threads=2, load_aware=False), cpu) is None
    assert thread_governor(two, torch.device("meta")) is None     # not a CPU run
    monkeypatch.setenv("SYNTHTOOLS_LOAD_AWARE", "0")
    assert thread_governor(two, cpu) is None


def test_default_is_capped_by_idle_cpus(machine, monkeypatch):
    for idle, expected in ((0.2, 1), (1.4, 1), (1.6, 2), (7.9, 8), (15.0, 8)):
        monkeypatch.setattr(threads, "idle_cpus", lambda *a, idle=idle, **k: idle)
        assert default_threads({}, **machine) == expected, idle
    monkeypatch.setattr(threads, "idle_cpus", lambda *a, **k: 0.1)
    assert default_threads({"SYNTHTOOLS_LOAD_AWARE": "0"}, **machine) == 8   # the cap can be turned off
    assert resolve_threads(3, {}, **machine) == 3                              # and never caps the flag
    monkeypatch.setattr(threads, "idle_cpus", lambda *a, **k: None)
    assert default_threads({}, **machine) == 8                                 # unknown load: the granted CPUs


def test_real_proc_stat_gives_a_sane_idle_count():
    if not Path("/proc/stat").exists():
        pytest.skip("no /proc/stat")
    idle = idle_cpus(0.05)
    assert idle is not None and 0.0 <= idle <= len(os.sched_getaffinity(0)) + 1e-9


# ------------------------------------------------------------ environment --

def test_prepare_environment_keeps_user_values(machine, monkeypatch):
    env = {"OMP_WAIT_POLICY": "ACTIVE", "MKL_NUM_THREADS": "5"}
    monkeypatch.setattr(threads, "granted_threads", lambda e: 3)
    prepare_environment(env)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE", "MKL_NUM_THREADS": "5", "KMP_BLOCKTIME": "0",
                   "OMP_NUM_THREADS": "3", "OPENBLAS_NUM_THREADS": "3"}


def run_python(code: str, **env) -> str:
    base = {k: v for k, v in os.environ.items() if k not in (
        "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY", "KMP_BLOCKTIME",
        "SLURM_CPUS_PER_TASK")}
    base["PYTHONPATH"] = str(REPO)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(base, **env))
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_cli_package_sets_passive_waiting_before_torch_loads():
    out = run_python("import synthtools.cli, os, torch; "
                     "print(os.environ['OMP_WAIT_POLICY'], os.environ['OPENBLAS_NUM_THREADS'], "
                     "torch.get_num_threads())", SLURM_CPUS_PER_TASK="1")
    assert out.split() == ["PASSIVE", "1", "1"]   # the OpenMP pool starts at the granted size


def test_cli_applies_the_count_once_and_one_interop_thread():
    code = ("from synthtools.cli.common import choose_device; import torch; "
            "choose_device(False, {flag}); print(torch.get_num_threads(), torch.get_num_interop_threads())")
    assert run_python(code.format(flag=None), SLURM_CPUS_PER_TASK="1").split() == ["1", "1"]
    assert run_python(code.format(flag=2), SLURM_CPUS_PER_TASK="1").split() == ["2", "1"]   # the flag wins
