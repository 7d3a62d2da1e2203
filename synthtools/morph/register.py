"""Registration with the trained networks: images in, transforms out, in the
convention of :mod:`synthtools.morph.transforms` (pull-back: FIXED RAS ->
MOVING RAS; a deformable result is a :class:`Warp` on the fixed grid).

* :func:`register_linear` (rigid/affine model): each image is conformed on
  its own to the model's input space (voxel size, orientation; the grids may
  differ, the network compares feature barycentres, not voxels); the network
  receives each conformed grid's voxel->RAS matrix, so its 4x4 output is
  already the world pull-back.
* :func:`register_deform`: the fixed image is conformed, the moving image is
  resampled onto that grid through the prior affine (identity: scanner
  alignment), a velocity field (an SVF network's output, or fitted at test
  time, :mod:`synthtools.morph.svf_fit`) is integrated on the conformed grid and the result ``x -> M (x + u(x))`` is sampled on
  the fixed image's native grid; the inverse ``y -> phi^-1(inv(M) y)``
  (``phi^-1 = exp(-v)``, exact for an SVF) on the moving grid.
* :func:`register`: the four modes of ``synthmorph register``; ``joint`` is
  affine then deformable.

``init`` (a linear transform, pull-back) is applied before the network:
the moving image's header is moved by it, and the result composed with it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch

from ..conform import resample
from ..infer import normalize_intensities
from ..io import Volume
from ..space import ModelSpace
from ..weights import Model, cpu_has_bf16
from .refine import PATCHES, refine_linear
from .transforms import Affine, Geometry, Warp, as_geometry, invert

__all__ = ["Registration", "FixedSide", "fixed_side", "register_linear", "register_deform", "register", "model_kind"]


@dataclass
class Registration:
    transform: Affine | Warp            # fixed RAS -> moving RAS (Warp on the fixed grid)
    inverse: Affine | Warp | None       # moving RAS -> fixed RAS (Warp on the moving grid)


def model_kind(model: Model) -> str:
    """'rigid', 'affine' or 'svf' from a registration model's metadata."""
    return str(model.meta.get("output", {}).get("type", ""))


def _frame(volume: Volume) -> np.ndarray:
    """First frame of a 3D/4D image (registration uses one frame)."""
    data = np.asarray(volume.data)
    return data[..., 0] if data.ndim == 4 else data


def _device(model: Model) -> torch.device:
    return next(model.net.parameters()).device


@dataclass
class FixedSide:
    """The fixed image as a model sees it: conformed grid, normalised
    intensities, feature maps (None until needed). Computed once when one
    fixed image serves several steps (joint: affine then deformable)."""
    conformed: object
    image: torch.Tensor
    features: torch.Tensor | None = None
    bf16: bool = False                  # feature maps (both images') under bf16 autocast


def fixed_side(model: Model, fixed: Volume, bf16: bool = False) -> FixedSide:
    """``bf16``: compute both images' feature maps under bf16 autocast
    (where the CPU has it), twice as fast on CPU; for joint mode only (see
    :data:`JOINT_BF16`)."""
    cf = ModelSpace.of(model).conform(_frame(fixed), fixed.affine)
    use = bf16 and _device(model).type == "cpu" and cpu_has_bf16()
    return FixedSide(cf, normalize_intensities(cf.data), bf16=use)


def joint_fixed_side(model: Model, fixed: Volume) -> FixedSide:
    """The fixed side of a joint registration (bf16 features, see
    :data:`JOINT_BF16`), to share between several moving images."""
    return fixed_side(model, _prepared(fixed), bf16=JOINT_BF16)


def _with_features(model: Model, side: FixedSide) -> torch.Tensor:
    if side.features is None:
        side.features = _features(model, side.image, side.bf16)
    return side.features


def linear_options(model: Model, passes: int | None, refine, refine_metric: str | None
                   ) -> tuple[int, tuple[int, ...], str]:
    """(passes, refine levels, refine metric): the arguments given, else the
    model's ``inference`` defaults (1 pass, no refinement, features)."""
    opts = model.meta.get("inference", {})
    passes = int(opts.get("passes", 1)) if passes is None else int(passes)
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    refine = tuple(int(n) for n in (opts.get("refine", ()) if refine is None else refine))
    metric = str(opts.get("refine_metric", "features") if refine_metric is None else refine_metric)
    return passes, refine, metric


def register_linear(model: Model, moving: Volume, fixed: Volume, init: Affine | None = None,
                    passes: int | None = None, refine: tuple[int, ...] | None = None,
                    refine_metric: str | None = None, side: FixedSide | None = None,
                    native_level: bool = True, refine_patches: int = PATCHES, seed: int = 0) -> Affine:
    """Rigid or affine registration (model type 'rigid'/'affine'): the
    pull-back fixed RAS -> moving RAS, with both grids recorded.

    ``passes`` > 1 runs the network again on the moving image re-posed by the
    previous estimate (a header move, no extra interpolation of the voxels)
    and composes the results: the network is most accurate near alignment.
    Default: the model's ``inference.passes`` (1 if absent).

    ``refine`` (Adam steps per level, coarsest first; default the model's
    ``inference.refine``, none if absent) then polishes the result
    (:mod:`synthtools.morph.refine`) with ``refine_metric`` (default the
    model's ``inference.refine_metric``, else "features"): "features", the
    squared difference of the network's feature maps on the conformed grid
    and its 2x coarser versions; or "lncc", the local NCC^2 of the images
    in small cubes inside the fixed brain (where the feature maps have mass),
    the last entry of ``refine`` being a level on the native grids.
    ``native_level=False`` skips that native level (joint mode: the
    deformable step absorbs the sub-voxel residual). ``refine_patches``:
    cubes per local-NCC^2 level; ``seed`` draws their centres (the only
    random step: the result moves by a few hundredths of a mm between
    seeds, so compare methods over several seeds)."""
    passes, refine, refine_metric = linear_options(model, passes, refine, refine_metric)
    if not native_level and refine_metric == "lncc" and refine:
        refine = refine[:-1] + (0,)
    if refine_metric not in ("features", "lncc"):
        raise ValueError(f"refine_metric must be 'features' or 'lncc', got {refine_metric!r}")
    # The fixed side is the same in every pass: conform it and map its features once.
    side = fixed_side(model, fixed) if side is None else side
    cf, xf, ff = side.conformed, side.image, _with_features(model, side)
    shift = _centre_shift(cf)    # fits in a frame centred on the fixed grid (float32-friendly)
    s = torch.as_tensor(shift, dtype=torch.float64)
    af = (s @ torch.as_tensor(cf.affine, dtype=torch.float64)).float()

    def moving_side(m: np.ndarray, features: bool = True):
        """The moving image re-posed by ``m`` (header move), conformed: its
        frame matrix, normalised image and feature maps (None without
        ``features``: the local-NCC^2 refinement never reads them)."""
        cm = ModelSpace.of(model).conform(_frame(moving), np.linalg.inv(m) @ moving.affine)
        xm = normalize_intensities(cm.data)
        am = (s @ torch.as_tensor(cm.affine, dtype=torch.float64)).float()
        return am, xm, _features(model, xm, side.bf16) if features else None

    m = np.eye(4) if init is None else np.asarray(init.matrix, dtype=np.float64)
    for _ in range(passes):
        am, _, fm = moving_side(m)
        with torch.inference_mode(), torch.autocast(ff.device.type, enabled=False):
            step = model.net.fit(ff[None].float(), fm[None].float(), af[None].to(ff.device),
                                 am[None].to(ff.device))[0].double().cpu().numpy()
        m = m @ np.linalg.inv(shift) @ step @ shift
    if any(refine):
        am, xm, fm = moving_side(m, features=refine_metric == "features")
        images, native, levels = None, None, refine
        if refine_metric == "lncc":
            images = (xf.float().cpu(), xm.float().cpu())
            # The last level on the scans as acquired (moving re-posed by m, like xm).
            native = (_normalised(fixed), s.float() @ torch.as_tensor(fixed.affine, dtype=torch.float32),
                      _normalised(moving), s.float() @ torch.as_tensor(np.linalg.inv(m) @ moving.affine,
                                                                     dtype=torch.float32))
            levels = refine[:-1]
        step = refine_linear(ff.float().cpu(), None if fm is None else fm.float().cpu(), af, am, rigid=model_kind(model) == "rigid",
                             iterations=levels, images=images, native=native,
                             native_iterations=refine[-1] if native else 0, seed=seed,
                             patches=refine_patches).numpy()
        m = m @ np.linalg.inv(shift) @ step @ shift
    return Affine(m, fixed=as_geometry(fixed), moving=as_geometry(moving))


def _prepared(volume: Volume) -> Volume:
    """The first frame as C-ordered float32, same grid. Images arrive in
    nibabel's Fortran order, and every resampling made its own C-ordered
    copy (7 copies, ~0.3 s of a 5 s joint registration)."""
    data = np.ascontiguousarray(_frame(volume), dtype=np.float32)
    return volume if data is volume.data else Volume(data, volume.affine, volume.header, volume.path)


def _normalised(volume: Volume) -> torch.Tensor:
    """First frame of a native image, intensities mapped to [0, 1]."""
    return normalize_intensities(torch.from_numpy(_prepared(volume).data))


def _features(model: Model, x: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """The network's feature maps (K, *S) of a normalised conformed image (a
    tensor usable outside inference mode). The network runs on the image's
    content box only (:func:`_content_box`) and the maps are zero outside
    it, as they are on empty background: a 256 mm field of view around a
    head costs twice the voxels of the head. ``bf16``: the network under
    bf16 autocast (the maps are float32 either way)."""
    box = _content_box(x, ModelSpace.of(model).multiple)
    dev = _device(model)
    with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
        f = model.net.feature_maps(x[box][None, None].to(dev))[0].float()
    if f.shape[1:] == x.shape:
        return f.clone()
    out = torch.zeros((f.shape[0],) + tuple(x.shape), dtype=f.dtype, device=f.device)
    out[(slice(None),) + box] = f
    return out


def _content_box(x: torch.Tensor, multiple: int, margin: int = 12, threshold: float = 0.02) -> tuple[slice, ...]:
    """Box of the voxels above ``threshold`` (intensities in [0, 1]) grown by
    ``margin`` voxels, its ends on multiples of ``multiple`` (so the U-Net's
    pooling grid is the full grid's: its output in the box is the same)."""
    nz = (x > threshold).nonzero()
    if len(nz) == 0:
        return tuple(slice(0, n) for n in x.shape)
    box = []
    for ax, n in enumerate(x.shape):
        lo = max(0, int(nz[:, ax].min()) - margin) // multiple * multiple
        hi = min(n, -(-(int(nz[:, ax].max()) + 1 + margin) // multiple) * multiple)
        box.append(slice(lo, hi))
    return tuple(box)


def _centre_shift(conformed) -> np.ndarray:
    """RAS -> a frame centred on a conformed grid."""
    shift = np.eye(4)
    shift[:3, 3] = -conformed.affine[:3, :3] @ ((np.array(conformed.shape) - 1) / 2) - conformed.affine[:3, 3]
    return shift


# Local-NCC^2 cubes per conformed refinement level in joint mode (refine.PATCHES alone).
JOINT_REFINE_PATCHES = 500
# Joint mode computes the feature maps under bf16 autocast (where the CPU has it): 0.9 s less a
# pair, GM/WM Dice 0.7912 -> 0.7905 on the four benchmark pairs; the refinement and the
# deformable fit absorb the coarser maps. Rigid/affine alone keep float32 (their error targets
# are sub-millimetre).
JOINT_BF16 = True

# -r 1 -> this smoothness weight of the test-time SVF fit (linear in -r; 0: similarity only).
FIT_WEIGHT_MAX = 0.6


def register_deform(model: Model, moving: Volume, fixed: Volume, affine: Affine | None = None,
                    regularization: float = 0.5, inverse: bool = False,
                    side: FixedSide | None = None) -> Registration:
    """Deformable registration after the linear pull-back ``affine`` (None:
    the images are assumed aligned in world space). Returns the warp on the
    fixed grid and, with ``inverse``, the inverse warp on the moving grid.

    ``model``: an 'svf' network (its velocity field, conditioned on
    ``regularization``), or a rigid/affine model, whose feature maps give the
    fixed brain for a test-time fit (:mod:`synthtools.morph.svf_fit`,
    smoothness weight ``regularization * FIT_WEIGHT_MAX``). The brain: where
    the feature maps' total mass (1 - background probability) exceeds 0.5,
    dilated by 2 voxels; a lower threshold let stray voxels far from the
    head stretch the fitted box to the whole grid."""
    m = np.eye(4) if affine is None else np.asarray(affine.matrix, dtype=np.float64)
    side = fixed_side(model, fixed) if side is None else side
    cf, xf = side.conformed, side.image
    mov = resample(_prepared(moving).data, np.linalg.inv(m) @ moving.affine,
                   cf.affine, cf.shape, order=1)
    xm = normalize_intensities(torch.from_numpy(mov))
    if model_kind(model) == "svf":
        disp = _network_displacements(model, xm, xf, regularization, inverse)
    else:
        from .refine import brain_mask
        from .svf_fit import fit_svf, svf_displacement
        mask = brain_mask(_with_features(model, side).float().cpu(), threshold=0.5, dilate=2)
        vel, spacing = fit_svf(xf.float().cpu(), xm.float().cpu(), mask, regularization * FIT_WEIGHT_MAX)
        disp = [svf_displacement(vel, spacing, cf.shape, inverse=inv) for inv in ((False, True) if inverse
                                                                                  else (False,))]
    fixed_g, moving_g = as_geometry(fixed), as_geometry(moving)
    fwd = _displacement_ras(disp[0], cf.affine)
    t = Warp(_native_field(fwd, cf.affine, m, fixed_g), fixed_g, moving=moving_g)
    inv = None
    if inverse:
        back = _displacement_ras(disp[1], cf.affine)
        inv = Warp(_native_field(back, cf.affine, np.linalg.inv(m), moving_g, inverse=True), moving_g,
                   moving=fixed_g)
    return Registration(t, inv)


@torch.inference_mode()
def _network_displacements(model: Model, xm: torch.Tensor, xf: torch.Tensor, regularization: float,
                           inverse: bool) -> list[torch.Tensor]:
    """exp(v) (and exp(-v)) of an SVF network's velocity, conformed voxels."""
    dev = _device(model)
    lam = torch.tensor([float(regularization)], device=dev)
    vel = model.net(xm[None, None].to(dev), xf[None, None].to(dev), lam).float()
    return [model.net.displacement(vel, inverse=inv) for inv in ((False, True) if inverse else (False,))]


def _displacement_ras(disp_vox: torch.Tensor, conf_affine: np.ndarray) -> torch.Tensor:
    """(1, 3, *S) displacement in conformed voxels -> (3, *S) in RAS mm."""
    lin = torch.as_tensor(conf_affine[:3, :3], dtype=torch.float32)
    return torch.einsum("ij,j...->i...", lin, disp_vox[0].float().cpu())


def _native_field(u: torch.Tensor, conf_affine: np.ndarray, m: np.ndarray, grid: Geometry,
                  inverse: bool = False) -> np.ndarray:
    """Displacement (X, Y, Z, 3), RAS mm, on a native grid of the map
    ``x -> M (x + u(x))`` (forward: ``m`` = M, the conformed field ``u`` on
    the fixed side) or ``y -> m y + u(m y)`` (``inverse``: ``m`` = inv(M),
    ``u`` the inverse field). ``u`` is 0 outside the conformed grid (as
    :func:`~synthtools.morph.transforms.compose` treats a warp)."""
    if inverse:   # u sampled at m y: source grid = conformed grid seen through inv(m)
        uu = resample(u, np.linalg.inv(m) @ conf_affine, grid.affine, grid.shape, order=1)
        uu = torch.as_tensor(uu)
    else:         # u sampled at x, then the linear part of M applied to it
        uu = torch.as_tensor(resample(u, conf_affine, grid.affine, grid.shape, order=1))
        uu = torch.einsum("ij,j...->i...", torch.as_tensor(m[:3, :3], dtype=torch.float32), uu)
    # (m - I) x for every voxel x = A v, by broadcasting per axis (no coordinate array).
    b = (m - np.eye(4)) @ grid.affine
    axes = [torch.as_tensor(b[:3, k:k + 1] * np.arange(n)[None], dtype=torch.float32)
            for k, n in enumerate(grid.shape)]
    uu += (axes[0][:, :, None, None] + axes[1][:, None, :, None] + axes[2][:, None, None, :]
           + torch.as_tensor(b[:3, 3], dtype=torch.float32)[:, None, None, None])
    return uu.movedim(0, -1).numpy()


def register(moving: Volume, fixed: Volume, mode: str, models: Mapping[str, Model], init: Affine | None = None,
             regularization: float = 0.5, inverse: bool = True, side: FixedSide | None = None,
             progress: Callable[[str], None] | None = None) -> Registration:
    """``synthmorph register``: ``mode`` rigid/affine (``models['linear']``),
    deform (``models['deform']``) or joint (both: affine then deformable).
    ``side``: joint only, the fixed image as ``models['linear']`` sees it
    (:func:`joint_fixed_side`), when several images go to one fixed image.
    ``progress(stage)``, if given, is called as each stage ends."""
    progress = progress or (lambda stage: None)
    moving, fixed = _prepared(moving), _prepared(fixed)
    if mode in ("rigid", "affine"):
        t = register_linear(models["linear"], moving, fixed, init)
        progress(f"{mode} registration")
        return Registration(t, invert(t) if inverse else None)
    if mode == "deform":
        reg = register_deform(models["deform"], moving, fixed, init, regularization, inverse)
        progress("deformable registration")
        return reg
    if mode == "joint":
        side = joint_fixed_side(models["linear"], fixed) if side is None else side
        # One network pass, no native refinement level, fewer cubes: the deformable fit absorbs
        # what each adds (four benchmark pairs, GM/WM Dice: second pass 0.7937 with, 0.7932
        # without, 2.8 s; native level 0.788 with, 0.789 without, 0.6 s; 2000 -> 500 cubes
        # 0.789 -> 0.788, 0.7 s).
        a = register_linear(models["linear"], moving, fixed, init, side=side, native_level=False, passes=1,
                            refine_patches=JOINT_REFINE_PATCHES)
        progress("affine registration")
        same = models["deform"] is models["linear"]     # the default: one model, one fixed side
        reg = register_deform(models["deform"], moving, fixed, a, regularization, inverse,
                              side=side if same else None)
        progress("deformable registration")
        return reg
    raise ValueError(f"unknown registration mode {mode!r}")
