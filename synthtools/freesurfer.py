"""FreeSurfer's own SynthStrip and SynthSeg weight files, run through our tools.

``synthstrip --model $FREESURFER_HOME/models/synthstrip.1.pt`` and
``synthseg --model $FREESURFER_HOME/models/synthseg_2.0.h5`` (or
``synthseg_robust_2.0.h5``) load the user's FreeSurfer files into the
published architectures rebuilt in :mod:`synthtools.nets.freesurfer`; no
TensorFlow. We never ship or download these files.

This module reads the files (format detected from the first bytes: a torch
checkpoint or an HDF5 file), loads them strictly, and describes the result
as a :class:`synthtools.weights.Model` whose metadata names the source file,
its sha256 and "FreeSurfer weights", so that outputs recording provenance
record it. The inference adapters are :mod:`synthtools.freesurfer_strip`
and :mod:`synthtools.freesurfer_seg`.
"""
from __future__ import annotations

import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .nets.freesurfer import (SYNTHSEG_LABELS, LayoutError, SynthSegNet, SynthSegRobustNet, SynthStripNet,
                              check_layout, iter_prefixes, keras_to_torch, load_strict)
from .weights import Model, ModelError, sha256

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"          # torch.save's default (zip) format
PICKLE_MAGIC = b"\x80"             # torch.save's legacy format starts with a pickle protocol byte

# File names of the published models in $FREESURFER_HOME/models (FreeSurfer 7.4+).
FREESURFER_NAMES = ("synthstrip.1.pt", "synthstrip.nocsf.1.pt", "synthseg_2.0.h5", "synthseg_robust_2.0.h5",
                    "synthseg_1.0.h5", "synthseg_robust_1.0.h5")
PLACEHOLDERS = ("", "<undefined>", "undefined", "None")
SOURCE = "FreeSurfer weights"


# ------------------------------------------------------- model argument --

def resolve_model_arg(prog: str, value: str | None) -> str | None:
    """``--model`` as given, or None ("use the shipped model", with a note on
    stderr) for a placeholder a pipeline wrapper passes (``<undefined>``, an
    empty value) or a FreeSurfer default path (``.../models/synthstrip.1.pt``
    and the like) that does not exist because FreeSurfer is not installed."""
    if value is None:
        return None
    if value.strip() in PLACEHOLDERS:
        _note(prog, f"--model {value!r} is a placeholder: using the shipped model")
        return None
    p = Path(value)
    if p.name in FREESURFER_NAMES and not p.exists():
        _note(prog, f"--model {value}: no such FreeSurfer model file (FreeSurfer not installed?): "
                    "using the shipped model")
        return None
    return value


def _note(prog: str, message: str) -> None:
    print(f"{prog}: note: {message}", file=sys.stderr)


def file_kind(path: str | os.PathLike) -> str | None:
    """``"torch"`` or ``"hdf5"`` from a file's first bytes; None for a folder,
    a metadata.json or anything else (our own model formats)."""
    p = Path(path)
    if not p.is_file() or p.suffix == ".json":
        return None
    with open(p, "rb") as f:
        head = f.read(8)
    if head == HDF5_MAGIC:
        return "hdf5"
    if head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_MAGIC):
        return "torch"
    return None


def is_freesurfer_file(path: str | os.PathLike) -> bool:
    """A single weight file (torch checkpoint or HDF5) rather than one of our model folders."""
    return file_kind(path) is not None


# ------------------------------------------------------------- reading --

def _numpy_safe_globals() -> list:
    """numpy scalar/dtype types a training script may leave beside the weights
    (an epoch or loss as a numpy scalar): plain data, allowed to unpickle."""
    found = []
    for mod, name in (("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar")):
        try:
            found.append(getattr(__import__(mod, fromlist=[name]), name))
            break
        except (ImportError, AttributeError):
            continue
    found.append(np.dtype)
    found += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32")]
    return found


_NUMPY_SAFE = _numpy_safe_globals()


def read_torch_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``model_state_dict`` of a FreeSurfer SynthStrip checkpoint
    (ModelError with one line if it is not one). Read with
    ``weights_only=True``: a weight file never runs code."""
    try:
        with torch.serialization.safe_globals(_NUMPY_SAFE):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise ModelError(f"{path}: the checkpoint holds Python objects besides tensors{what}; refused "
                         "(loading it would run code)") from None
    except Exception as exc:  # corrupt zip, truncated file...
        raise ModelError(f"{path}: not a readable torch checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt:
        keys = sorted(ckpt)[:3] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ModelError(f"{path}: not a FreeSurfer SynthStrip checkpoint (no 'model_state_dict'; found {keys})")
    state = ckpt["model_state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: 'model_state_dict' is not a dict of tensors")
    return state


def read_keras_h5(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """Layer name -> {kernel, bias, gamma, beta, moving_mean, moving_variance}
    from a Keras HDF5 file in the Keras 2 layout (``save_weights`` or a whole
    ``model.save`` with its ``model_weights`` group; what FreeSurfer ships).
    Keras 3's ``.weights.h5`` names layers by class and creation order
    (``conv3d_7``), not by the names the architecture gives: refused."""
    try:
        import h5py
    except ImportError:
        raise ModelError(f"{path}: reading Keras HDF5 weights needs h5py "
                         "(pip install 'synthtools[freesurfer]')") from None
    try:
        with h5py.File(path, "r") as f:
            root = f["model_weights"] if "layer_names" not in f.attrs and "model_weights" in f else f
            if "layer_names" in root.attrs:
                return _keras2_layers(root)
            if "layers" in root and "vars" in root:
                raise ModelError(f"{path}: Keras 3 '.weights.h5' layout (layers stored by class, not by "
                                 "name); FreeSurfer's files and Keras 2 save_weights use the named layout")
    except OSError as exc:
        raise ModelError(f"{path}: not a readable HDF5 file ({exc})") from None
    raise ModelError(f"{path}: an HDF5 file without Keras weights (no 'layer_names' nor 'layers')")


def _text(x: Any) -> str:
    return x.decode("utf8") if isinstance(x, bytes) else str(x)


def _keras2_layers(root) -> dict[str, dict[str, np.ndarray]]:
    """Keras 2: one group per layer, its ``weight_names`` attribute listing
    datasets such as ``unet_conv_downarm_0_0/kernel:0``."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for layer in map(_text, root.attrs["layer_names"]):
        group = root[layer]
        for wname in map(_text, group.attrs.get("weight_names", [])):
            var = wname.split("/")[-1].split(":")[0]
            out.setdefault(layer, {})[var] = np.asarray(group[wname])
    return out


# ------------------------------------------------------------- loading --

def synthstrip_net_and_state(path: str | os.PathLike) -> tuple[SynthStripNet, dict[str, torch.Tensor]]:
    """The published SynthStrip network and the file's state dict (not yet loaded)."""
    if file_kind(path) != "torch":
        raise ModelError(f"{path}: not a FreeSurfer SynthStrip checkpoint (a torch .pt file); "
                         "SynthSeg's .h5 files go to synthseg --model")
    return SynthStripNet(), read_torch_checkpoint(path)


def synthseg_net_and_state(path: str | os.PathLike) -> tuple[torch.nn.Module, dict[str, torch.Tensor], bool]:
    """The published SynthSeg 2.0 or robust 2.0 network (robust if the file
    has the denoiser ``l2l``), the file's converted state dict, and the
    robust flag."""
    if file_kind(path) != "hdf5":
        raise ModelError(f"{path}: not a Keras HDF5 weight file; FreeSurfer's SynthStrip .pt files "
                         "go to synthstrip --model")
    layers = read_keras_h5(path)
    prefixes = iter_prefixes(layers)
    robust = "l2l" in prefixes
    if robust:
        like = layers.get("unet_likelihood", {}).get("kernel")
        if like is None or like.ndim != 5:
            raise ModelError(f"{path}: robust SynthSeg file without 'unet_likelihood' kernel")
        net: torch.nn.Module = SynthSegRobustNet(groups=int(like.shape[-1]))
        names = ("unet", "l2l", "unet2")
    elif prefixes == {"unet"}:
        net, names = SynthSegNet(), ("unet",)
    else:
        found = ", ".join(sorted(prefixes)) or "none"
        raise ModelError(f"{path}: not a SynthSeg 2.0 segmentation file (networks found: {found}; "
                         "the parcellation and QC files are not segmenters)")
    return net, keras_to_torch(layers, names), robust


def describe(path: str | os.PathLike, kind: str, **extra: Any) -> dict[str, Any]:
    """Metadata naming a loaded FreeSurfer file, in the keys of our own models'
    metadata.json (``name``, ``weights``: the weight file's name, ``sha256``)
    plus ``source`` (its absolute path) and ``provenance``: "FreeSurfer weights"."""
    p = Path(path).resolve()
    return {"name": f"FreeSurfer {p.name}", "weights": p.name, "source": str(p), "sha256": sha256(p),
            "provenance": SOURCE, "freesurfer": {"kind": kind, "file": p.name, **extra},
            "licence": "FreeSurfer Software License (the user's own copy; not shipped with synthtools)"}


def load_freesurfer_strip(path: str | os.PathLike, device: str = "cpu") -> Model:
    """A FreeSurfer SynthStrip checkpoint as a :class:`Model` (ModelError, one line)."""
    net, state = synthstrip_net_and_state(path)
    try:
        load_strict(net, state, "SynthStrip")
    except LayoutError as exc:
        raise ModelError(f"{path}: {exc}") from None
    nocsf = "nocsf" in Path(path).name
    meta = describe(path, "synthstrip", nocsf=nocsf)
    meta.update(task="skullstrip",
                input={"voxsize": 1.0, "orientation": "LIA", "multiple": 64},
                output={"type": "sdt", "channels": ["nocsf" if nocsf else "csf"], "band_mm": 100.0})
    return Model(net.eval().to(device), meta, Path(path))


def load_freesurfer_seg(path: str | os.PathLike, device: str = "cpu") -> Model:
    """A FreeSurfer SynthSeg 2.0 / robust 2.0 HDF5 file as a :class:`Model`."""
    net, state, robust = synthseg_net_and_state(path)
    try:
        load_strict(net, state, "SynthSeg-robust 2.0" if robust else "SynthSeg 2.0")
    except LayoutError as exc:
        raise ModelError(f"{path}: {exc}") from None
    from .seg.lut import names_for
    meta = describe(path, "synthseg", robust=robust)
    meta.update(task="segment",
                input={"voxsize": 1.0, "orientation": "RAS", "multiple": 32},
                output={"type": "softmax", "labels": list(SYNTHSEG_LABELS), "names": names_for(SYNTHSEG_LABELS)})
    return Model(net.eval().to(device), meta, Path(path))


def layout_report(path: str | os.PathLike, tool: str) -> tuple[bool, str]:
    """(ok, one line): how the file's tensors match the published layout."""
    try:
        if tool == "synthstrip":
            net, state = synthstrip_net_and_state(path)
            what = "SynthStrip"
        else:
            net, state, robust = synthseg_net_and_state(path)
            what = "SynthSeg-robust 2.0" if robust else "SynthSeg 2.0"
    except ModelError as exc:
        return False, str(exc)
    total = len([k for k in net.state_dict() if not k.endswith("num_batches_tracked")])
    matched, problem = check_layout(net, state)
    if problem:
        return False, f"layout: {matched}/{total} tensors match the published {what} layout; first mismatch: {problem}"
    return True, f"layout: {matched}/{total} tensors match the published {what} layout (names and shapes)"
