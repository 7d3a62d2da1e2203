"""synthtools: pretrained, domain-randomized neuroimaging models in pure PyTorch."""
from __future__ import annotations

from importlib import import_module as _import_module


def _version() -> str:
    """The installed distribution's version; from a source tree, pyproject.toml's."""
    from importlib import metadata

    try:
        return metadata.version("synthtools")
    except metadata.PackageNotFoundError:
        pass
    import os
    import re

    pyproject = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")
    try:
        with open(pyproject, encoding="utf-8") as f:
            found = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.MULTILINE)
    except OSError:
        found = None
    return found.group(1) if found else "0+unknown"


__version__ = _version()

# --- Python API (synthtools.api): synthtools.strip(img), synthtools.segment(img),
# synthtools.register(moving, fixed, mode=...). Imported on first use, so that
# `import synthtools` stays fast.
__all__ = ["__version__", "strip", "segment", "register", "StripOutput", "SegmentOutput", "RegisterOutput"]


def __getattr__(name: str):
    # 'strip' is also the submodule synthtools.strip; that module is callable
    # (it forwards to synthtools.api.strip), so both meanings work.
    if name == "strip":
        return _import_module(".strip", __name__)
    if name in __all__[1:]:
        return getattr(_import_module(".api", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
# --- end of Python API ---
