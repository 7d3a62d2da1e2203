"""synthtools: pretrained, domain-randomized neuroimaging models in pure PyTorch."""
from __future__ import annotations


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
