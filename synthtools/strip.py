"""The name ``synthtools.strip``, which has two meanings that both work:

- ``synthtools.strip(img)``: the Python API, :func:`synthtools.api.strip`;
- ``from synthtools.strip import brain_sdt, strip, ...``: the skull-stripping
  internals, which live in :mod:`synthtools.skullstrip` and are re-exported
  here.

Importing a submodule makes it an attribute of its package, so once this
module is imported ``synthtools.strip`` is this module; it is callable for
that reason. Nothing inside the package imports this module (the API and the
tools import :mod:`synthtools.skullstrip`), so the forward below is one-way:
this module -> :mod:`synthtools.api` -> :mod:`synthtools.skullstrip`.
"""
from __future__ import annotations

import sys

from .skullstrip import StripResult, boundaries, brain_sdt, channel_of, mask_from_sdt, strip

__all__ = ["StripResult", "boundaries", "brain_sdt", "channel_of", "mask_from_sdt", "strip"]


class _CallableModule(sys.modules[__name__].__class__):
    def __call__(self, image, **kwargs):
        from .api import strip as api_strip   # lazy: `import synthtools.strip` stays light
        return api_strip(image, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
