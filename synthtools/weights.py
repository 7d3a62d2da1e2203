"""Shipped models: ``models/<name>/`` holds ``weights.pt`` (a half-precision
state dict, no optimizer state) and ``metadata.json`` (architecture, input
space, output type, training provenance, validation metrics, sha256 of the
weights). Installed as the ``synthtools.models`` package so a normal pip
install and the container find them."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .nets.unet import UNet


class ModelError(RuntimeError):
    """A model that is missing, corrupted or unusable; one-line message."""


@dataclass
class Model:
    net: torch.nn.Module
    meta: dict[str, Any]
    path: Path
    bf16: bool = False


def models_dir() -> Path:
    """Folder of the shipped models (``SYNTHTOOLS_MODELS`` overrides it)."""
    env = os.environ.get("SYNTHTOOLS_MODELS")
    if env:
        return Path(env)
    try:
        return Path(str(resources.files("synthtools.models")))
    except ModuleNotFoundError:
        # Source checkout run via PYTHONPATH: the package is the repo's
        # models/ folder, not importable as synthtools.models there.
        return Path(__file__).resolve().parents[1] / "models"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_net(arch: dict[str, Any]) -> torch.nn.Module:
    """Network from the metadata's ``architecture`` block."""
    arch = dict(arch)
    kind = arch.pop("type", "unet")
    if kind == "unet":
        return UNet(**arch)
    if kind in ("barycenter_affine", "svf_unet", "feature_svf"):
        from .nets.registration import BarycenterAffine, FeatureSVFNet, SVFNet
        return {"barycenter_affine": BarycenterAffine, "svf_unet": SVFNet, "feature_svf": FeatureSVFNet}[kind](**arch)
    raise ModelError(f"unknown architecture type {kind!r}")


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A model folder from a shipped model name, a folder or a metadata file."""
    p = Path(name_or_path)
    if p.suffix == ".json" and p.is_file():
        return p.parent
    if p.is_dir():
        return p
    shipped = models_dir() / str(name_or_path)
    if shipped.is_dir():
        return shipped
    raise ModelError(f"{name_or_path}: no such model (looked in {models_dir()})")


def read_metadata(folder: Path) -> dict[str, Any]:
    """A model folder's ``metadata.json``; ModelError (one line) if unreadable."""
    meta_path = Path(folder) / "metadata.json"
    try:
        return json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{meta_path}: unreadable model metadata ({e.__class__.__name__})") from None


def load_model(name_or_path: str | os.PathLike, device: str | torch.device = "cpu") -> Model:
    """Load and verify a model; raises ModelError with a one-line message."""
    folder = resolve(name_or_path)
    meta = read_metadata(folder)
    weights = folder / meta.get("weights", "weights.pt")
    if not weights.is_file():
        raise ModelError(f"{weights}: model weights missing (model not yet available)")
    digest = sha256(weights)
    if meta.get("sha256") and digest != meta["sha256"]:
        raise ModelError(f"{weights}: sha256 mismatch ({digest[:12]} != {meta['sha256'][:12]}): corrupted download?")
    net = build_net(meta["architecture"])
    state = torch.load(weights, map_location="cpu", weights_only=True)
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    net.eval().to(device)
    dev = torch.device(device)
    if dev.type == "cpu" and net.config.get("ndim", 3) == 3:
        net = net.to(memory_format=torch.channels_last_3d)
    bf16 = bool(meta.get("inference", {}).get("bf16", False)) and dev.type == "cpu" and cpu_has_bf16()
    return Model(net, meta, folder, bf16)


def cpu_has_bf16() -> bool:
    try:
        return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX")
    except AttributeError:
        return False


def save_model(net: torch.nn.Module, meta: dict[str, Any], folder: str | os.PathLike,
               dtype: torch.dtype = torch.float16) -> Path:
    """Write ``weights.pt`` (parameters in ``dtype``; buffers such as batch-norm
    statistics as they are, since they are few and a variance may underflow
    fp16) and ``metadata.json`` with its sha256."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "weights.pt"
    params = {name for name, _ in net.named_parameters()}
    state = {k: v.detach().to("cpu", dtype if k in params else v.dtype) for k, v in net.state_dict().items()}
    tmp = weights.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, weights)
    meta = dict(meta, weights="weights.pt", sha256=sha256(weights))
    meta.setdefault("architecture", dict(type=getattr(net, "arch_type", "unet"), **getattr(net, "config", {})))
    (folder / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder
