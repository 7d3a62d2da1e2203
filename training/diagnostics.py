"""Feature-invariance diagnostic (the paper's Fig. 6): run a network on two
co-registered scans of one subject that differ in contrast (or resolution)
and measure, layer by layer, how similar its features are.

Both scans are conformed to the model's input space on ONE grid (the
second is resampled onto the first's conformed grid), normalised like
inference, and passed through ``net.features()`` (every U-Net block). Per
layer and channel the features are standardised inside the head (zero mean,
unit SD over the head voxels, separately for each scan); we report

  ncc  the normalised cross-correlation of the two scans' standardised
       features, averaged over channels (1: identical up to gain/offset);
  mad  the mean absolute difference of the standardised features (0: equal).

Channels constant inside the head for both scans (dead channels) are left
out of both; a channel constant for only one scan counts as NCC 0.
A contrast-invariant network keeps NCC high and MAD low at every layer;
a network trained on one contrast does not."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from synthtools.space import ModelSpace


@dataclass
class LayerStats:
    layer: int
    channels: int
    shape: tuple[int, ...]
    ncc: float
    mad: float


def head_mask(*images: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Head region of normalised [0, 1] images: any image above
    ``threshold``, holes filled, largest connected component."""
    from scipy import ndimage
    m = np.zeros(images[0].shape, bool)
    for x in images:
        m |= x.cpu().numpy() > threshold
    lab, n = ndimage.label(m)
    if n > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        m = lab == sizes.argmax()
    return torch.from_numpy(ndimage.binary_fill_holes(m))


def _mask_at(mask: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The head mask on a feature grid: voxels at least half inside."""
    m = mask[None, None].float()
    if tuple(m.shape[2:]) != tuple(shape):
        pool = {2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[len(shape)]
        m = pool(m, tuple(shape))
    return m[0, 0] >= 0.5


def _standardise(f: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, N) features inside the mask -> standardised features, live channels."""
    v = f[:, m].double()
    mean = v.mean(1, keepdim=True)
    sd = v.std(1, unbiased=False, keepdim=True)
    live = sd[:, 0] > 1e-8 * (1 + mean[:, 0].abs())
    return torch.where(live[:, None], (v - mean) / sd.clamp_min(1e-30), torch.zeros_like(v)), live


def compare_features(fa: Sequence[torch.Tensor], fb: Sequence[torch.Tensor], mask: torch.Tensor) -> list[LayerStats]:
    """Per-layer NCC and MAD of two feature lists (each (1, C, *S) or
    (C, *S)) inside ``mask`` (a boolean head mask on the input grid)."""
    out = []
    for k, (a, b) in enumerate(zip(fa, fb)):
        a, b = (x[0] if x.ndim == mask.ndim + 2 else x for x in (a, b))
        m = _mask_at(mask, a.shape[1:])
        if not m.any():
            out.append(LayerStats(k, a.shape[0], tuple(a.shape[1:]), float("nan"), float("nan")))
            continue
        za, la = _standardise(a, m)
        zb, lb = _standardise(b, m)
        keep = la | lb
        if not keep.any():   # every channel dead for both scans: identical
            out.append(LayerStats(k, a.shape[0], tuple(a.shape[1:]), 1.0, 0.0))
            continue
        ncc = (za[keep] * zb[keep]).mean(1)   # Pearson r per channel (0 where one is constant)
        mad = (za[keep] - zb[keep]).abs().mean()
        out.append(LayerStats(k, a.shape[0], tuple(a.shape[1:]), float(ncc.mean()), float(mad)))
    return out


def features(net: torch.nn.Module, x: torch.Tensor, chunk: int = 16) -> list[torch.Tensor]:
    """``net.features`` of a (X, Y, Z) image: each layer (C, *S). A 2D network
    runs slice by slice along the last axis (as at inference; a 2.5D one
    reads each slice's neighbours as channels, zeros past the grid)."""
    with torch.inference_mode():
        if getattr(net, "ndim", 3) == 3:
            return [f[0].float() for f in net.features(x[None, None].float())]
        from synthtools.infer import slab_batches
        slab = (getattr(net, "config", {}).get("in_channels", 1) - 1) // 2
        parts: list[list[torch.Tensor]] = []
        for xb in slab_batches(x[None], slab, chunk):
            parts.append([f.float().permute(1, 2, 3, 0) for f in net.features(xb.float())])
        return [torch.cat(layer, dim=-1) for layer in zip(*parts)]


def prepare_pair(space: ModelSpace, vol_a, vol_b) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Both scans on the first's conformed grid (the model's input space),
    each normalised like inference; returns (a, b, grid affine)."""
    from synthtools.conform import resample
    from synthtools.infer import normalize_intensities
    conf = space.conform(vol_a.data, vol_a.affine)
    b = resample(np.asarray(vol_b.data, np.float32), vol_b.affine, conf.affine, conf.shape, order=1)
    return normalize_intensities(conf.data), normalize_intensities(torch.as_tensor(b)), conf.affine


def invariance(net: torch.nn.Module, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None):
    """(stats per layer, features of a, features of b, mask) for two
    normalised images on one grid."""
    mask = head_mask(a, b) if mask is None else mask.bool()
    fa, fb = features(net, a), features(net, b)
    return compare_features(fa, fb, mask), fa, fb, mask


def table_markdown(stats: list[LayerStats], names: tuple[str, str] = ("A", "B")) -> str:
    lines = [f"Feature invariance: {names[0]} vs {names[1]} (standardised inside the head)", "",
             "| layer | channels | grid | NCC | MAD |", "|---:|---:|---|---:|---:|"]
    for s in stats:
        lines.append(f"| {s.layer} | {s.channels} | {'x'.join(map(str, s.shape))} | {s.ncc:.3f} | {s.mad:.3f} |")
    return "\n".join(lines) + "\n"


def table_csv(stats: list[LayerStats]) -> str:
    rows = ["layer,channels,grid,ncc,mad"]
    rows += [f"{s.layer},{s.channels},{'x'.join(map(str, s.shape))},{s.ncc:.6f},{s.mad:.6f}" for s in stats]
    return "\n".join(rows) + "\n"


def plot(stats: list[LayerStats], a: torch.Tensor, b: torch.Tensor, fa, fb, mask: torch.Tensor,
         png: str | Path, names: tuple[str, str] = ("A", "B")) -> None:
    """Fig. 6-style figure: the two inputs and one feature channel of a few
    layers (middle slice, same channel for both scans), and NCC/MAD per layer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(fa)
    layers = sorted({0, n // 2 - 1 if n > 2 else 0, n // 2, n - 1})
    fig, ax = plt.subplots(2, len(layers) + 2, figsize=(2.4 * (len(layers) + 2), 5))

    def mid(x: torch.Tensor) -> np.ndarray:     # middle slice along the last axis, as an image
        return np.rot90(x[..., x.shape[-1] // 2].cpu().numpy())

    for row, (img, feats, name) in enumerate(((a, fa, names[0]), (b, fb, names[1]))):
        ax[row, 0].imshow(mid(img), cmap="gray")
        ax[row, 0].set_title(f"{name}: input", fontsize=8)
        for j, k in enumerate(layers):
            ref = fa[k]
            m = _mask_at(mask, ref.shape[1:])
            ch = int(ref[:, m].double().var(1).argmax()) if m.any() else 0   # A's most varying channel
            f = feats[k][ch]
            inside = f[m] if m.any() else f.flatten()
            lo, hi = float(inside.min()), float(inside.max())
            ax[row, j + 1].imshow(mid(f), cmap="viridis", vmin=lo, vmax=hi if hi > lo else lo + 1)
            ax[row, j + 1].set_title(f"layer {k}, channel {ch}", fontsize=8)
    for r in ax[:, :-1].ravel():
        r.axis("off")
    gs = ax[0, -1].get_gridspec()
    for r in ax[:, -1]:
        r.remove()
    big = fig.add_subplot(gs[:, -1])
    x = [s.layer for s in stats]
    big.plot(x, [s.ncc for s in stats], marker="o", label="NCC")
    big.plot(x, [s.mad for s in stats], marker="s", label="MAD")
    finite = [v for s in stats for v in (s.ncc, s.mad) if np.isfinite(v)]
    big.set(xlabel="layer", title="feature similarity",
            ylim=(min([0.0, *finite]) - 0.05, max([1.05, *finite]) + 0.05))
    big.set_xticks(x)
    big.axhline(1, color="0.8", lw=0.5)
    big.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def write_report(stats, a, b, fa, fb, mask, prefix: str | Path, names=("A", "B")) -> list[Path]:
    """PREFIX.md, PREFIX.csv and PREFIX.png."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    md, csv, png = (Path(f"{prefix}.{ext}") for ext in ("md", "csv", "png"))
    md.write_text(table_markdown(stats, names))
    csv.write_text(table_csv(stats))
    plot(stats, a, b, fa, fb, mask, png, names)   # matplotlib is a dependency: never skip the figure
    return [md, csv, png]
