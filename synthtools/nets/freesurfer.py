"""FreeSurfer's published SynthStrip and SynthSeg networks, rebuilt in PyTorch
so that the weight files a FreeSurfer 7.4+ install carries can run here
without TensorFlow. We never ship or download those files: they are the
user's, under FreeSurfer's licence.

Facts checked against the public sources (our own code, written from them):

SynthStrip (``mri_synthstrip/mri_synthstrip`` and ``mri_synthstrip/synthstrip``
in freesurfer/freesurfer, class ``StripModel`` with its defaults
nb_features=16, nb_levels=7, feat_mult=2, max_features=64,
nb_conv_per_level=2, max_pool=2):

- level features 16, 32, 64, 64, 64, 64, 64 (16 * 2**k clipped at 64);
  the encoder has 6 levels (the last feature count is the coarsest level,
  which is the decoder's first block), 2 convolutions each;
- every convolution is 3x3x3 with padding 1 and a bias, followed by
  LeakyReLU(0.2), except the last one (no activation);
- encoder: convolutions, keep the output for the skip, max-pool 2;
  decoder: 6 levels of 2 convolutions, each followed by nearest upsampling
  x2 and concatenation ``[upsampled, skip]`` (the upsampled tensor first),
  so the decoder's first block runs at 1/64 resolution and inputs must be
  multiples of 64 voxels;
- decoder features 64 x 10, then 32, 32; then two 16-channel convolutions
  at full resolution and a final **3x3x3** (not 1x1x1) 1-channel
  convolution without activation: the signed distance (mm);
- state-dict keys ``encoder.{level}.{conv}.conv.{weight,bias}``,
  ``decoder.{level}.{conv}.conv.*``, ``remaining.{0,1,2}.conv.*``; the
  checkpoint is a dict whose ``model_state_dict`` holds them.

SynthSeg 2.0 and robust 2.0 (``mri_synthseg/mri_synthseg``: ``build_model``,
``unet``, ``conv_enc``, ``conv_dec``; the same neurite code as the SynthSeg
repository's ``ext/neuron/models.py`` used by ``SynthSeg/predict_synthseg.py``):

- U-Net of 5 levels, 24 features doubling per level (24 ... 384), 2
  convolutions per level, kernel 3, 'same' padding, bias, ELU after every
  convolution; **one** batch normalisation per level (axis -1, Keras
  epsilon 1e-3), after the level's second convolution+ELU, named
  ``{p}_bn_down_{l}`` / ``{p}_bn_up_{l}``;
- max-pool 2 after each encoder level but the last; the decoder upsamples
  (nearest, x2, ``{p}_up_{5+l}``) and concatenates ``[skip, upsampled]``
  (the skip first) where the skip is the output of the encoder's last
  convolution ``{p}_conv_downarm_{l}_1`` **before** its batch norm;
- convolutions ``{p}_conv_downarm_{level}_{conv}`` and
  ``{p}_conv_uparm_{5+level}_{conv}``; then a 1x1x1 ``{p}_likelihood``
  convolution and a softmax ``{p}_prediction``;
- SynthSeg 2.0: prefix ``unet``, 1 input channel, 33 labels (sorted
  FreeSurfer values), then a Gaussian blur of sigma 0.5 voxel (3x3x3
  kernel, zero padding) of the posteriors, and (unless --fast or robust)
  a left-right flip test-time augmentation averaging the two blurred
  posteriors with the left/right channels swapped;
- robust 2.0: ``unet`` (1 channel -> G label groups), argmax and one-hot,
  the denoiser ``l2l`` (G -> G, 16 features, **kernel 5**, skips only on the
  two coarsest decoder levels: ``skip_n_concatenations=2``), argmax and
  one-hot, then ``unet2`` on ``[image, one-hot]`` (1 + G channels -> 33
  labels); no blur, no flip (robust forces --fast). G is read from the
  file (the label list ``synthseg_denoiser_labels_2.0.npy`` is binary and
  was not readable here; SynthSeg's tutorial 7 trains this stage with 5
  groups);
- Keras kernels are stored (kx, ky, kz, in, out), channels last; PyTorch
  wants (out, in, kx, ky, kz): a transpose, no flip (both correlate).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SynthStripNet", "NeuriteUNet", "SynthSegNet", "SynthSegRobustNet", "LayoutError",
           "check_layout", "load_strict", "keras_to_torch", "published_blur", "SYNTHSEG_LABELS"]

# Output channel -> FreeSurfer label of SynthSeg 2.0: mri_synthseg sorts the
# label list (np.unique), so channel k is the k-th smallest value.
SYNTHSEG_LABELS = (0, 2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 26, 28,
                   41, 42, 43, 44, 46, 47, 49, 50, 51, 52, 53, 54, 58, 60)

KERAS_BN_EPS = 1e-3   # keras.layers.BatchNormalization's default epsilon


class LayoutError(ValueError):
    """Weights that do not fit the published layout; one-line message."""


# ------------------------------------------------------------ SynthStrip --

class _StripConv(nn.Module):
    """One 3x3x3 convolution (the checkpoint's ``*.conv``), LeakyReLU(0.2) unless last."""

    def __init__(self, cin: int, cout: int, activate: bool = True):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, 3, padding=1)
        self.activate = activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return F.leaky_relu(x, 0.2) if self.activate else x


def strip_features(base: int = 16, levels: int = 7, mult: int = 2, cap: int = 64) -> list[int]:
    """Features per level of FreeSurfer's StripModel: base * mult**k clipped at cap."""
    return [int(min(cap, max(1, round(base * mult ** k)))) for k in range(levels)]


class SynthStripNet(nn.Module):
    """FreeSurfer's SynthStrip U-Net (see the module docstring); output: the
    signed distance to the brain boundary (mm) on the input grid, whose
    sides must be multiples of 64 voxels."""

    def __init__(self, levels: int = 7, convs: int = 2):
        super().__init__()
        feats = strip_features(levels=levels)
        enc = [f for f in feats[:-1] for _ in range(convs)]
        dec = [f for f in reversed(feats) for _ in range(convs)]
        dec, final = dec[:len(enc)], dec[len(enc):]
        self.encoder, self.decoder = nn.ModuleList(), nn.ModuleList()
        cin, skips = 1, []
        def block(cin: int, widths: list[int]) -> tuple[nn.ModuleList, int]:
            convs_ = nn.ModuleList()
            for w in widths:
                convs_.append(_StripConv(cin, w))
                cin = w
            return convs_, cin
        for lvl in range(levels - 1):
            b, cin = block(cin, enc[lvl * convs:(lvl + 1) * convs])
            self.encoder.append(b)
            skips.append(cin)
        for lvl in range(levels - 1):
            b, cin = block(cin, dec[lvl * convs:(lvl + 1) * convs])
            self.decoder.append(b)
            cin += skips[-1 - lvl]          # concatenated with that level's skip
        self.remaining = nn.ModuleList()
        for f in final:
            self.remaining.append(_StripConv(cin, f))
            cin = f
        self.remaining.append(_StripConv(cin, 1, activate=False))
        self.multiple = 2 ** (levels - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.encoder:
            for conv in block:
                x = conv(x)
            skips.append(x)
            x = F.max_pool3d(x, 2)
        for block in self.decoder:
            for conv in block:
                x = conv(x)
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = torch.cat([x, skips.pop()], dim=1)
        for conv in self.remaining:
            x = conv(x)
        return x


# -------------------------------------------------------------- SynthSeg --

class NeuriteUNet(nn.Module):
    """The neurite/SynthSeg Keras U-Net (see the module docstring), with its
    layers named as in the Keras file, without the prefix: ``conv_downarm_{l}_{c}``,
    ``bn_down_{l}``, ``conv_uparm_{levels+l}_{c}``, ``bn_up_{l}``, ``likelihood``.
    ``forward`` returns the softmax posteriors (B, labels, X, Y, Z)."""

    def __init__(self, in_channels: int, labels: int, features: int = 24, levels: int = 5,
                 kernel: int = 3, convs: int = 2, skip_n_concatenations: int = 0):
        super().__init__()
        self.levels, self.convs = levels, convs
        self.skip_levels = levels - skip_n_concatenations - 1   # decoder levels that concatenate
        self.layers = nn.ModuleDict()
        cin, down = in_channels, []
        for lvl in range(levels):
            f = features * 2 ** lvl
            for c in range(convs):
                self.layers[f"conv_downarm_{lvl}_{c}"] = nn.Conv3d(cin, f, kernel, padding=kernel // 2)
                cin = f
            self.layers[f"bn_down_{lvl}"] = nn.BatchNorm3d(f, eps=KERAS_BN_EPS)
            down.append(f)
        for lvl in range(levels - 1):
            f = features * 2 ** (levels - 2 - lvl)
            if lvl < self.skip_levels:
                cin += down[levels - 2 - lvl]
            for c in range(convs):
                self.layers[f"conv_uparm_{levels + lvl}_{c}"] = nn.Conv3d(cin, f, kernel, padding=kernel // 2)
                cin = f
            self.layers[f"bn_up_{lvl}"] = nn.BatchNorm3d(f, eps=KERAS_BN_EPS)
        self.layers["likelihood"] = nn.Conv3d(cin, labels, 1)
        self.multiple = 2 ** (levels - 1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        L = self.layers
        skips = []
        for lvl in range(self.levels):
            for c in range(self.convs):
                x = F.elu(L[f"conv_downarm_{lvl}_{c}"](x))
            skips.append(x)                       # the skip is taken before the batch norm
            x = L[f"bn_down_{lvl}"](x)
            if lvl < self.levels - 1:
                x = F.max_pool3d(x, 2)
        for lvl in range(self.levels - 1):
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            if lvl < self.skip_levels:
                x = torch.cat([skips[self.levels - 2 - lvl], x], dim=1)   # skip first, as Keras
            for c in range(self.convs):
                x = F.elu(L[f"conv_uparm_{self.levels + lvl}_{c}"](x))
            x = L[f"bn_up_{lvl}"](x)
        return L["likelihood"](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)


def published_blur(p: torch.Tensor, sigma: float = 0.5) -> torch.Tensor:
    """mri_synthseg's ``GaussianBlur(sigma=0.5)`` of (B, C, X, Y, Z) posteriors:
    each channel convolved with a normalised Gaussian of ``sigma`` voxels on
    a window of ``int(ceil(2.5 sigma) / 2) * 2 + 1`` voxels (3 for 0.5), zero
    padding ('SAME')."""
    size = int(np.ceil(2.5 * sigma) / 2) * 2 + 1
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = g[:, None, None] * g[None, :, None] * g[None, None, :]
    k = (k / k.sum()).to(p.dtype).to(p.device)
    c = p.shape[1]
    return F.conv3d(p, k.expand(c, 1, size, size, size), padding=size // 2, groups=c)


class SynthSegNet(nn.Module):
    """SynthSeg 2.0: the ``unet`` network, its softmax, the published blur."""

    def __init__(self, labels: int = len(SYNTHSEG_LABELS)):
        super().__init__()
        self.unet = NeuriteUNet(1, labels)
        self.multiple = self.unet.multiple

    def forward(self, x: torch.Tensor, blur: bool = True) -> torch.Tensor:
        p = self.unet(x)
        return published_blur(p) if blur else p


def _one_hot_argmax(p: torch.Tensor) -> torch.Tensor:
    """one_hot(argmax over channels), float, channels kept at dim 1."""
    return F.one_hot(p.argmax(1), p.shape[1]).permute(0, 4, 1, 2, 3).to(p.dtype)


class SynthSegRobustNet(nn.Module):
    """SynthSeg-robust 2.0: segmenter ``unet`` (image -> ``groups``), denoiser
    ``l2l`` (one-hot groups -> groups), segmenter ``unet2`` ([image, one-hot
    denoised groups] -> labels). Returns ``unet2``'s posteriors."""

    def __init__(self, groups: int, labels: int = len(SYNTHSEG_LABELS)):
        super().__init__()
        self.unet = NeuriteUNet(1, groups)
        self.l2l = NeuriteUNet(groups, groups, features=16, kernel=5, skip_n_concatenations=2)
        self.unet2 = NeuriteUNet(1 + groups, labels)
        self.multiple = self.unet.multiple

    def forward(self, x: torch.Tensor, blur: bool = False) -> torch.Tensor:
        groups = _one_hot_argmax(self.unet(x))
        groups = _one_hot_argmax(self.l2l(groups))
        p = self.unet2(torch.cat([x, groups], dim=1))
        return published_blur(p) if blur else p


# --------------------------------------------------------------- loading --

KERAS_TO_TORCH = {"kernel": "weight", "bias": "bias", "gamma": "weight", "beta": "bias",
                  "moving_mean": "running_mean", "moving_variance": "running_var"}


def keras_to_torch(layers: Mapping[str, Mapping[str, np.ndarray]],
                   prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    """Keras weights (layer name -> {kernel, bias, gamma, beta, moving_mean,
    moving_variance}) to a state dict of ours: layer ``{p}_{name}`` of a
    prefix ``p`` in ``prefixes`` becomes ``{p}.layers.{name}.{weight|bias|
    running_mean|running_var}``; kernels (k, k, k, in, out) become (out, in,
    k, k, k). Layers of no known prefix are kept under their own name, so
    the strict check reports them as extra."""
    state: dict[str, torch.Tensor] = {}
    # Longest prefix first: 'unet2_...' must not be read as 'unet' + '2_...'.
    ordered = sorted(prefixes, key=len, reverse=True)
    for layer, weights in layers.items():
        prefix = next((p for p in ordered if layer.startswith(p + "_")), None)
        base = f"{prefix}.layers.{layer[len(prefix) + 1:]}" if prefix else layer
        for var, value in weights.items():
            arr = np.asarray(value, dtype=np.float32)
            if var == "kernel" and arr.ndim == 5:
                arr = arr.transpose(4, 3, 0, 1, 2)
            state[f"{base}.{KERAS_TO_TORCH.get(var, var)}"] = torch.from_numpy(np.ascontiguousarray(arr))
    return state


def _expected(net: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every tensor ``net`` loads (parameters and running statistics), with its shape."""
    return {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}


def check_layout(net: nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[int, str | None]:
    """(tensors that match by name and shape, the first problem or None):
    a missing, extra or mis-shaped tensor, named."""
    want = _expected(net)
    have = {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}
    matched = sum(1 for k, s in want.items() if have.get(k) == s)
    missing = [k for k in want if k not in have]
    extra = [k for k in have if k not in want]
    shaped = [k for k in want if k in have and have[k] != want[k]]

    def more(items: list) -> str:
        return f" (and {len(items) - 1} more)" if len(items) > 1 else ""

    if shaped:
        k = shaped[0]
        return matched, f"tensor '{k}' has shape {list(have[k])}, the published layout has {list(want[k])}{more(shaped)}"
    if missing:
        return matched, f"tensor '{missing[0]}' is missing{more(missing)}"
    if extra:
        return matched, f"unexpected tensor '{extra[0]}'{more(extra)}"
    return matched, None


def load_strict(net: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> nn.Module:
    """Load ``state`` into ``net`` only if every tensor is consumed with its
    exact shape; LayoutError naming the first missing/extra/mis-shaped one."""
    _, problem = check_layout(net, state)
    if problem:
        raise LayoutError(f"not the published {what} layout: {problem}")
    own = net.state_dict()
    net.load_state_dict({k: state.get(k, own[k]).to(own[k].dtype) for k in own})
    return net


def iter_prefixes(layer_names: Iterable[str]) -> set[str]:
    """The Keras name prefixes (network names) present among ``layer_names``."""
    out = set()
    for name in layer_names:
        for p in ("unet2", "l2l", "unet_parc", "qc", "unet"):
            if name.startswith(p + "_"):
                out.add(p)
                break
    return out
