"""The package layout that pyproject.toml declares: only ``synthtools`` at the
top level, every source folder listed, every entry point importable, and no
absolute import of the old top-level ``training`` package left in the code."""
from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def source_dir(package: str) -> Path:
    """The folder setuptools builds ``package`` from (the longest package-dir prefix wins)."""
    mapping = SETUPTOOLS.get("package-dir", {})
    parts = package.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in mapping:
            return ROOT / mapping[prefix] / Path(*parts[n:])
    return ROOT / Path(*parts)


def test_only_synthtools_is_top_level():
    tops = {p.split(".")[0] for p in SETUPTOOLS["packages"]}
    assert tops == {"synthtools"}


def test_every_python_folder_is_a_listed_package():
    listed = set(SETUPTOOLS["packages"])
    for package in listed:
        assert (source_dir(package) / "__init__.py").is_file(), package
    # A folder with an __init__.py under a listed package that is not listed would be
    # left out of the wheel while working from the source tree.
    for package in listed:
        for init in source_dir(package).glob("*/__init__.py"):
            assert f"{package}.{init.parent.name}" in listed, init.parent


@pytest.mark.parametrize("name,target", sorted(PYPROJECT["project"]["scripts"].items()))
def test_entry_points_resolve(name, target):
    module, _, func = target.partition(":")
    assert module.split(".")[0] == "synthtools", name
    assert callable(getattr(importlib.import_module(module), func)), name


def test_training_imports_are_relative_or_under_synthtools():
    """Absolute ``training.*`` imports would load a second copy of the modules (or
    fail in an installed wheel, which has no top-level ``training``)."""
    roots = [ROOT / "training", ROOT / "synthtools", ROOT / "tests", ROOT / "benchmarks"]
    bad = []
    for path in (p for r in roots for p in r.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            bad += [f"{path.relative_to(ROOT)}:{node.lineno}" for n in names if n.split(".")[0] == "training"]
    assert not bad, bad



def test_surfa_is_a_test_dependency_only():
    """Only the tests import surfa (to judge our FreeSurfer files): it is in the
    [test] extra, not a runtime dependency, and no package module imports it."""
    deps = [d.split(">")[0].split("=")[0].split(";")[0].strip() for d in PYPROJECT["project"]["dependencies"]]
    assert "surfa" not in deps
    assert any(d.startswith("surfa") for d in PYPROJECT["project"]["optional-dependencies"]["test"])
    users = []
    for path in (p for r in (ROOT / "synthtools", ROOT / "training", ROOT / "models") for p in r.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            users += [f"{path.relative_to(ROOT)}:{node.lineno}" for n in names if n.split(".")[0] == "surfa"]
    assert users == []

def test_bundled_training_configs_are_package_data():
    from synthtools.training.recipes import CONFIGS
    patterns = SETUPTOOLS["package-data"]["synthtools.training.recipes"]
    assert CONFIGS == source_dir("synthtools.training.recipes") / "configs"
    assert any(f for pat in patterns for f in CONFIGS.parent.glob(pat))


def _module_files() -> dict[str, tuple[Path, bool]]:
    """{module name: (file, is a package)} for every package pyproject lists."""
    out = {}
    for package in SETUPTOOLS["packages"]:
        for path in source_dir(package).glob("*.py"):
            is_pkg = path.name == "__init__.py"
            out[package if is_pkg else f"{package}.{path.stem}"] = (path, is_pkg)
    return out


def _resolve(here: list[str], level: int, module: str | None) -> str:
    """Absolute name of ``from <level dots><module> import ...`` in package ``here``."""
    if not level:
        return module or ""
    return ".".join(here[:len(here) - level + 1] + [module or ""]).strip(".")


def _dynamic_import(node: ast.AST) -> tuple[int, str] | None:
    """(level, name) of ``import_module("name")`` / ``_import_module(".name", __name__)``."""
    if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)):
        return None
    func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
    if not func.endswith("import_module"):
        return None
    name = node.args[0].value
    level = len(name) - len(name.lstrip("."))
    return level, name[level:]


def _import_graph() -> dict[str, set[str]]:
    """Module -> the modules it imports: module-level and lazy (function-level)
    ``import``/``from`` statements alike (``ast.walk`` visits every node), and
    ``importlib.import_module`` calls with a literal name."""
    files = _module_files()
    graph = {name: set() for name in files}
    for name, (path, is_pkg) in files.items():
        here = name.split(".") if is_pkg else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                base = _resolve(here, node.level, node.module)
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif (dynamic := _dynamic_import(node)) is not None:
                targets = [_resolve(here, *dynamic)]
            else:
                continue
            graph[name] |= {t for t in targets if t in files and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while not comp or v not in comp:
                comp.add(stack.pop())
            on_stack.difference_update(comp)
            if len(comp) > 1:
                out.append(comp)

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    """No two modules of the wheel import each other, directly or through
    others, even lazily: every module can be read (and tested) on top of the
    ones below it."""
    graph = _import_graph()
    assert len(graph) > 80 and "synthtools.training.loop" in graph     # every package is parsed
    assert "synthtools.api" in graph["synthtools.strip"]                # a function-level import is an edge
    assert "synthtools.strip" in graph["synthtools"]                    # so is import_module(".strip", ...)
    assert graph["synthtools.seg.atlas"] and "synthtools.seg.segmenter" not in graph["synthtools.seg.atlas"]
    assert _cycles(graph) == []


def test_tools_never_import_training():
    """Imports run one way: ``synthtools.training`` uses the tools, never the
    reverse (not even lazily), so a tool runs without the training code."""
    graph = _import_graph()
    training = "synthtools.training"
    back = sorted(f"{m} -> {t}" for m, targets in graph.items() if not (m + ".").startswith(training + ".")
                  for t in targets if (t + ".").startswith(training + "."))
    assert back == []
    assert any(t.startswith("synthtools.") and not t.startswith(training)
               for t in graph["synthtools.training.recipes.base"])       # the allowed direction is seen


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_a_checkout_imported_first_maps_training_and_models_like_the_wheel():
    """CI installs the wheel, then runs ``python -m pytest`` at the repository
    root, which puts the checkout's ``synthtools/`` first on ``sys.path``; its
    ``synthtools.training`` and ``synthtools.models`` must then be the sibling
    folders (no site-packages here: ``-S``, nothing installed is seen)."""
    import subprocess
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import synthtools.training.recipes, synthtools.models; "
            "print(synthtools.training.recipes.__file__); print(synthtools.models.__file__); "
            "import importlib.util as u; print(u.find_spec('synthtools.benchmarks'))")
    out = subprocess.run([sys.executable, "-S", "-c", code, str(ROOT)], capture_output=True, text=True, check=True)
    recipes, models, other = out.stdout.split()
    assert Path(recipes) == ROOT / "training" / "recipes" / "__init__.py"
    assert Path(models) == ROOT / "models" / "__init__.py"
    assert other == "None"      # only those two folders are mapped


# ------------------------------------------------------------------ the built wheel --

@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory) -> list[str]:
    """The file list of a wheel built (setuptools' PEP 517 hook, as pip calls it)
    from a copy of the source, so the checkout gets no build/ or egg-info."""
    import shutil
    import subprocess
    import zipfile
    pytest.importorskip("setuptools", minversion="70.1")   # [test] extra; builds wheels without 'wheel'
    src = tmp_path_factory.mktemp("src")
    junk = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in {d.split(".")[0] for d in SETUPTOOLS["packages"]} | set(SETUPTOOLS.get("package-dir", {}).values()):
        shutil.copytree(ROOT / name, src / name, ignore=junk)
    out = tmp_path_factory.mktemp("wheel")
    code = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    with zipfile.ZipFile(out / done.stdout.split()[-1]) as z:
        return z.namelist()


def test_wheel_holds_only_synthtools(wheel_files):
    tops = {f.split("/")[0] for f in wheel_files}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"synthtools"}


def test_wheel_leaves_out_runs_logs_and_plots(wheel_files):
    bad = [f for f in wheel_files if "/runs/" in f or f.startswith("runs/")
           or f.endswith((".csv", ".jsonl", ".png", ".out", ".log", ".err"))]
    assert bad == []


def test_wheel_weights_are_the_shipped_models_only(wheel_files):
    shipped = {p.parent.name for p in (ROOT / "models").glob("*/metadata.json")}
    weights = [f for f in wheel_files if f.endswith((".pt", ".pth", ".ckpt"))]
    assert sorted(weights) == sorted(f"synthtools/models/{m}/weights.pt" for m in shipped)
    assert all(f"synthtools/models/{m}/metadata.json" in wheel_files for m in shipped)
    assert "synthtools/data/example_flair.nii.gz" in wheel_files   # --example


def test_wheel_bundles_the_configs_the_cli_names(wheel_files):
    from synthtools.training.recipes import CONFIGS
    bundled = {f.rsplit("/", 1)[1] for f in wheel_files if f.startswith("synthtools/training/recipes/configs/")}
    assert bundled == {p.name for p in CONFIGS.glob("*.toml")}
    assert {"skullstrip.toml", "segment.toml", "rigid.toml", "affine.toml"} <= bundled
    # Configs of runs that did not learn stay in runs/ beside their logs.
    assert not bundled & {"deform.toml", "deform_warmup.toml"}
    assert (ROOT / "runs" / "synthmorph_deform" / "config.toml").is_file()
