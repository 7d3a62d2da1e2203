"""Running a network on a conformed image: intensity normalisation, device,
threads and precision handling shared by every tool."""
from __future__ import annotations

import torch

from .weights import Model


def normalize_intensities(x: torch.Tensor, upper: float = 99.5) -> torch.Tensor:
    """Map intensities to [0, 1]: minimum to 0, the ``upper`` percentile to 1,
    clipped, like the synthetic training images (min-max then gamma)."""
    x = x.float()
    lo = x.min()
    flat = x.flatten()
    step = max(1, flat.numel() // 2_000_000)  # a subsample is enough for a percentile
    hi = torch.quantile(flat[::step], upper / 100)
    if hi <= lo:
        hi = x.max()
    return ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)


@torch.inference_mode()
def predict(model: Model, x: torch.Tensor) -> torch.Tensor:
    """Network output for a (C, *S) conformed input; returns (C_out, *S) float32 on CPU."""
    net = model.net
    device = next(net.parameters()).device
    xb = x[None].to(device)
    if device.type == "cpu":
        xb = xb.contiguous(memory_format=torch.channels_last_3d) if xb.ndim == 5 else xb
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=model.bf16):
        y = net(xb)
    return y[0].float().cpu()
