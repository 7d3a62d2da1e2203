"""Registration recipes (SynthMorph-like): ``rigid``, ``affine`` and
``deform``. Every sample is a pair of synthetic images with independent
contrasts and corruptions; the network sees only the images.

``rigid`` / ``affine`` (:class:`LinearRecipe`): two images of ONE label map,
each with its own random pose (the rigid recipe draws rotations and
translations only) plus a small warp each (longitudinal change). The
generator knows where every fixed voxel lies in the moving image
(``pairs.same_anatomy_pair``), so the loss is supervised: the mean distance
(mm, Charbonnier-smoothed) between the predicted and the true moving position
of the fixed image's brain voxels. Chosen over a Dice loss of moved label
maps because (1) it keeps a useful gradient at any misalignment (Dice is flat
once the structures no longer overlap, and initial poses differ by up to
60 degrees here), (2) it is exactly the validation metric (mean displacement
error in the brain) and (3) with small warps in the pair it asks for the
least-squares-best linear map, which is what a linear registration should
return; it needs no resampling of one-hot maps. Restricting it to the brain
makes the models anatomy-aware (neck and jaw position do not count).

``deform`` (:class:`DeformRecipe`): two label maps (or one map with two
warps, ``same_map_prob``), both centred on their brain's centroid and posed
with small affines (a deformable model assumes prior affine alignment). Loss:
soft Dice of the moving one-hot labels, moved by the predicted warp, against
the fixed ones (SynthSeg 2.0 labels merged into 8 large brain classes; the
background does not count) + lambda * reg_weight * mean squared gradient of
the velocity field, with lambda ~ U(0, 1) per sample and given to the network,
which is conditioned on it (``synthmorph register -r``). With
``recipe.supervised`` every pair is one label map under two poses and warps,
and the Dice term is replaced by the mean Charbonnier distance (mm) between
the predicted and the true moving position of the fixed brain voxels, as in
the linear recipes: a dense target at every voxel (``runs/synthmorph_deform_warmup/config.toml``).
Neither loss started learning from raw images in CPU-sized runs; with
``model.encoder`` the U-Net sees a frozen registration network's feature
maps of both images instead (:class:`FeatureSVFNet`, ``deform_features.toml``)
and does learn (runs/README.md).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from synthtools.evaluation import REG_CASES, score_reg
from synthtools.nets.registration import BarycenterAffine, FeatureSVFNet, SVFNet
from synthtools.space import ModelSpace
from synthtools.warp import centered_vox2mm, identity_grid, integrate_svf, warp_image
from synthtools.weights import Model, read_metadata, resolve

from ..config import Config

from ..generator.dataset import LabelMapDataset
from ..generator.rng import randint, uniform
from ..generator.pairs import correspondence, same_anatomy_pair
from ..generator.spatial import nearest, sample_transform
from ..generator.synth import Sample, Synthesizer
from .base import Recipe

# Deformable-loss classes: SynthSeg 2.0 structures merged into 8 large brain
# classes (left and right together); everything else is background (0).
REG_CLASSES = {
    1: (2, 41, 25, 57),                                      # cerebral white matter (+ lesions)
    2: (3, 42),                                              # cerebral cortex
    3: (4, 5, 43, 44, 136, 137, 163, 164),                   # lateral ventricles
    4: (7, 8, 46, 47),                                       # cerebellum
    5: (10, 11, 12, 13, 26, 28, 49, 50, 51, 52, 58, 60),     # deep grey matter, ventral DC
    6: (17, 18, 53, 54),                                     # hippocampus, amygdala
    7: (14, 15, 16),                                         # brainstem, 3rd/4th ventricles
    8: (24,),                                                # extracerebral CSF
}
REG_CLASS_NAMES = ("background", "cerebral white matter", "cerebral cortex", "lateral ventricles",
                   "cerebellum", "deep grey matter", "hippocampus/amygdala", "brainstem/3rd+4th ventricles",
                   "CSF")


def centred_sample(synth: Synthesizer, index_map: torch.Tensor, voxsize, gen: torch.Generator,
                   out_shape, out_voxsize, centre_mm) -> Sample:
    """``synth(index_map, ...)`` with the output grid centred on ``centre_mm``
    (centred mm of the label map) before the random pose: Synthesizer.__call__
    with a shift prepended to the sampled affine."""
    c = synth.config
    t = sample_transform(index_map.shape, voxsize, gen, c.affine, c.warp, out_shape, out_voxsize,
                         index_map.device)
    shift = torch.eye(len(out_shape) + 1, dtype=torch.float64)
    shift[:-1, -1] = torch.as_tensor(centre_mm, dtype=torch.float64)
    t.matrix = shift @ t.matrix
    labels = nearest(index_map, t.coords(index_map.device))
    fov = c.fov(labels.shape, gen, labels.device)
    image = synth.image(labels, t.out_voxsize, gen, fov)
    return Sample(image, labels * fov if c.crop_labels else labels, fov, t)


class _RegistrationRecipe(Recipe):
    task = "register"
    higher_is_better = False   # validation: displacement error (mm)

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.name = cfg.recipe.name
        self.shape = cfg.recipe.shape if cfg.recipe.shape is not None else (48, 48, 48)
        self.brain_lut = self.labels.brain_lut(csf=True)
        fixed, moving = cfg.generator, cfg.generator_moving or cfg.generator
        n = len(self.labels)
        self.synth_fixed = Synthesizer(fixed, num_labels=n, brain_lut=self.brain_lut)
        self.synth_moving = Synthesizer(moving, num_labels=n, brain_lut=self.brain_lut)

    def vox2mm(self, device="cpu") -> torch.Tensor:
        return centered_vox2mm(self.shape, self.voxsize, device=device)

    def model_space(self) -> ModelSpace:
        """The recipe's space with the network's own shape multiple."""
        return replace(self.space, multiple=self.build_model().multiple)

    def metadata(self) -> dict[str, Any]:
        meta = super().metadata()
        meta["architecture"] = self.architecture()
        return meta

    def architecture(self) -> dict[str, Any]:
        net = self.build_model()
        return dict(type=net.arch_type, **net.config)

    def as_model(self, net: torch.nn.Module) -> Model:
        meta = self.metadata()
        meta["architecture"] = dict(type=net.arch_type, **net.config)
        return Model(net, meta, path=None)


class LinearRecipe(_RegistrationRecipe):
    """``rigid`` / ``affine`` (module doc)."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.rigid = self.name == "rigid"
        self.loss_eps = cfg.recipe.charbonnier_mm

    def metadata(self) -> dict[str, Any]:
        meta = super().metadata()
        # Network passes at inference (synthtools.morph.register.register_linear).
        opts = self.cfg.inference
        meta["inference"]["passes"] = opts.passes
        # Adam steps per level of the feature-map refinement (synthtools.morph.refine).
        meta["inference"]["refine"] = list(opts.refine)
        meta["inference"]["refine_metric"] = opts.refine_metric
        return meta

    def build_model(self) -> BarycenterAffine:
        m = self.cfg.model
        return BarycenterAffine(3, 1, m.keypoints, features=m.features or (16, 32, 32, 64), convs=m.convs,
                                rigid=self.rigid, symmetric=m.symmetric, activation=m.activation)

    def make_sample(self, index_map: torch.Tensor, voxsize, gen: torch.Generator) -> dict[str, torch.Tensor]:
        pair = same_anatomy_pair(self.synth_fixed, self.synth_moving, index_map, voxsize, gen,
                                 out_shape=self.shape, out_voxsize=(self.voxsize,) * 3)
        brain = self.brain_lut.to(pair.fixed.labels.device)[pair.fixed.labels.long()] > 0
        return {"image": pair.moving.image, "fixed": pair.fixed.image,
                "target": pair.fixed_to_moving.float(), "mask": brain[None]}

    def sample_problems(self, sample: dict[str, torch.Tensor]) -> list[str]:
        if not sample["mask"].any():
            return ["no brain in the fixed image (moved out of the FOV)"]
        if not torch.isfinite(sample["target"]).all():
            return ["ground-truth correspondence is not finite"]
        return []

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        fixed, moving = batch["fixed"], batch["image"]
        v2m = self.vox2mm(fixed.device)
        mat = model(fixed, moving, v2m, v2m)                               # (B, 4, 4) fixed mm -> moving mm
        return correspondence_loss(mat, batch["target"].float(), batch["mask"], v2m, self.loss_eps)

    def output_metadata(self) -> dict[str, Any]:
        return {"type": "rigid" if self.rigid else "affine",
                "transform": "4x4 pull-back: fixed RAS (mm) -> moving RAS (mm)"}

    def validate(self, net: torch.nn.Module) -> dict[str, float]:
        from synthtools.morph.register import register_linear
        model = self.as_model(net)
        # The network's own accuracy (its passes, no test-time refinement),
        # which is what training changes.
        return score_reg(lambda moving, fixed: register_linear(model, moving, fixed, refine=()),
                         self.validation_cases(REG_CASES))


def correspondence_loss(mat: torch.Tensor, target_vox: torch.Tensor, mask: torch.Tensor, vox2mm: torch.Tensor,
                        eps: float = 1.0) -> torch.Tensor:
    """Mean Charbonnier distance sqrt(d^2 + eps^2) - eps (mm) between ``mat``
    (B, 4, 4, fixed mm -> moving mm) applied to the fixed voxels and their true
    moving positions ``target_vox`` (B, 3, *S, moving voxels), over ``mask``."""
    with torch.autocast(mat.device.type, enabled=False):
        mat, v2m = mat.float(), vox2mm.float()
        shape = target_vox.shape[2:]
        idx = torch.stack(torch.meshgrid(*[torch.arange(s, device=mat.device, dtype=torch.float32)
                                           for s in shape], indexing="ij"), -1)
        fixed_mm = idx @ v2m[:3, :3].T + v2m[:3, 3]                       # (*S, 3)
        true_mm = target_vox.movedim(1, -1) @ v2m[:3, :3].T + v2m[:3, 3]  # (B, *S, 3)
        lin = mat[:, :3, :3].reshape(-1, 1, 1, 1, 3, 3)
        pred_mm = (lin @ fixed_mm[None, ..., None])[..., 0] + mat[:, :3, 3].reshape(-1, 1, 1, 1, 3)
        return charbonnier_mean(((pred_mm - true_mm) ** 2).sum(-1), mask, eps).mean()


def charbonnier_mean(d2: torch.Tensor, mask: torch.Tensor, eps: float) -> torch.Tensor:
    """Per batch element, the mean over ``mask`` (B, 1, *S) of the
    Charbonnier distance sqrt(d2 + eps^2) - eps of squared distances ``d2``
    (B, *S, mm^2): ~linear in the distance, smooth at 0."""
    dist = torch.sqrt(d2 + eps ** 2) - eps
    m = mask[:, 0].float()
    return (dist * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)


class _PairMaker:
    """Dataset callable for the deform recipe: draws a second label map from
    the dataset's files for two-anatomy pairs (picklable for workers)."""

    def __init__(self, recipe: "DeformRecipe", dataset: LabelMapDataset):
        self.recipe, self.dataset = recipe, dataset

    def __call__(self, index_map: torch.Tensor, voxsize, gen: torch.Generator) -> dict[str, torch.Tensor]:
        ds = self.dataset
        other = None
        if uniform(gen, 0, 1) >= self.recipe.same_map_prob:
            other = ds.label_map(ds.files[randint(gen, 0, len(ds.files) - 1)])
        return self.recipe.make_sample(index_map, voxsize, gen, other)


class DeformRecipe(_RegistrationRecipe):
    """``deform`` (module doc)."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        r = cfg.recipe
        self.supervised = r.supervised
        self.loss_eps = r.charbonnier_mm
        # The true correspondence is known only within one label map.
        self.same_map_prob = 1.0 if self.supervised else r.same_map_prob
        self.reg_weight = r.reg_weight
        self.lam_range = r.lam
        lut = torch.zeros(len(self.labels), dtype=torch.int64)
        for cls, values in REG_CLASSES.items():
            for j, v in enumerate(self.labels.values):
                if int(v) in values:
                    lut[j] = cls
        self.class_lut = lut
        self.num_classes = len(REG_CLASSES) + 1
        self._centres: dict[tuple, torch.Tensor] = {}

    def build_model(self) -> SVFNet | FeatureSVFNet:
        """SVFNet on the images, or with ``model.encoder`` (a registration
        model: shipped name or folder) FeatureSVFNet on that model's feature
        maps (load its weights with ``train.init`` and ``init_into = "encoder"``)."""
        m = self.cfg.model
        opts = dict(features=m.features or (16, 32, 32, 32), convs=m.convs, steps=m.steps, hidden=m.hidden)
        if m.encoder:
            encoder = read_metadata(resolve(m.encoder))["architecture"]
            return FeatureSVFNet(encoder, scale=m.encoder_scale, **opts)
        return SVFNet(3, 1, **opts)

    def dataset(self, start: int = 0, rank: int = 0, world: int = 1) -> LabelMapDataset:
        ds = super().dataset(start, rank, world)
        ds.make = _PairMaker(self, ds)
        return ds

    def brain_centre(self, index_map: torch.Tensor, voxsize) -> torch.Tensor:
        """Centroid (centred mm) of the brain of a label map (cached per map)."""
        key = (index_map.data_ptr(), tuple(index_map.shape), str(index_map.device),
               int(index_map[::16, ::16, ::16].sum()))
        if key not in self._centres:
            sub = index_map[::2, ::2, ::2]
            brain = self.brain_lut.to(sub.device)[sub.long()] > 0
            if brain.any():
                vox = brain.nonzero().double().mean(0) * 2
            else:
                vox = torch.tensor([(s - 1) / 2 for s in index_map.shape], dtype=torch.float64)
            c = torch.tensor([(s - 1) / 2 for s in index_map.shape], dtype=torch.float64)
            self._centres[key] = ((vox.cpu() - c) * torch.tensor(list(voxsize), dtype=torch.float64))
        return self._centres[key]

    def make_sample(self, index_map: torch.Tensor, voxsize, gen: torch.Generator,
                    moving_map: tuple[torch.Tensor, tuple] | None = None) -> dict[str, torch.Tensor]:
        out = dict(out_shape=self.shape, out_voxsize=(self.voxsize,) * 3)
        fixed = centred_sample(self.synth_fixed, index_map, voxsize, gen,
                               centre_mm=self.brain_centre(index_map, voxsize), **out)
        m_map, m_vox = moving_map if moving_map is not None else (index_map, voxsize)
        moving = centred_sample(self.synth_moving, m_map, m_vox, gen,
                                centre_mm=self.brain_centre(m_map, m_vox), **out)
        lut = self.class_lut.to(fixed.labels.device)
        lam = torch.tensor([uniform(gen, *self.lam_range)], dtype=torch.float32)
        sample = {"image": moving.image, "fixed": fixed.image, "fixed_labels": lut[fixed.labels.long()],
                  "moving_labels": lut[moving.labels.long()], "lambda": lam}
        if self.supervised:
            if moving_map is not None:
                raise ValueError("supervised deform pairs need one label map (the correspondence is unknown)")
            target = correspondence(fixed.transform, moving.transform, index_map.device)
            if target is None:
                raise ValueError("supervised deform pairs need invertible (SVF) generator warps")
            sample["target"] = target.float()
        return sample

    def sample_problems(self, sample: dict[str, torch.Tensor]) -> list[str]:
        problems = []
        for key in ("fixed_labels", "moving_labels"):
            if int(sample[key].unique().numel()) < 3:
                problems.append(f"{key}: fewer than 2 brain classes left (anatomy out of the FOV?)")
        if "target" in sample and not torch.isfinite(sample["target"]).all():
            problems.append("ground-truth correspondence is not finite")
        return problems

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        lam = batch["lambda"].float().reshape(-1)
        vel = model(batch["image"], batch["fixed"], lam)
        with torch.autocast(vel.device.type, enabled=False):
            vel = vel.float()
            steps = (model.module if hasattr(model, "module") else model).steps   # DDP wraps
            disp = integrate_svf(vel, steps)
            reg = velocity_smoothness(vel)                               # (B,)
            if self.supervised:
                brain = (batch["fixed_labels"] > 0)[:, None]
                err = displacement_error(disp, batch["target"].float(), brain, self.voxsize, self.loss_eps)
                return (err + lam * self.reg_weight * reg).mean()
            k = self.num_classes
            moving = torch.nn.functional.one_hot(batch["moving_labels"].long(), k).movedim(-1, 1).float()
            fixed = torch.nn.functional.one_hot(batch["fixed_labels"].long(), k).movedim(-1, 1).float()
            moved = warp_image(moving, disp)
            dice = soft_dice(moved[:, 1:], fixed[:, 1:])                 # (B,), background excluded
            return ((1 - dice) + lam * self.reg_weight * reg).mean()

    def output_metadata(self) -> dict[str, Any]:
        return {"type": "svf", "units": "velocity in voxels of the fixed conformed grid",
                "steps": self.build_model().steps, "lambda": "regularisation weight input in [0, 1]",
                "classes": list(REG_CLASS_NAMES)}

    def validate(self, net: torch.nn.Module) -> dict[str, float]:
        from synthtools.morph.register import register_deform
        model = self.as_model(net)
        # Deformable alone, from the scanner alignment (no affine step).
        return score_reg(lambda moving, fixed: register_deform(model, moving, fixed).transform,
                         self.validation_cases(REG_CASES))


def displacement_error(disp: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, voxsize: float,
                       eps: float = 1.0) -> torch.Tensor:
    """Mean Charbonnier distance sqrt(d^2 + eps^2) - eps (mm) per batch
    element between the predicted moving position of each fixed voxel,
    x + ``disp`` (B, N, *S, voxels), and its true one ``target`` (B, N, *S,
    moving voxels of the same grid), over ``mask`` (B, 1, *S)."""
    ident = identity_grid(disp.shape[2:], disp.device, disp.dtype)[0].movedim(-1, 0)
    return charbonnier_mean(((ident + disp - target) ** 2).sum(1) * voxsize ** 2, mask, eps)


def soft_dice(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Mean soft Dice per batch element (B, C, *S) over the channels present
    in ``target`` (all channels if none is)."""
    dims = tuple(range(2, pred.ndim))
    inter = (pred * target).sum(dims)
    denom = pred.sum(dims) + target.sum(dims)
    dice = (2 * inter + eps) / (denom + eps)
    present = (target.sum(dims) > 0).float()
    present = torch.where(present.sum(1, keepdim=True) > 0, present, torch.ones_like(present))
    return (dice * present).sum(1) / present.sum(1)


def velocity_smoothness(vel: torch.Tensor) -> torch.Tensor:
    """Mean squared forward difference of a (B, N, *S) field, summed over
    axes, per batch element (voxel units: dimensionless)."""
    total = 0
    for ax in range(2, vel.ndim):
        d = vel.diff(dim=ax)
        total = total + (d ** 2).flatten(1).mean(1)
    return total
