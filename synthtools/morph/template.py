"""An unbiased within-subject template: one linear transform per input into a
common mid-space that favours no input (``synthmorph template``,
``synthmorph register -M``).

Pairwise registration to session 1 biases a longitudinal study towards
session 1: it is interpolated never, the others once, and its own noise
sets the reference. Here every input is treated alike:

1. **Network passes.** Each input is conformed on its own and mapped to
   feature maps once per pass, and its barycentres computed once; the
   barycentre fit (closed-form, symmetric: swapping two images gives
   exactly the inverse) is then run for every pair (:func:`network_pairs`;
   above 9 inputs the refinement's ring pairs, so linear in N) at no extra
   network cost. The pairwise transforms are averaged into one
   pose per input (below); the next pass re-poses every input into that
   mid-space (a header move, no interpolation) where the network is most
   accurate.
2. **Refinement.** Local-NCC^2 refinement (:mod:`synthtools.morph.refine`,
   the model's ``inference`` levels, the last on the native scans) of every
   ordered pair of inputs (:func:`partner_edges`; above 9 inputs, each with
   its 8 ring neighbours): every pair is measured both ways, so neither
   image's grid is favoured, and every pair, within a session or across, is
   measured directly. An input's pairs share a fixed budget of cubes
   (:func:`edge_patches`, :data:`PATCH_BUDGET`: 2000 per pair for 3 inputs,
   as a pairwise registration, 800 for 6), so the sampling per input does
   not grow with N, and an input's side of its pairs (pyramid, cubes, their
   values) is made once (:func:`~synthtools.morph.refine.refine_linear_group`);
   each pair keeps a fixed cost of Adam steps (the "features" criterion,
   which has no cubes, costs a full refinement per pair). (A ring of N or
   2N pairs with the
   full count each, used before, left within-session pairs off the ring or
   measured one way only; Lesjak, issue 32.) Everything runs in a canonical
   order of the inputs (a hash of their voxels and headers), so permuting the
   inputs gives the same result, and swapping two inputs exactly inverse
   relative transforms.
3. **Pose averaging** (Lie-group least squares, after the network passes
   and after the refinement). With ``Q_i`` the map from
   input i's RAS to the template's RAS and ``T_ij`` a measured pull-back
   (i's RAS -> j's RAS), the poses minimise ``sum ||log(Q_j T_ij inv(Q_i))||^2``
   (Gauss-Newton on the matrix logarithms; a single measured pair gives the
   geodesic midpoint, exactly inverse-consistent), then the common gauge is
   fixed so that the Karcher mean of the poses is the identity:
   ``sum_i log(Q_i) = 0``. The logarithms are taken in a frame centred on the
   mean of the inputs' content centroids, so "mean" means mean brain
   displacement, not a rotation about the scanner origin.

Conventions as :mod:`synthtools.morph.transforms`: the transform written for
input i is the pull-back TEMPLATE RAS -> INPUT RAS (``inv(Q_i)``), so
``synthmorph apply`` with it resamples the input into the template.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from scipy.linalg import expm, logm

from ..conform import resample
from ..infer import normalize_intensities
from ..io import InputError, Volume
from ..nets.registration import barycenters
from ..space import ModelSpace
from ..weights import Model
from .refine import PATCHES, brain_mask, refine_linear, refine_linear_group
from .register import _features, _normalised, _prepared, linear_options, model_kind
from .transforms import Affine, Geometry, as_geometry

__all__ = ["TemplateResult", "build_template", "halfway", "template_grid", "template_image", "check_inputs",
           "solve_poses", "partner_edges", "network_pairs", "edge_patches"]

# Margin (mm) around the union of the brains for the template grid.
GRID_MARGIN_MM = 10.0
# Gauss-Newton / Karcher iterations of the pose averaging (converges in 3-5 for small noise).
POSE_ITERATIONS = 50
POSE_TOL = 1e-12
# Refinement partners per input (all the others up to this many; see partner_edges).
MAX_PARTNERS = 8
# Local-NCC^2 cubes per input and level, shared among its refinement pairs (edge_patches):
# two pairwise registrations' worth, so 2000 per pair (as a pairwise registration) up to 3
# inputs, 800 for 6. Lesjak, 6 inputs, seeds 0-2 (issue 32): mean error of the 5 reference
# pairs 0.227 mm with 400 cubes per pair (one registration's worth), 0.220 with 600, 0.215
# with 800; 1200 and 2000 (seed 0) no better than 800 at 1.5x and 2.3x its refinement time.
PATCH_BUDGET = 2 * PATCHES


@dataclass
class TemplateResult:
    """``poses[i]``: 4x4 input i RAS -> template RAS (mm). ``transforms[i]``:
    the pull-back template RAS -> input i RAS with both grids (``grid`` the
    template grid, None until :func:`template_grid`). ``brains[i]``: brain
    points of input i (N, 3; its RAS mm, from the network's feature maps).
    ``centre``: the centre (RAS mm) of the frame of the matrix logarithms."""
    poses: list[np.ndarray]
    brains: list[np.ndarray] = field(default_factory=list)
    grid: Geometry | None = None
    inputs: list[Geometry] = field(default_factory=list)
    centre: np.ndarray | None = None

    @property
    def transforms(self) -> list[Affine]:
        return [Affine(np.linalg.inv(q), fixed=self.grid, moving=g) for q, g in zip(self.poses, self.inputs)]


# ------------------------------------------------------------ input checks --

def check_inputs(volumes: Sequence[Volume]) -> None:
    """One-line :class:`InputError` for inputs a template cannot use: fewer
    than two, not 3D (a 4D image must be one frame, or all 4D inputs must have
    the same number of frames: only the first frame is registered), a singleton
    spatial axis (2D), or no signal."""
    if len(volumes) < 2:
        raise InputError("a template needs at least two input images "
                         f"(got {len(volumes)}; use 'synthmorph register' for one pair)")
    frames = set()
    for v in volumes:
        name = v.path or "image"
        shape = np.shape(v.data)
        if len(shape) not in (3, 4):
            raise InputError(f"{name}: expected a 3D image, got {len(shape)}D shape {shape}")
        if min(shape[:3]) < 2:
            raise InputError(f"{name}: a 2D image (shape {shape[:3]}); a template needs 3D volumes")
        frames.add(shape[3] if len(shape) == 4 else 1)
        if not np.any(np.asarray(v.data) != 0):
            raise InputError(f"{name}: the image is empty (all zeros)")
    if len(frames) > 1:
        raise InputError(f"inputs with different numbers of frames ({', '.join(map(str, sorted(frames)))}): "
                         "give 3D images (or 4D images with the same frames; the first frame is registered)")


# -------------------------------------------------------- Lie-group algebra --

def _log(m: np.ndarray) -> np.ndarray:
    return np.real(logm(m))


def _shift(c: np.ndarray) -> np.ndarray:
    s = np.eye(4)
    s[:3, 3] = -np.asarray(c, dtype=np.float64)
    return s


def partner_edges(n: int, max_partners: int = MAX_PARTNERS) -> list[tuple[int, int]]:
    """Refinement pairs (fixed, moving): every input is the fixed image
    against each of its partners, every other input when there are at most
    ``max_partners`` of them (all ordered pairs: every pair measured both
    ways, so neither image of a pair is favoured), else its
    ``max_partners`` nearest on a ring of the inputs (half each side; linear
    in n). Each input is fixed and moving equally often."""
    if n < 2:
        return []
    if n - 1 <= max_partners:
        return [(i, j) for i in range(n) for j in range(n) if i != j]
    half = max(1, max_partners // 2)
    return [(i, (i + k) % n) for i in range(n) for k in (*range(1, half + 1), *range(-half, 0))]


def network_pairs(n: int, max_partners: int = MAX_PARTNERS) -> list[tuple[int, int]]:
    """The pairs (i < j) fitted in a network pass: every pair up to
    ``max_partners`` + 1 inputs, else those of :func:`partner_edges` (each
    once; linear in n). A fit costs little once each input's barycentres
    are known, but the pose averaging's cost grows with the pairs."""
    return sorted({(min(i, j), max(i, j)) for i, j in partner_edges(n, max_partners)})


def edge_patches(n: int, max_partners: int = MAX_PARTNERS, budget: int | None = None) -> int:
    """Local-NCC^2 cubes per refinement pair: ``budget`` cubes per input
    (default :data:`PATCH_BUDGET`) shared among its partners
    (:func:`partner_edges`), so the sampling per input does not grow with
    n, and never more than one pairwise registration's
    (:data:`~synthtools.morph.refine.PATCHES`) per pair."""
    partners = max(1, len(partner_edges(n, max_partners)) // max(1, n))
    return max(1, min(PATCHES, (PATCH_BUDGET if budget is None else budget) // partners))


def solve_poses(n: int, measured: dict[tuple[int, int], np.ndarray], centre: np.ndarray,
                init: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
    """Poses ``Q_i`` (input i RAS -> template RAS) from pairwise pull-backs
    ``measured[(i, j)]`` (i's RAS -> j's RAS, ideally ``inv(Q_j) Q_i``).

    Least squares in the matrix logarithms, in a frame centred on ``centre``
    (mm): Gauss-Newton updates ``Q_i <- exp(d_i) Q_i`` with ``d_j - d_i =
    -log(Q_j T_ij inv(Q_i))`` solved over the measurement graph (minimum
    norm), then the gauge: the Karcher mean of the poses is the identity.
    Relabelling the inputs permutes the answer (no input is special)."""
    s = _shift(centre)
    si = np.linalg.inv(s)
    meas = {e: s @ t @ si for e, t in measured.items()}
    q = [np.eye(4) if init is None else s @ np.asarray(init[i], np.float64) @ si for i in range(n)]
    edges = list(meas)
    a = np.zeros((len(edges), n))
    for k, (i, j) in enumerate(edges):
        a[k, j] += 1.0
        a[k, i] -= 1.0
    pinv = np.linalg.pinv(a)
    for _ in range(POSE_ITERATIONS):
        r = np.stack([_log(q[j] @ meas[(i, j)] @ np.linalg.inv(q[i])).ravel() for i, j in edges])
        d = pinv @ (-r)
        q = [expm(d[i].reshape(4, 4)) @ q[i] for i in range(n)]
        if np.max(np.abs(d)) < POSE_TOL:
            break
    q = _karcher_gauge(q)
    out = [si @ m @ s for m in q]
    for m in out:
        m[3] = (0.0, 0.0, 0.0, 1.0)     # exactly affine (expm leaves ~1e-20 in the last row)
    return out


def _karcher_gauge(q: list[np.ndarray]) -> list[np.ndarray]:
    """A common change of template frame G (``Q_i <- G Q_i``) after which
    ``sum_i log(Q_i) = 0``: the template sits at the poses' Karcher mean."""
    for _ in range(POSE_ITERATIONS):
        mean = np.mean([_log(m) for m in q], axis=0)
        q = [expm(-mean) @ m for m in q]
        if np.max(np.abs(mean)) < POSE_TOL:
            break
    return q


# --------------------------------------------------------- registration --

@dataclass
class _Side:
    """One input as the network sees it in a pass: conformed grid (its
    vox->RAS in the pass's mid-space), normalised image, feature maps."""
    conformed: object
    image: torch.Tensor
    features: torch.Tensor


def _side(model: Model, volume: Volume, pose: np.ndarray) -> _Side:
    cf = ModelSpace.of(model).conform(np.asarray(volume.data), pose @ volume.affine)
    x = normalize_intensities(cf.data)
    return _Side(cf, x, _features(model, x))


def _content_centre(volume: Volume) -> np.ndarray:
    """Intensity-weighted centroid (RAS mm) of the voxels above 5% of the
    99th percentile: the head, not the scanner origin."""
    data = np.asarray(volume.data, dtype=np.float32)
    step = max(1, int(round(np.cbrt(data.size / 2e6))))     # ~2M voxels is plenty for a centroid
    sub = data[::step, ::step, ::step]
    w = np.where(sub > 0.05 * np.percentile(sub, 99), sub, 0).astype(np.float64)
    if w.sum() <= 0:
        w = np.ones_like(w)
    idx = [np.arange(0, n, step) for n in data.shape]
    vox = np.array([np.tensordot(w.sum(axis=tuple(a for a in range(3) if a != k)), idx[k], 1) for k in range(3)])
    vox /= w.sum()
    return volume.affine[:3, :3] @ vox + volume.affine[:3, 3]


def canonical_order(volumes: Sequence[Volume]) -> list[int]:
    """A content-based order of the inputs (hash of voxels and header), the
    same for any permutation of the same inputs."""
    def key(v: Volume) -> str:
        h = hashlib.sha1(np.ascontiguousarray(np.asarray(v.data, dtype=np.float32)).tobytes())
        h.update(np.asarray(v.affine, np.float64).round(6).tobytes())
        return h.hexdigest()
    keys = [key(v) for v in volumes]
    return sorted(range(len(volumes)), key=lambda i: keys[i])


def _network_pass(model: Model, sides: list[_Side], s: np.ndarray, poses: list[np.ndarray]) -> dict:
    """The barycentre fit for every pair of :func:`network_pairs` of
    re-posed inputs, as pull-backs between the inputs' original RAS spaces.
    Each input's barycentres are computed once (not once per pair)."""
    si = np.linalg.inv(s)
    cents = []
    for sd in sides:
        frame = torch.as_tensor(s @ sd.conformed.affine, dtype=torch.float64).float()
        with torch.inference_mode(), torch.autocast(sd.features.device.type, enabled=False):
            cents.append(barycenters(sd.features[None].float(), frame[None].to(sd.features.device)))
    out = {}
    for i, j in network_pairs(len(sides)):
        with torch.inference_mode(), torch.autocast(sides[i].features.device.type, enabled=False):
            step = model.net.fit_barycenters(*cents[i], *cents[j])[0].double().cpu().numpy()
        mid = si @ step @ s                            # i's re-posed RAS -> j's re-posed RAS
        out[(i, j)] = np.linalg.inv(poses[j]) @ mid @ poses[i]
    return out


def _refine_pass(model: Model, volumes: list[Volume], sides: list[_Side], side_poses: list[np.ndarray],
                 poses: list[np.ndarray], s: np.ndarray, refine: tuple[int, ...], metric: str,
                 edges: list[tuple[int, int]], patches: int = PATCHES, seed: int = 0) -> dict:
    """Local-NCC^2 (``patches`` cubes per level) or feature refinement of
    each edge (fixed i, moving j) with both inputs placed by the current
    ``poses``; the conformed grids of the last network pass (made at
    ``side_poses``) are re-posed by matrix. Local NCC^2 refines each fixed
    input against all its partners in one call (:func:`refine_linear_group`:
    the same answer as pair by pair, the fixed side's pyramid, cubes and
    their values made once per input instead of once per pair), with each
    input's normalised native scan and feature mass made once. ``seed``
    draws each fixed input's cubes (the feature criterion has no random
    step)."""
    si = np.linalg.inv(s)
    rigid = model_kind(model) == "rigid"
    n = len(sides)
    # Old mid-space -> current mid-space, per input; then the frame centred at the brains.
    frame = [s @ poses[k] @ np.linalg.inv(side_poses[k]) for k in range(n)]
    placed = [torch.as_tensor(frame[k] @ sides[k].conformed.affine, dtype=torch.float64).float() for k in range(n)]
    corrections = {}
    if metric == "lncc":
        used = sorted({k for e in edges for k in e})
        natives = {k: (_normalised(volumes[k]), torch.as_tensor(s @ poses[k] @ volumes[k].affine,
                                                                  dtype=torch.float64).float()) for k in used}
        images = {k: sides[k].image.float().cpu() for k in used}
        for i in sorted({i for i, _ in edges}):
            partners = [j for f, j in edges if f == i]
            mass = sides[i].features.float().cpu().sum(0, keepdim=True)   # the criterion reads the fixed brain only
            out = refine_linear_group(mass, placed[i], images[i], [(images[j], placed[j]) for j in partners], rigid,
                                      iterations=refine[:-1], native_fixed=natives[i],
                                      native_movings=[natives[j] for j in partners], native_iterations=refine[-1],
                                      seed=seed, patches=patches)
            corrections.update({(i, j): e for j, e in zip(partners, out)})
    else:
        for i, j in edges:
            corrections[(i, j)] = refine_linear(sides[i].features.float().cpu(), sides[j].features.float().cpu(),
                                                placed[i], placed[j], rigid=rigid, iterations=refine)
    out = {}
    for i, j in edges:
        mid = si @ corrections[(i, j)].numpy() @ s            # i's placed RAS -> j's placed RAS
        out[(i, j)] = np.linalg.inv(poses[j]) @ mid @ poses[i]
    return out


def build_template(model: Model, volumes: Sequence[Volume], passes: int | None = None,
                   refine: tuple[int, ...] | None = None, refine_metric: str | None = None,
                   log=None, seed: int = 0) -> TemplateResult:
    """Poses of every input in an unbiased mid-space (module docstring).

    ``passes``/``refine``/``refine_metric``: as
    :func:`~synthtools.morph.register.register_linear` (defaults: the
    model's ``inference``). ``log``: optional callable taking one progress
    line. ``seed``: the refinement's draw of cubes (as
    :func:`~synthtools.morph.register.register_linear`). Only the first
    frame of a 4D input is used. The work runs in
    :func:`canonical_order`, so any permutation of the inputs gives the same
    poses (permuted), and two inputs swapped give exactly inverse relative
    transforms."""
    check_inputs(volumes)
    passes, refine, metric = linear_options(model, passes, refine, refine_metric)
    say = log or (lambda line: None)

    perm = canonical_order(volumes)
    vols = [_prepared(volumes[k]) for k in perm]
    n = len(vols)
    centre = np.mean([_content_centre(v) for v in vols], axis=0)
    s = _shift(centre)
    poses = [np.eye(4) for _ in range(n)]
    for p in range(passes):
        side_poses = [q.copy() for q in poses]
        sides = [_side(model, v, q) for v, q in zip(vols, poses)]
        poses = solve_poses(n, _network_pass(model, sides, s, side_poses), centre, init=poses)
        say(f"network pass {p + 1}/{passes}: {n} inputs, {len(network_pairs(n))} pairs")
    if any(refine):
        edges = partner_edges(n)
        patches = edge_patches(n)
        measured = _refine_pass(model, vols, sides, side_poses, poses, s, refine, metric, edges, patches, seed)
        poses = solve_poses(n, measured, centre, init=poses)
        say(f"refinement: {len(edges)} directed pairs, {patches} cubes each")
    brains = [_brain_points(sd, q) for sd, q in zip(sides, side_poses)]
    back = np.argsort(perm)       # canonical position of each input
    return TemplateResult([poses[k] for k in back], [brains[k] for k in back], None,
                          [as_geometry(v) for v in volumes], centre)


def _brain_points(side: _Side, side_pose: np.ndarray) -> np.ndarray:
    """Brain voxels (where the feature maps have mass) of a conformed side,
    as points in the input's own RAS (mm)."""
    mask = brain_mask(side.features.float().cpu(), threshold=0.5, dilate=0)
    vox = mask.nonzero().double().numpy()
    if len(vox) == 0:   # no brain found: the whole image
        vox = np.argwhere(np.ones(side.conformed.shape, bool)).astype(np.float64)[::97]
    aff = np.linalg.inv(side_pose) @ side.conformed.affine
    return vox @ aff[:3, :3].T + aff[:3, 3]


def halfway(model: Model, moving: Volume, fixed: Volume, **kw) -> TemplateResult:
    """``register -M``: the template of two images (poses[0]: fixed,
    poses[1]: moving). Swapping them gives the same halfway space."""
    return build_template(model, [fixed, moving], **kw)


# --------------------------------------------------------- template image --

def template_grid(result: TemplateResult, voxsize: float | None = None) -> Geometry:
    """The template grid: RAS-aligned, isotropic at ``voxsize`` mm (default:
    the finest voxel size of the inputs), covering the union of the inputs'
    brains in the template space plus :data:`GRID_MARGIN_MM`."""
    if voxsize is None:
        voxsize = min(float(np.min(np.linalg.norm(g.affine[:3, :3], axis=0))) for g in result.inputs)
    pts = np.concatenate([b @ q[:3, :3].T + q[:3, 3] for b, q in zip(result.brains, result.poses)])
    lo, hi = pts.min(0) - GRID_MARGIN_MM, pts.max(0) + GRID_MARGIN_MM
    shape = tuple(int(np.ceil((h - l) / voxsize)) + 1 for l, h in zip(lo, hi))
    affine = np.diag([voxsize, voxsize, voxsize, 1.0])
    affine[:3, 3] = lo
    return Geometry(shape, affine)


def _normalise_native(data: np.ndarray) -> tuple[float, float]:
    """Intensity scale of an input: its minimum and 99.5th percentile."""
    data = np.asarray(data, np.float32)
    step = max(1, int(round(np.cbrt(data.size / 4e6))))
    sub = data[::step, ::step, ::step]
    lo, hi = float(sub.min()), float(np.percentile(sub, 99.5))
    return lo, hi if hi > lo else lo + 1.0


def resample_input(result: TemplateResult, k: int, volume: Volume, order: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Input ``k`` resampled once into the template grid (first frame;
    ``order`` 1 trilinear, 0 nearest), and where the grid lies inside the
    input's field of view (bool)."""
    vol = _prepared(volume) if order == 1 else volume
    data = np.asarray(vol.data)
    data = data[..., 0] if data.ndim == 4 else data
    src = result.poses[k] @ vol.affine           # the input placed in the template space
    moved = resample(data, src, result.grid.affine, result.grid.shape, order=order)
    inside = resample(np.ones(data.shape, np.uint8), src, result.grid.affine, result.grid.shape, order=0) > 0
    return moved, inside


def template_image(result: TemplateResult, volumes: Sequence[Volume], slab: int = 16,
                   resampled: Sequence[tuple[np.ndarray, np.ndarray]] | None = None) -> np.ndarray:
    """The voxel-wise median of the inputs resampled into the template grid,
    each intensity-normalised (its minimum -> 0, 99.5th percentile -> 1);
    voxels outside an input's field of view do not count (0 where no input
    covers). ``resampled``: :func:`resample_input` of every input, if already
    done. Float32 on the template grid."""
    if resampled is None:
        resampled = [resample_input(result, k, v) for k, v in enumerate(volumes)]
    scales = [_normalise_native(_prepared(v).data) for v in volumes]
    out = np.zeros(result.grid.shape, np.float32)
    for x0 in range(0, out.shape[0], slab):
        part = slice(x0, x0 + slab)
        stack = np.stack([np.where(inside[part], (np.asarray(r[part], np.float32) - lo) / (hi - lo), np.nan)
                          for (r, inside), (lo, hi) in zip(resampled, scales)])
        with warnings.catch_warnings():     # voxels no input covers: all-NaN, 0 below
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanmedian(stack, axis=0)
        out[part] = np.nan_to_num(med, nan=0.0)
    return out
