"""Running a network on a conformed image: intensity normalisation, device,
threads and precision handling shared by every tool."""
from __future__ import annotations

import math

import torch

from .weights import Model


def normalize_intensities(x: torch.Tensor, upper: float = 99.5) -> torch.Tensor:
    """Map intensities to [0, 1]: minimum to 0, the ``upper`` percentile to 1,
    clipped, like the synthetic training images (min-max then gamma)."""
    x = x.float()
    lo = x.min()
    flat = x.flatten()
    step = max(1, flat.numel() // 2_000_000)  # a subsample is enough for a percentile
    hi = upper_quantile(flat[::step], upper / 100)
    if hi <= lo:
        hi = x.max()
    return ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)


def upper_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values, q)`` (linear interpolation) of a 1D tensor
    for q near 1, from its top ``(1 - q) n`` values: ~12x faster than the
    full sort (145 -> 13 ms for 1.8M voxels; 6 calls in one registration)."""
    n = values.numel()
    pos = q * (n - 1)
    i = math.floor(pos)
    top = torch.topk(values, n - i, sorted=True).values      # descending: top[-1] is the i-th smallest
    return torch.lerp(top[-1], top[-2] if n - i >= 2 else top[-1], pos - i)


@torch.inference_mode()
def predict(model: Model, x: torch.Tensor) -> torch.Tensor:
    """Network output for a (C, *S) conformed input; returns (C_out, *S) float32 on CPU."""
    net = model.net
    device = next(net.parameters()).device
    if getattr(net, "ndim", 3) == 2 and x.ndim == 4:
        return _predict_slices(model, x, device)
    xb = x[None].to(device)
    if device.type == "cpu":
        xb = xb.contiguous(memory_format=torch.channels_last_3d) if xb.ndim == 5 else xb
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=model.bf16):
        y = net(xb)
    return y[0].float().cpu()


def _predict_slices(model: Model, x: torch.Tensor, device: torch.device, chunk: int = 16) -> torch.Tensor:
    """A 2D network (a pilot model trained on single slices) on a 3D
    (C, X, Y, Z) input: slice by slice along the last axis, ``chunk``
    slices per batch; returns (C_out, X, Y, Z)."""
    out = []
    for z0 in range(0, x.shape[-1], chunk):
        xb = x[..., z0:z0 + chunk].permute(3, 0, 1, 2).to(device)   # (slices, C, X, Y)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=model.bf16):
            y = model.net(xb)
        out.append(y.float().cpu().permute(1, 2, 3, 0))
    return torch.cat(out, dim=-1)
