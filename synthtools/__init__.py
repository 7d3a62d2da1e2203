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


def _map_checkout_folders() -> None:
    """In a source checkout, ``training/`` and ``models/`` sit beside this
    package (the layout the project keeps) and install as
    ``synthtools.training`` / ``synthtools.models``. When this folder is
    imported straight from the checkout (``python -m pytest`` at the
    repository root puts it first on ``sys.path``, ahead of an installed
    wheel), give those two names the sibling folders, as the wheel does."""
    import os
    import sys
    from importlib.util import spec_from_file_location

    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    folders = {f"{__name__}.{name}": os.path.join(root, name) for name in ("training", "models")
               if not os.path.isdir(os.path.join(here, name))
               and os.path.isfile(os.path.join(root, name, "__init__.py"))}
    if not folders or not os.path.isfile(os.path.join(root, "pyproject.toml")):
        return

    class _CheckoutFinder:
        @staticmethod
        def find_spec(name, path=None, target=None):
            folder = folders.get(name)
            if folder is None:
                return None
            return spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                           submodule_search_locations=[folder])

    sys.meta_path.insert(0, _CheckoutFinder())   # ahead of an editable install of another checkout


_map_checkout_folders()

# --- Python API (synthtools.api): synthtools.strip(img), synthtools.segment(img),
# synthtools.register(moving, fixed, mode=...). Imported on first use, so that
# `import synthtools` stays fast.
__all__ = ["__version__", "strip", "segment", "register", "StripOutput", "SegmentOutput", "RegisterOutput"]


def __getattr__(name: str):
    # 'strip' is also the submodule synthtools.strip (the skullstrip internals,
    # re-exported); that module is callable (it forwards to synthtools.api.strip),
    # so both meanings work whichever is imported first.
    if name == "strip":
        return _import_module(".strip", __name__)
    if name in __all__[1:]:
        return getattr(_import_module(".api", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
# --- end of Python API ---
