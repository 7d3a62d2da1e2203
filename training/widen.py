"""Start a wider U-Net from a narrower one's weights without changing its output.

Why: a network trained for hours on CPU is too costly to throw away to test
whether width helps; training a wider copy from scratch would spend the
first hours catching up. Embedding the old weights in the wider network
(zero-padded, as in Net2Net's function-preserving growth) gives a start with
the old network's exact output, so an equal-time pilot measures width alone.

Channel k of the old network stays channel k at its level. In every
convolution, old output channels read only old input channels (their weights
from the new ones are zero), so the old function is computed unchanged; new
output channels keep the wider network's random initialisation and are read
by nothing yet. Their outgoing weights are zero, not frozen: the gradient
through them is non-zero as soon as the new channels are active, so they
start learning at the first step.

Instance normalisation works per channel, so an old channel's statistics
and its learnt scale and shift are unchanged by the new channels beside it
(the new ones start at scale 1, shift 0). Batch normalisation's running
statistics would also be exact, but are not supported; deep supervision
heads are widened like the output head.
"""
from __future__ import annotations

import re
from typing import Sequence

import torch

_CONV = re.compile(r"^(down|up)\.(\d+)\.(\d+)\.(weight|bias)$")
_AUX = re.compile(r"^aux\.(\d+)\.(weight|bias)$")   # deep supervision head k reads level k + 1


def unet_features(weights: dict[str, torch.Tensor]) -> list[int]:
    """Channels per level of a :class:`synthtools.nets.unet.UNet` state dict."""
    out, k = [], 0
    while f"down.{k}.0.weight" in weights:
        out.append(int(weights[f"down.{k}.0.weight"].shape[0]))
        k += 1
    if not out:
        raise ValueError("not a U-Net state dict: no 'down.0.0.weight'")
    return out


def _head_level(key: str) -> int | None:
    """The level an output head reads (the final head level 0, deep
    supervision head k level k + 1); None for any other tensor."""
    if key.startswith("head."):
        return 0
    aux = _AUX.match(key)
    return int(aux.group(1)) + 1 if aux else None


def _level(key: str, n: int) -> tuple[int, int, bool]:
    """(level the convolution works at, its block's input level, whether it
    is the block's first convolution) of a U-Net conv key; level 0 = full
    resolution, decoder block j works at level n-2-j (input from n-1-j)."""
    kind, block, layer, _ = _CONV.match(key).groups()
    level = int(block) if kind == "down" else n - 2 - int(block)
    return level, level - 1 if kind == "down" else level + 1, int(layer) == 0


def _input_segments(key: str, features: Sequence[int], in_channels: int) -> list[int]:
    """Sizes of the consecutive input-channel groups a convolution reads:
    one group, except a decoder block's first convolution, which reads the
    upsampled deeper features then the encoder's skip."""
    head = _head_level(key)
    if head is not None:
        return [features[head]]
    level, source, first = _level(key, len(features))
    if not first:
        return [features[level]]
    if key.startswith("up."):
        return [features[source], features[level]]
    return [in_channels if source < 0 else features[source]]


def _out_size(key: str, features: Sequence[int], out_channels: int) -> int:
    if _head_level(key) is not None:
        return out_channels
    if not _CONV.match(key):
        raise ValueError(f"{key}: not a U-Net convolution or instance-norm tensor "
                         "(batch-norm statistics are not supported)")
    return features[_level(key, len(features))[0]]


def widen_unet_state(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor],
                     in_channels: int, out_channels: int) -> dict[str, torch.Tensor]:
    """State dict for the wider U-Net whose (randomly initialised) state is
    ``new``, computing exactly what the narrower ``old`` computes. Both must
    have the same depth, convolutions per level, input and output channels."""
    f_old, f_new = unet_features(old), unet_features(new)
    if len(f_old) != len(f_new):
        raise ValueError(f"U-Net depths differ: {len(f_old)} vs {len(f_new)} levels")
    if any(a > b for a, b in zip(f_old, f_new)):
        raise ValueError(f"cannot narrow: features {f_old} -> {f_new}")
    if set(old) != set(new):
        raise ValueError("the two U-Nets have different layers (convolutions per level?)")
    out = {}
    for key, init in new.items():
        src = old[key].to(init.dtype)
        w = init.clone()
        o_old, o_new = _out_size(key, f_old, out_channels), _out_size(key, f_new, out_channels)
        if src.shape[0] != o_old or init.shape[0] != o_new:
            raise ValueError(f"{key}: unexpected shape {tuple(src.shape)} -> {tuple(init.shape)}")
        if src.ndim == 1:   # a bias, or an instance norm's per-channel scale or shift
            w[:o_old] = src
        else:
            w[:o_old] = 0                 # old outputs read no new input channel
            start_old = start_new = 0
            for s_old, s_new in zip(_input_segments(key, f_old, in_channels),
                                    _input_segments(key, f_new, in_channels)):
                w[:o_old, start_new:start_new + s_old] = src[:, start_old:start_old + s_old]
                start_old, start_new = start_old + s_old, start_new + s_new
            if start_old != src.shape[1] or start_new != init.shape[1]:
                raise ValueError(f"{key}: input channels do not add up")
        out[key] = w
    return out


def embed_slab_input(weights: dict[str, torch.Tensor], in_channels: int) -> dict[str, torch.Tensor]:
    """A single-slice 2D U-Net's weights for a 2.5D one that reads
    ``in_channels`` (odd) slices: the first convolution reads the centre
    slice with the old kernel and the neighbours with zero weights, so the
    new network starts computing exactly the old output and learns to use
    the neighbours from the first step. Other tensors are unchanged."""
    key = "down.0.0.weight"
    w = weights.get(key)
    if w is None or w.shape[1] != 1 or in_channels % 2 == 0:
        raise ValueError(f"a slab needs a single-channel U-Net's weights and an odd channel count, "
                         f"got {None if w is None else w.shape[1]} -> {in_channels}")
    out = dict(weights)
    new = torch.zeros((w.shape[0], in_channels, *w.shape[2:]), dtype=w.dtype)
    new[:, in_channels // 2] = w[:, 0]
    out[key] = new
    return out
