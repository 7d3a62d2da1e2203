"""Segmentation recipe (SynthSeg 2.0 labels): synthetic image -> 33-class
softmax, trained with soft Dice on the deformed, FOV-cropped label map.
Random left/right flips swap the lateral labels so the network cannot learn
a side from anything but anatomy."""
from __future__ import annotations

from typing import Any

import torch

from synthtools.evaluation import SEG_CASES, score_consistency, score_seg
from synthtools.nets.unet import UNet

from ..config import Config

from ..generator.labels import SYNTHSEG_LABELS
from ..generator.rng import uniform
from ..generator.synth import Synthesizer
from .base import Recipe


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-5,
                   over_batch: bool = False) -> torch.Tensor:
    """1 - mean soft Dice over the channels present (B, C, *S). Per sample by
    default: each sample's Dice counts only the channels in its own target,
    so a channel it predicts but lacks costs nothing in that channel's Dice
    (only in the channels it covers). ``over_batch``
    (nnU-Net's batch Dice): the sums run over the whole batch, so a false
    positive in any sample counts wherever the channel is in the batch; for
    2D slices, where a small structure is absent from most slices, that is
    the difference."""
    prob = torch.softmax(logits.float(), dim=1)
    onehot = torch.nn.functional.one_hot(target.long(), prob.shape[1]).movedim(-1, 1).float()
    dims = (0, *range(2, prob.ndim)) if over_batch else tuple(range(2, prob.ndim))
    inter = (prob * onehot).sum(dims)
    denom = prob.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + eps) / (denom + eps)
    present = onehot.sum(dims) > 0
    return 1 - dice[present].mean()


LOSSES = ("dice", "dice+ce", "batch-dice", "batch-dice+ce")


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "dice") -> torch.Tensor:
    """``dice``: soft Dice per sample (SynthSeg). ``dice+ce``: soft Dice plus
    voxel-wise cross-entropy (nnU-Net's pairing): the cross-entropy gives
    every voxel a gradient, which soft Dice alone gives weakly to a
    structure the network does not yet predict. ``batch-dice`` and
    ``batch-dice+ce``: the same with the Dice summed over the batch
    (``soft_dice_loss(over_batch=True)``)."""
    if kind not in LOSSES:
        raise ValueError(f"unknown segmentation loss {kind!r} (one of {LOSSES})")
    loss = soft_dice_loss(logits, target, over_batch=kind.startswith("batch-"))
    if kind.endswith("+ce"):
        loss = loss + torch.nn.functional.cross_entropy(logits.float(), target.long())
    return loss


def deep_supervision_loss(outputs: torch.Tensor | list[torch.Tensor], target: torch.Tensor,
                          kind: str = "dice") -> torch.Tensor:
    """``segmentation_loss`` of the full-resolution output, plus (for a list
    from a network with deep supervision heads) that of each coarser output
    against the target subsampled to its grid (every 2^k-th voxel), with
    weights 1, 1/2, 1/4, ... normalised to sum to 1 (nnU-Net's)."""
    if isinstance(outputs, torch.Tensor):
        return segmentation_loss(outputs, target, kind)
    weights = [0.5 ** k for k in range(len(outputs))]
    total = 0.0
    for k, (logits, w) in enumerate(zip(outputs, weights)):
        t = target
        if k:
            step = 2 ** k
            t = target[(..., *(slice(0, None, step),) * (target.ndim - 1))]
            t = t[(..., *(slice(0, n) for n in logits.shape[2:]))]
        total = total + w * segmentation_loss(logits, t, kind)
    return total / sum(weights)


class SegmentRecipe(Recipe):
    name = task = "segment"
    atlases_from = "synthseg"   # the atlases depend on the label protocol, not on the network

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.shape = self.grid_shape((80, 80, 80))
        if self.real_target == "mask":
            raise ValueError("real.target = 'mask' is for skull-stripping; segmentation needs label maps")
        self.flip_prob = cfg.recipe.flip_prob
        self.loss_kind = cfg.recipe.loss
        if self.loss_kind not in LOSSES:
            raise ValueError(f"recipe.loss must be one of {LOSSES}, got {self.loss_kind!r}")
        values = self.labels.synthseg_lut()
        channel = {v: k for k, v in enumerate(SYNTHSEG_LABELS)}
        self.to_channel = torch.tensor([channel[int(v)] for v in values])   # index -> channel
        self.flip_index = self.labels.flip_lut()                            # index -> twin index
        gen_cfg = cfg.generator.with_label_values(self.labels.values)   # a copy: crop_labels is ours
        gen_cfg.crop_labels = True  # segment what the image shows
        self.synth = Synthesizer(gen_cfg, num_labels=len(self.labels),
                                 brain_lut=self.labels.brain_lut(csf=True))

    def build_model(self) -> UNet:
        m = self.cfg.model
        return UNet(self.ndim, self.in_channels, len(SYNTHSEG_LABELS), features=m.features or (16, 32, 64, 64),
                    convs=m.convs, norm=m.norm, deep_supervision=m.deep_supervision)

    def targets(self, image: torch.Tensor, labels: torch.Tensor, fov: torch.Tensor, gen: torch.Generator,
                lr_axis: int | None = 0) -> dict[str, torch.Tensor]:
        """Synthetic and real samples alike: random left/right mirror, then
        SynthSeg channels. (``fov`` is already applied to synthetic labels
        by ``crop_labels``; real pairs have no FOV cut.)"""
        labels = labels.long()
        if uniform(gen, 0, 1) < self.flip_prob:
            # Axis 0 of the label maps (LIA) is left-right: mirror and swap sides.
            # A sagittal 2D slice (lr_axis None) mirrors to the other hemisphere's
            # slice: same picture, swapped labels; a sagittal slab's neighbours
            # (its channels) also swap sides.
            if lr_axis is not None:
                image, labels = image.flip(1 + lr_axis), labels.flip(lr_axis)
            else:
                image = image.flip(0)
            labels = self.flip_index.to(labels.device)[labels]
        return {"image": image, "target": self.to_channel.to(labels.device)[labels]}

    def sample_problems(self, sample: dict[str, torch.Tensor]) -> list[str]:
        present = sample["target"].unique().numel()
        return [] if present > 2 else [f"only {present} label(s) left in the target (anatomy out of the FOV?)"]

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return deep_supervision_loss(model(batch["image"]), batch["target"], self.loss_kind)

    def output_metadata(self) -> dict[str, Any]:
        from synthtools.seg.lut import names_for
        return {"type": "softmax", "labels": list(SYNTHSEG_LABELS), "names": names_for(SYNTHSEG_LABELS)}

    def validate(self, net: torch.nn.Module) -> dict[str, float]:
        """Dice per built-in case and per ``[validation] real_pairs`` pair,
        plus ``mean_<group>`` per contrast/site/domain, plus the contrast
        consistency of our own labels (``consistency_*``; ``[validation]
        consistency = false`` skips it). Consistency does not rank
        checkpoints: an empty segmentation would be perfectly consistent."""
        from synthtools.metrics import with_group_means
        from synthtools.seg import segment

        from ..realdata import score_seg_pairs
        model = self.as_model(net)
        predict = lambda v: segment(model, v).labels  # noqa: E731
        cases, pairs = self.validation_cases(SEG_CASES), self.validation_pairs()
        metrics = score_seg(predict, cases) if cases else {}
        if pairs:
            lut = self.labels.synthseg_lut().numpy()
            metrics.update(score_seg_pairs(predict, pairs, lambda lab: lut[self.labels.to_index(lab)]))
        metrics = with_group_means(metrics, self.validation_groups(cases, pairs))
        if self.cfg.validation.consistency and cases:
            metrics.update(score_consistency(predict))
        return metrics
