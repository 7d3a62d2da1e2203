"""The Dockerfile's install steps, outside Docker.

``python .ci/dockerfile_pip.py --run`` runs, in the current environment (a
fresh venv, activated) and from the repository root, every RUN instruction of
the Dockerfile's build stage that calls ``pip install``, exactly as written,
with ``/bin/sh -c`` as Docker does and the stage's ARG defaults in the
environment (an ARG already set in the environment wins), then checks from
outside the source tree that the tools answer ``-h`` and that the shipped
weights were installed. Without ``--run`` it prints those instructions.
``tests/test_container_recipe.py`` reads the Dockerfile with the same parser."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuations joined."""
    out, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue   # comment lines inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1].rstrip() + " "
            continue
        current += stripped
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def stages(text: str) -> list[list[tuple[str, str]]]:
    """Instructions grouped by build stage (the global ARGs before the first FROM are dropped)."""
    result: list[list[tuple[str, str]]] = []
    for ins in instructions(text):
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def arg_defaults(stage: list[tuple[str, str]]) -> dict[str, str]:
    args = {}
    for word, rest in stage:
        if word == "ARG":
            name, _, value = rest.partition("=")
            args[name.strip()] = value.strip().strip('"')
    return args


def pip_runs(text: str) -> tuple[dict[str, str], list[str]]:
    """ARG defaults and the ``pip install`` RUN commands of the stage that has them."""
    for stage in stages(text):
        runs = [rest for word, rest in stage if word == "RUN" and re.search(r"\bpip install\b", rest)]
        if runs:
            return arg_defaults(stage), runs
    return {}, []


TOOLS = ("synthstrip", "synthseg", "synthmorph", "synthgen")


def check_installed() -> None:
    """From outside the source tree: every tool answers ``-h`` and every
    shipped model file under models/ is in the installed synthtools.models."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        for tool in TOOLS:
            subprocess.run([tool, "-h"], cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        code = "import synthtools.models as m, pathlib; print(pathlib.Path(m.__file__).parent)"
        installed = Path(subprocess.run([sys.executable, "-c", code], cwd=tmp, check=True,
                                        capture_output=True, text=True).stdout.strip())
    if installed.resolve() == (ROOT / "models").resolve():
        sys.exit("synthtools.models resolves to the source tree, not the installed package")
    # What pyproject's package-data ships: weights, metadata, model cards, atlases (the
    # training logs and plots stay in the repository).
    shipped = [p.relative_to(ROOT / "models") for p in (ROOT / "models").glob("*/*")
               if p.suffix in (".pt", ".json", ".md") or p.name.endswith(".nii.gz")]
    missing = [str(p) for p in shipped if not (installed / p).is_file()]
    if missing:
        sys.exit(f"not installed with the package: {missing}")
    print(f"installed: {', '.join(TOOLS)} answer -h; {len(shipped)} model files in {installed}")


def main() -> None:
    args, runs = pip_runs((ROOT / "Dockerfile").read_text())
    if not runs:
        sys.exit("Dockerfile: no RUN ... pip install ... found")
    env = dict(os.environ)
    for name, value in args.items():
        env.setdefault(name, value)
    for cmd in runs:
        print(f"+ {cmd}", flush=True)
        if "--run" in sys.argv[1:]:
            subprocess.run(["/bin/sh", "-c", cmd], cwd=ROOT, env=env, check=True)
    if "--run" in sys.argv[1:]:
        check_installed()


if __name__ == "__main__":
    main()
