"""Cheap structural checks of the container recipes (no Docker needed): the
Dockerfile installs torch and this repository (with its [bids] extra) and
nothing else, names no index host, runs as a non-root user in /data with
the BIDS App as its entry point (which also runs any tool given by name),
and copies every folder the package is built from. CI (.ci/run) runs the same
pip commands in a fresh venv and calls the tools."""
from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _parser():
    spec = importlib.util.spec_from_file_location("dockerfile_pip", ROOT / ".ci" / "dockerfile_pip.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


df = _parser()


def pip_installs(run: str) -> list[list[str]]:
    """Argument lists after ``pip install`` in one RUN command."""
    lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, words = [], []
    for token in lexer:   # split at shell operators outside quotes
        if token in ("&&", "||", ";", "|"):
            commands.append(words)
            words = []
        else:
            words.append(token)
    commands.append(words)
    return [w[i + 2:] for w in commands for i in range(len(w) - 1) if w[i:i + 2] == ["pip", "install"]]


def test_pip_installs_only_torch_and_this_repo():
    args, runs = df.pip_runs(DOCKERFILE)
    installs = [a for run in runs for a in pip_installs(run)]
    assert installs, "no pip install found"
    targets = []
    for a in installs:
        assert "--no-cache-dir" in a
        options = [w for w in a if w.startswith("-")]
        assert set(options) <= {"--no-cache-dir"}, options   # no -r, --index-url, -e, extras files...
        targets += [w for w in a if not w.startswith("-")]
    # torch first, then this repository with pybids for the BIDS App (the entry point)
    assert targets == ["torch==${TORCH_VERSION}", ".[bids]"]
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert any(d.startswith("pybids") for d in meta["project"]["optional-dependencies"]["bids"])
    # The pinned torch is the one CI and the README install.
    pin = re.search(r"torch==([\w.]+)", (ROOT / ".ci" / "run").read_text()).group(1)
    assert args["TORCH_VERSION"] == pin
    assert args["TORCH_VARIANT"] == "cpu" and args["TORCH_INDEX"] == "" and args["TORCH_FIND_LINKS"] == ""


def test_no_index_host_in_recipes():
    for name in ("Dockerfile", "Singularity.def", ".dockerignore"):
        # Apptainer's local transports (an image file, the local daemon) name no host.
        text = re.sub(r"\bdocker-(archive|daemon)://", "", (ROOT / name).read_text())
        assert not re.search(r"[a-z][a-z0-9+.-]*://", text, re.I), name
        assert not re.search(r"\b[\w-]+\.(org|com|io|net|dev|ai)\b", text), name


def global_args() -> dict[str, str]:
    """ARG defaults declared before the first FROM (usable in FROM lines)."""
    ins = df.instructions(DOCKERFILE)
    first = next(i for i, (w, _) in enumerate(ins) if w == "FROM")
    return df.arg_defaults(ins[:first])


def test_base_image_is_a_build_argument_defaulting_to_python_slim():
    # Users get the official slim image; CI passes a Debian-built base (.ci/container).
    assert global_args()["BASE_IMAGE"] == "python:${PYTHON_VERSION}-slim"
    for stage in df.stages(DOCKERFILE):
        assert re.fullmatch(r"\$\{BASE_IMAGE\}( AS \w+)?", stage[0][1])


def test_commands_before_the_venv_use_python3():
    # Debian's base has python3 only; `python` exists once /opt/venv/bin is on PATH.
    build = df.stages(DOCKERFILE)[0]
    venv_on_path = next(i for i, (w, r) in enumerate(build) if w == "ENV" and "PATH=/opt/venv/bin" in r)
    runs = [r for w, r in build[:venv_on_path] if w == "RUN"]
    assert any("python3 -m venv /opt/venv" in r for r in runs)
    for run in runs:
        assert not re.search(r"(^|[\s;&|(])python(\s|$)", run), run


def test_runtime_stage_user_workdir_bids_entrypoint():
    stages = df.stages(DOCKERFILE)
    assert len(stages) == 2
    final = stages[-1]
    assert [r for w, r in final if w == "ENTRYPOINT"] == ['["synthtools-entrypoint"]']
    assert ("COPY", "container/entrypoint.sh /usr/local/bin/synthtools-entrypoint") in final
    assert [r for w, r in final if w == "CMD"] == ['["synthtools-bids", "--help"]']
    users = [r for w, r in final if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert [r for w, r in final if w == "WORKDIR"][-1] == "/data"
    assert any(w == "COPY" and r.startswith("--from=build /opt/venv") for w, r in final)
    assert any(w == "ENV" and "PATH=/opt/venv/bin:$PATH" in r for w, r in final)
    assert re.search(r'\bARG PYTHON_VERSION=3\.11\b', DOCKERFILE)


def test_build_stage_copies_every_package_source():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    st = meta["tool"]["setuptools"]
    package_dir = st.get("package-dir", {})
    needed = {"pyproject.toml", meta["project"]["readme"]}
    for pkg in st["packages"]:
        top = pkg.split(".")[0]
        mapped = [d for p, d in package_dir.items() if pkg == p or pkg.startswith(p + ".")]
        needed.add(mapped[0].split("/")[0] if mapped else top)
    copied = set()
    for word, rest in df.stages(DOCKERFILE)[0]:
        if word == "COPY" and not rest.startswith("--from"):
            copied.update(rest.split()[:-1])
    assert needed <= copied, needed - copied
    for name in needed:
        assert (ROOT / name).exists()


def test_dockerignore_keeps_runs_and_venvs_out():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", "runs", ".venv", "**/__pycache__", ".pytest_cache"} <= ignored
    for src in ("pyproject.toml", "README.md", "synthtools", "training", "models"):
        assert src not in ignored


def test_apptainer_definition():
    text = (ROOT / "Singularity.def").read_text()
    assert re.search(r"^Bootstrap: docker-daemon$", text, re.M)
    assert re.search(r"^From: synthtools:latest$", text, re.M)
    for section in ("%runscript", "%help", "%test"):
        assert re.search(rf"^{section}$", text, re.M), section
    assert 'exec "$@"' in text
    # The same dispatch as the Docker entry point, and the BIDS App is tested.
    runscript = re.search(r"^%runscript\n(.*?)^%", text, re.M | re.S).group(1)
    script = (ROOT / "container" / "entrypoint.sh").read_text()
    code = [ln.strip() for ln in script.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert code == [ln.strip() for ln in runscript.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert "synthtools-bids --help" in text.split("%test")[1]


def _fake_path(folder: Path) -> str:
    """A PATH with fake synthtools-bids and synthstrip that echo their name and arguments."""
    folder.mkdir()
    for name in ("synthtools-bids", "synthstrip"):
        tool = folder / name
        tool.write_text(f'#!/bin/sh\necho {name} "$@"\n')
        tool.chmod(0o755)
    return f"{folder}:/usr/bin:/bin"


@pytest.mark.parametrize("args,expected", [
    ([], "synthtools-bids --help"),
    (["/data/ds", "/data/out", "participant", "-t", "2"], "synthtools-bids /data/ds /data/out participant -t 2"),
    (["ds", "out", "group"], "synthtools-bids ds out group"),                  # relative dataset: not a command
    (["-h"], "synthtools-bids -h"),
    (["synthstrip", "in.nii.gz", "out.nii.gz"], "synthstrip in.nii.gz out.nii.gz"),
    (["sh", "-c", "echo sh ran"], "sh ran"),
])
def test_entrypoint_runs_the_bids_app_or_the_named_command(tmp_path, args, expected):
    import subprocess
    script = ROOT / "container" / "entrypoint.sh"
    assert script.stat().st_mode & 0o111, "entrypoint.sh must be executable"
    res = subprocess.run(["/bin/sh", str(script), *args], capture_output=True, text=True,
                         env={"PATH": _fake_path(tmp_path / "bin")}, cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == expected, res


@pytest.mark.parametrize("text,expected", [
    ("FROM a AS b\nRUN x \\\n  # comment\n  && y\n", [("FROM", "a AS b"), ("RUN", "x && y")]),
    ("# c\nARG A=1\n\nRUN pip install --no-cache-dir . \\\n && z\n",
     [("ARG", "A=1"), ("RUN", "pip install --no-cache-dir . && z")]),
])
def test_parser_joins_continuations(text, expected):
    assert df.instructions(text) == expected


def test_ci_builds_the_image_from_this_dockerfile_and_runs_it():
    # .ci/container is what makes the recipe real: CI must call it, and it must
    # build from the repository's Dockerfile with the Debian base and run the tools.
    assert re.search(r"^[^#\n]*\bbash \.ci/container\b", (ROOT / ".ci" / "run").read_text(), re.M)
    script = (ROOT / ".ci" / "container").read_text()
    assert re.search(r'pod build .*"\$\{build\[@\]\}"\s*\\\n\s*-t "\$IMAGE" \.', script)
    assert '--build-arg "BASE_IMAGE=$BASE"' in script
    for tool in ("synthstrip -i /data/", "synthstrip --example"):
        assert re.search(rf"^run {re.escape(tool)}", script, re.M), tool
