"""synthtools: pretrained domain-randomized neuroimaging models in PyTorch."""
from importlib import import_module as _import_module

# --- Python API (synthtools.api): synthtools.strip(img), synthtools.segment(img),
# synthtools.register(moving, fixed, mode=...). Imported on first use, so that
# `import synthtools` stays fast.
__all__ = ["strip", "segment", "register", "StripOutput", "SegmentOutput", "RegisterOutput"]


def __getattr__(name: str):
    # 'strip' is also the submodule synthtools.strip; that module is callable
    # (it forwards to synthtools.api.strip), so both meanings work.
    if name == "strip":
        return _import_module(".strip", __name__)
    if name in __all__:
        return getattr(_import_module(".api", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
# --- end of Python API ---
