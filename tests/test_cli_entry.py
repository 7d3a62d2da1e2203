"""The entry every console tool shares (synthtools.cli.entry): exit codes,
one-line errors, and a start light enough for ``synthgen --help``."""
from __future__ import annotations

import subprocess
import sys

import pytest

from synthtools.cli import bids, models, morph, seg, strip
from synthtools.cli.entry import UsageError, entry
from synthtools.io import InputError
from synthtools.training import cli as synthgen


def raising(exc: BaseException):
    def body(argv):
        raise exc
    return body


@pytest.mark.parametrize("exc,code", [(UsageError("bad  flag\n(see x -h)"), 2), (InputError("a.nii: not found"), 1),
                                      (KeyboardInterrupt(), 130)])
def test_failures_are_one_line_with_their_code(exc, code, capsys):
    assert entry("tool", raising(exc), []) == code
    captured = capsys.readouterr()
    assert captured.out == ""
    want = {2: "tool: error: bad flag (see x -h)", 1: "tool: error: a.nii: not found", 130: "tool: error: interrupted"}
    assert captured.err == want[code] + "\n"


def test_body_code_and_none_pass_through(capsys):
    assert entry("tool", lambda argv: 0, []) == 0
    assert entry("tool", lambda argv: 1, []) == 1
    assert entry("tool", lambda argv: None, []) == 0
    seen = []
    entry("tool", seen.append, ["a", "b"])
    assert seen == [["a", "b"]]
    assert capsys.readouterr().err == ""


def test_own_failures_replace_the_default_and_others_propagate(capsys):
    failures = (((FileNotFoundError, ValueError), 2),)
    assert entry("gen", raising(ValueError("x: bad")), [], failures) == 2
    assert entry("gen", raising(InputError("y: bad")), [], failures) == 2   # an InputError is a ValueError
    assert capsys.readouterr().err.splitlines() == ["gen: error: x: bad", "gen: error: y: bad"]
    with pytest.raises(ValueError):   # not a failure of the default tools: a bug keeps its traceback
        entry("tool", raising(ValueError("z")), [])
    with pytest.raises(SystemExit):   # argparse's -h and its usage errors go through
        entry("tool", raising(SystemExit(0)), [])


def test_every_cli_runs_through_entry(monkeypatch):
    calls = []

    def fake(prog, body, argv=None, failures=None):
        calls.append((prog, failures))
        return 0

    for module in (strip, seg, morph, models, bids):
        monkeypatch.setattr(module, "entry", fake)
        assert module.run(["x"]) == 0
    monkeypatch.setattr(synthgen, "entry", fake)
    assert synthgen.run(["x"]) == 0
    assert [p for p, _ in calls] == ["synthstrip", "synthseg", "synthmorph", "synthtools", "synthtools-bids",
                                     "synthgen"]
    assert calls[-1][1] == synthgen.FAILURES and all(f is None for _, f in calls[:-1])


def test_closed_stdout_is_quiet_exit_1():
    """``synthtools models | head -1``: the reader leaves early; no traceback."""
    code = ("import sys; from synthtools.cli.models import run; "
            "sys.exit(run(['models']))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()   # nobody reads: the first write fails with EPIPE
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert "Traceback" not in err and "Exception ignored" not in err, err


def test_synthgen_help_loads_no_numpy_torch_or_nibabel():
    """What keeps ``synthgen --help`` fast (0.06 s measured; target < 0.5 s): its
    module and the shared entry import no array library."""
    code = ("import sys; from synthtools.training.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "print(sorted({'numpy', 'torch', 'nibabel', 'scipy'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "usage: synthgen" in out and out.strip().splitlines()[-1] == "[]"


def test_synthgen_failure_exits_2_success_returns(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        synthgen.main(["preset", "skullstrip", "-o", str(tmp_path / "x.toml")])
    assert e.value.code == 2
    assert capsys.readouterr().err == "synthgen: error: choose --half and/or --2d\n"
    assert synthgen.main(["preset", "skullstrip", "--half", "-o", str(tmp_path / "x.toml")]) is None
    assert (tmp_path / "x.toml").is_file()
