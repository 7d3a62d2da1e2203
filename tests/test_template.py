"""Unbiased within-subject template (synthtools.morph.template, ``synthmorph
template``, ``synthmorph register -M``): the pose averaging (exact on
consistent measurements, inverse-consistent, Karcher gauge, permutation
equivariant), the shipped rigid model on downsampled BrainWeb volumes
(identity for copies, permutation invariance, inverse consistency, recovery
of a known motion with 3 and 4 inputs; skipped without ../shared/data), the
refinement pairs and their shared cube budget, the template image and grid,
one-line errors for bad inputs and atomic outputs."""
from __future__ import annotations

import itertools
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.linalg import logm

from synthtools.conform import resample
from synthtools.io import InputError, Volume
from synthtools.morph import as_geometry, read_transform
from synthtools.morph.refine import PATCHES, refine_linear, refine_linear_group
from synthtools.morph.template import (PATCH_BUDGET, _karcher_gauge, build_template, check_inputs, edge_patches,
                                       network_pairs, partner_edges, solve_poses, template_grid, template_image)
from synthtools.nets.registration import BarycenterAffine, barycenters

from conftest import rotation  # noqa: E402  (tests/ is on sys.path)
from helpers import one_error_line, synthmorph  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "validation" / "brainweb_subject04"
FAST = dict(refine=(20, 20, 10))     # fewer refinement steps than the model's (40, 40, 30): test speed


def rigid(deg, shift, centre=(0.0, -18.0, 18.0)) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = rotation(deg)
    c = np.asarray(centre)
    m[:3, 3] = c - m[:3, :3] @ c + np.asarray(shift, float)
    return m


def brain_disp(a: np.ndarray, b: np.ndarray, centre=(0.0, -18.0, 18.0), radius=60.0) -> float:
    """Mean distance (mm) between where ``a`` and ``b`` send points of a
    ball of ``radius`` mm around ``centre`` (a brain-sized region)."""
    g = np.stack(np.meshgrid(*[np.linspace(-radius, radius, 9)] * 3, indexing="ij"), -1).reshape(-1, 3)
    pts = g[np.linalg.norm(g, axis=1) <= radius] + np.asarray(centre)
    d = (a - b)[:3]
    return float(np.mean(np.linalg.norm(pts @ d[:3, :3].T + d[:3, 3], axis=1)))


# -------------------------------------------------------------- pose algebra

def test_solve_poses_exact_on_consistent_measurements_and_karcher_gauge():
    truth = [rigid((5, -10, 8), (3, -12, 7)), rigid((-9, 4, 2), (-15, 6, 1)), rigid((2, 12, -6), (8, 10, -9))]
    centre = np.array([0.0, -18.0, 18.0])
    meas = {(i, j): np.linalg.inv(truth[j]) @ truth[i] for i, j in itertools.permutations(range(3), 2)}
    q = solve_poses(3, meas, centre)
    for i, j in itertools.permutations(range(3), 2):      # the relative transforms are recovered
        assert brain_disp(np.linalg.inv(q[j]) @ q[i], meas[(i, j)]) < 1e-6
    s = np.eye(4)
    s[:3, 3] = -centre
    logs = [np.real(logm(s @ m @ np.linalg.inv(s))) for m in q]
    assert np.abs(np.sum(logs, axis=0)).max() < 1e-8      # the template is the Karcher mean of the poses
    for m in q:                                           # rigid, exactly affine
        assert np.allclose(m[:3, :3] @ m[:3, :3].T, np.eye(3), atol=1e-9)
        assert np.array_equal(m[3], [0, 0, 0, 1])


def test_two_inconsistent_measurements_give_inverse_consistent_midpoint():
    """A->B and B->A that disagree: the poses give one relative transform,
    the halfway of the two (each 0.5 mm-ish away), and swapping the inputs
    gives exactly its inverse."""
    t_ab = rigid((6, -3, 4), (5, 2, -3))
    t_ba_inv = t_ab @ rigid((0.4, 0, -0.3), (0.3, -0.2, 0.4))   # inv(T_BA): not equal to T_AB
    centre = np.array([0.0, -18.0, 18.0])
    q = solve_poses(2, {(0, 1): t_ab, (1, 0): np.linalg.inv(t_ba_inv)}, centre)
    q_swap = solve_poses(2, {(1, 0): t_ab, (0, 1): np.linalg.inv(t_ba_inv)}, centre)
    rel = np.linalg.inv(q[1]) @ q[0]                      # A -> B
    rel_swap = np.linalg.inv(q_swap[0]) @ q_swap[1]       # B's slot is 0 now: A -> B again
    assert brain_disp(rel, rel_swap) < 1e-9
    # Halfway: as far from either measurement.
    assert abs(brain_disp(rel, t_ab) - brain_disp(rel, t_ba_inv)) < 0.02
    assert brain_disp(rel, t_ab) < brain_disp(t_ab, t_ba_inv)


def test_partner_edges_measure_every_pair_both_ways_then_stay_linear():
    for n in range(2, 10):                      # up to 8 partners: all ordered pairs
        assert sorted(partner_edges(n)) == sorted(itertools.permutations(range(n), 2))
    for n in (10, 13, 40):                      # above: 8 ring neighbours each, 8n pairs
        e = partner_edges(n)
        assert len(e) == 8 * n and len(set(e)) == len(e) and all(i != j for i, j in e)
        assert sorted(i for i, _ in e) == sorted(j for _, j in e) == sorted(list(range(n)) * 8)
        assert {frozenset(p) for p in e} == {frozenset((i, (i + k) % n)) for i in range(n) for k in range(1, 5)}
    assert partner_edges(1) == []


def test_edge_patches_share_a_fixed_budget_per_input():
    """Each input's cubes over all its pairs add up to the same budget
    whatever n (the cost per input does not grow with n), and no pair gets
    more than one pairwise registration's."""
    assert edge_patches(2) == PATCHES
    for n in (3, 4, 6, 9, 10, 25):
        partners = len(partner_edges(n)) / n
        per_input = edge_patches(n) * partners
        assert edge_patches(n) <= PATCHES
        assert min(PATCH_BUDGET, PATCHES * partners) - partners <= per_input <= PATCH_BUDGET
    assert edge_patches(6, budget=PATCHES) == PATCHES // 5


def test_network_pairs_are_every_pair_then_the_refinement_ring():
    for n in range(2, 10):
        assert network_pairs(n) == list(itertools.combinations(range(n), 2))
    for n in (10, 13, 40):                      # linear: each ring pair once, 4n of them
        pairs = network_pairs(n)
        assert len(pairs) == 4 * n and all(i < j for i, j in pairs)
        assert {frozenset(p) for p in pairs} == {frozenset(e) for e in partner_edges(n)}


def test_fit_from_cached_barycentres_is_the_fit():
    """The network pass computes each input's barycentres once and fits every
    pair from them: the same transform as fitting the maps pair by pair."""
    torch.manual_seed(0)
    for rigid_net in (True, False):
        net = BarycenterAffine(rigid=rigid_net, keypoints=6, features=(4, 4))
        fa, fb = torch.rand(1, 6, 10, 11, 12), torch.rand(1, 6, 12, 10, 9)
        va, vb = torch.eye(4)[None], torch.eye(4)[None] * 1.5
        va[0, :3, 3], vb[0, 3, 3] = torch.tensor([3.0, -2.0, 5.0]), 1.0
        assert torch.equal(net.fit(fa, fb, va, vb), net.fit_barycenters(*barycenters(fa, va), *barycenters(fb, vb)))


def _blob_image(shape, centre, seed: int) -> torch.Tensor:
    """A smooth random image with a bright ellipsoid (something to align)."""
    g = torch.Generator().manual_seed(seed)
    rough = torch.nn.functional.interpolate(torch.rand((1, 1) + tuple(s // 4 for s in shape), generator=g),
                                            size=shape, mode="trilinear")[0, 0]
    idx = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"), -1)
    blob = (((idx - torch.tensor(centre)) / torch.tensor([6.0, 8.0, 5.0])) ** 2).sum(-1) < 1
    return rough + 2 * blob.float()


def test_group_refinement_equals_pair_by_pair():
    """One fixed image refined against several moving ones at once (the
    template's refinement) gives each pair exactly its own refinement:
    same cubes, own parameters and Adam state, own gradient."""
    shape, native_shape = (24, 26, 22), (40, 44, 36)
    mass = torch.zeros((1,) + shape)
    mass[0, 5:19, 5:21, 4:18] = 1.0
    fixed = _blob_image(shape, (12, 13, 11), 0)
    a = torch.eye(4) * 2.0
    a[3, 3], a[:3, 3] = 1.0, torch.tensor([-24.0, -26.0, -22.0])
    na = torch.eye(4) * 1.2
    na[3, 3], na[:3, 3] = 1.0, torch.tensor([-24.0, -26.0, -22.0])
    movings, natives = [], []
    for k, shift in enumerate(([0.6, -0.4, 0.3], [-0.8, 0.2, 0.5], [0.1, 0.7, -0.6])):
        b = a.clone()
        b[:3, 3] += torch.tensor(shift)       # a small header offset: something to correct
        movings.append((_blob_image(shape, (12, 13, 11), k + 1), b))
        nb = na.clone()
        nb[:3, 3] += torch.tensor(shift)
        natives.append((_blob_image(native_shape, (20, 22, 18), k + 10), nb))
    native_fixed = (_blob_image(native_shape, (20, 22, 18), 9), na)
    kw = dict(iterations=(6, 6), native_iterations=5, patches=50)
    group = refine_linear_group(mass, a, fixed, movings, True, native_fixed=native_fixed, native_movings=natives, **kw)
    assert len(group) == 3
    for (m, b), (nm, nb), e in zip(movings, natives, group):
        alone = refine_linear(mass, None, a, b, rigid=True, images=(fixed, m), native=(*native_fixed, nm, nb), **kw)
        assert torch.allclose(e, alone, atol=1e-6)
        assert not torch.allclose(e, torch.eye(4, dtype=e.dtype), atol=1e-4)    # it did move


def test_karcher_gauge_of_identical_poses_is_identity():
    q = _karcher_gauge([rigid((3, 2, 1), (4, 5, 6))] * 3)
    assert all(np.allclose(m, np.eye(4), atol=1e-9) for m in q)


# --------------------------------------------------------- input checking

def vol(shape=(8, 9, 10), value=1.0, path="x.nii.gz") -> Volume:
    data = np.zeros(shape, np.float32)
    data[2:6, 2:6, 2:6] = value
    return Volume(data, np.eye(4), None, path)


def test_check_inputs_rejects_bad_sets_in_one_line():
    cases = [([vol()], "at least two"), ([vol(), vol((8, 9, 1))], "2D"), ([vol(), vol(value=0.0)], "empty"),
             ([vol((8, 9, 10, 2)), vol((8, 9, 10, 3))], "frames"), ([vol(), vol((8, 9, 10, 2))], "frames")]
    for volumes, words in cases:
        with pytest.raises(InputError) as exc:
            check_inputs(volumes)
        assert words in str(exc.value) and "\n" not in str(exc.value)
    check_inputs([vol(), vol((8, 9, 10, 1))])     # one frame is a 3D image


def test_cli_bad_inputs_are_one_line_errors(tmp_path, capsys):
    good = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(vol().data, np.eye(4)), str(good))
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(1).random((8, 9), np.float32), np.eye(4)), str(flat))
    four = [tmp_path / "f2.nii.gz", tmp_path / "f3.nii.gz"]
    for path, frames in zip(four, (2, 3)):
        nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 9, 10, frames), np.float32), np.eye(4)), str(path))
    out = tmp_path / "t.nii.gz"
    runs = [((good, "-o", out), 2, "at least two"), ((good, flat, "-o", out), 1, flat.name),
            ((four[0], four[1], "-o", out), 1, "frames"), ((good, good, "-o", out), 2, "named"),
            ((good, tmp_path / "missing.nii.gz", "-o", out), 1, "missing"),
            ((good, four[0], "-o", tmp_path / "no" / "t.nii.gz"), 2, "does not exist"),
            ((good, four[0], "-o", out, "--itk"), 2, "--itk")]
    for args, code, words in runs:
        rc, err = synthmorph("template", *args, capsys=capsys)
        assert rc == code, (args, err)
        assert words in one_error_line(err)
    assert not out.exists()
    rc, err = synthmorph("register", "-m", "joint", "-M", good, four[0], "-o", out, capsys=capsys)
    assert rc == 2 and "-M" in one_error_line(err)


# ------------------------------------------------- the network on real data

needs_data = pytest.mark.skipif(not (DATA / "T1w_sim.nii.gz").is_file(), reason="no ../shared/data BrainWeb")


@pytest.fixture(scope="module")
def model():
    from synthtools.weights import load_model
    return load_model("synthmorph-rigid")


def small(contrast: str, move: np.ndarray | None = None, vs: float = 2.5) -> Volume:
    """A BrainWeb volume at ``vs`` mm, its header moved by ``move`` (pull: anatomy at p now at move @ p)."""
    img = nib.load(str(DATA / f"{contrast}_sim.nii.gz"))
    a = img.affine.copy()
    a[:3, :3] *= vs
    shape = tuple(int(np.ceil(n / vs)) for n in img.shape)
    data = resample(np.asarray(img.dataobj, np.float32), img.affine, a, shape)
    return Volume(data, (np.eye(4) if move is None else move) @ a, None, f"{contrast}.nii.gz")


@needs_data
def test_copies_of_one_image_give_identity_transforms(model):
    v = small("T1w")
    res = build_template(model, [v, Volume(v.data.copy(), v.affine), Volume(v.data.copy(), v.affine)], **FAST)
    for q in res.poses:
        # Adam steps of the refinement are normalised: float noise on identical images leaves ~0.02 mm.
        assert brain_disp(q, np.eye(4)) < 0.05


@needs_data
def test_seed_draws_the_refinement_cubes_in_both_paths(model, monkeypatch):
    """``seed`` (default 0) reaches the local-NCC^2 refinement of the pairwise
    mode and of the template: every draw of cubes uses a generator seeded
    with it, and another seed gives a different but equally good answer.
    (The draws are compared, not the matrices: float sums may round
    differently from call to call, e.g. with the buffer's alignment, so
    bit-identical matrices across calls are not a property we can promise.)"""
    import synthtools.morph.refine as refine_module
    from synthtools.morph.register import register_linear
    seeds: list[int] = []
    draw = refine_module.patch_centres

    def recorded(feat, count, gen):
        seeds.append(gen.initial_seed())
        return draw(feat, count, gen)

    monkeypatch.setattr(refine_module, "patch_centres", recorded)

    def drawn_with(call) -> tuple[object, set[int]]:
        seeds.clear()
        out = call()
        assert seeds, "the refinement drew no cubes"
        return out, set(seeds)

    move = rigid((6, -4, 5), (5, -6, 4))
    fixed, moving = small("T1w"), small("T2w", move)
    truth = move                                       # fixed RAS -> moving RAS
    kw = dict(refine=FAST["refine"], refine_metric="lncc")
    pair = {}
    for s in (0, 1):
        pair[s], used = drawn_with(lambda: register_linear(model, moving, fixed, seed=s, **kw).matrix)
        assert used == {s}
    assert drawn_with(lambda: register_linear(model, moving, fixed, **kw))[1] == {0}
    assert not np.array_equal(pair[0], pair[1])
    assert all(brain_disp(m, truth) < 0.5 for m in pair.values())
    vols = [fixed, moving]
    tpl = {}
    for s in (0, 1):
        tpl[s], used = drawn_with(lambda: build_template(model, vols, seed=s, **FAST).poses)
        assert used == {s}
    assert drawn_with(lambda: build_template(model, vols, **FAST))[1] == {0}
    assert any(not np.array_equal(a, b) for a, b in zip(tpl[0], tpl[1]))
    for poses in tpl.values():
        assert brain_disp(np.linalg.inv(poses[1]) @ poses[0], truth) < 0.5


@pytest.mark.slow
@needs_data
def test_known_motion_permutation_and_inverse_consistency(model):
    moves = [np.eye(4), rigid((8, -5, 6), (6, -8, 5)), rigid((-6, 7, -4), (-7, 4, 9))]
    vols = [small(c, m) for c, m in zip(("T1w", "T2w", "PDw"), moves)]
    res = build_template(model, vols, **FAST)
    for i, j in itertools.permutations(range(3), 2):   # relative transforms: i RAS -> j RAS
        assert brain_disp(np.linalg.inv(res.poses[j]) @ res.poses[i], moves[j] @ np.linalg.inv(moves[i])) < 0.5
    perm = [2, 0, 1]
    res_p = build_template(model, [vols[k] for k in perm], **FAST)
    for k, p in enumerate(perm):                       # the same pose for the same input
        assert brain_disp(res_p.poses[k], res.poses[p]) < 1e-4
    # The same template image, up to interpolation (here: identical poses, identical grid).
    res.grid, res_p.grid = template_grid(res), template_grid(res_p)
    assert res.grid.same_grid(res_p.grid)
    img = template_image(res, vols)
    img_p = template_image(res_p, [vols[k] for k in perm])
    assert np.abs(img - img_p).max() < 1e-4 and img.max() > 0.5
    # Inverse consistency: A->B and B->A compose to the identity.
    ab = build_template(model, vols[:2], **FAST)
    ba = build_template(model, vols[1::-1], **FAST)
    t_ab = np.linalg.inv(ab.poses[1]) @ ab.poses[0]
    t_ba = np.linalg.inv(ba.poses[1]) @ ba.poses[0]
    assert brain_disp(t_ab @ t_ba, np.eye(4)) < 0.05
    # The template lies between the inputs: each pose moves its brain by a similar amount.
    grid = template_grid(ab)
    assert min(grid.shape) > 40 and np.allclose(np.abs(np.diag(grid.affine)[:3]), 2.5, atol=1e-4)


@pytest.mark.slow
@needs_data
def test_four_inputs_recover_known_motion_and_permute(model):
    """Above 3 inputs (12 refinement pairs of 666 cubes): the relative
    transforms of a known motion, and the same poses for a permutation."""
    moves = [np.eye(4), rigid((8, -5, 6), (6, -8, 5)), rigid((-6, 7, -4), (-7, 4, 9)), rigid((4, 6, -7), (-5, -6, 3))]
    vols = [small(c, m) for c, m in zip(("T1w", "T2w", "PDw", "T1w"), moves)]
    res = build_template(model, vols, **FAST)
    for i, j in itertools.permutations(range(4), 2):
        assert brain_disp(np.linalg.inv(res.poses[j]) @ res.poses[i], moves[j] @ np.linalg.inv(moves[i])) < 0.5
    perm = [3, 1, 0, 2]
    res_p = build_template(model, [vols[k] for k in perm], **FAST)
    for k, p in enumerate(perm):
        assert brain_disp(res_p.poses[k], res.poses[p]) < 1e-4


@pytest.mark.slow
@needs_data
def test_cli_template_outputs_and_atomic_writes(tmp_path, capsys):
    moves = [np.eye(4), rigid((5, -4, 3), (4, -3, 6))]
    paths = []
    for c, m in zip(("T1w", "T2w"), moves):
        v = small(c, m, vs=3.0)
        paths.append(tmp_path / f"{c}.nii.gz")
        nib.save(nib.Nifti1Image(v.data.astype(np.int16), v.affine), str(paths[-1]))
    out = tmp_path / "tpl.nii.gz"
    rc, err = synthmorph("template", *paths, "-o", out, "-t", tmp_path / "xf", "-O", tmp_path / "res", "--itk",
                         "-j", "1", capsys=capsys)
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path / "xf")) == ["T1w.lta", "T1w.txt", "T2w.lta", "T2w.txt"]
    assert sorted(os.listdir(tmp_path / "res")) == ["T1w.nii.gz", "T2w.nii.gz"]
    tpl = nib.load(str(out))
    for p in paths:
        moved = nib.load(str(tmp_path / "res" / p.name))
        assert moved.shape == tpl.shape and np.allclose(moved.affine, tpl.affine)
        assert moved.get_data_dtype() == np.int16
        t = read_transform(tmp_path / "xf" / f"{p.stem.split('.')[0]}.lta")
        assert t.fixed.same_grid(as_geometry(tpl))
    # The two transforms give T1 -> T2 = the known move.
    q = [np.linalg.inv(read_transform(tmp_path / "xf" / f"{c}.lta").matrix) for c in ("T1w", "T2w")]
    assert brain_disp(np.linalg.inv(q[1]) @ q[0], moves[1]) < 0.6
    # A failing write (a folder where a transform goes) leaves no partial or temporary file.
    (tmp_path / "xf2").mkdir()
    (tmp_path / "xf2" / "T2w.lta").mkdir()
    out2 = tmp_path / "tpl2.nii.gz"
    rc, err = synthmorph("template", *paths, "-o", out2, "-t", tmp_path / "xf2", "-j", "1", capsys=capsys)
    assert rc == 1 and "T2w.lta" in one_error_line(err)
    assert sorted(os.listdir(tmp_path / "xf2")) == ["T1w.lta", "T2w.lta"]
    assert not any(n.startswith(".") or "tmp" in n for n in os.listdir(tmp_path))


@pytest.mark.slow
@needs_data
def test_register_middle_moves_both_images_halfway(tmp_path, capsys):
    move = rigid((6, -4, 5), (5, -6, 4))
    paths = []
    for c, m in zip(("T1w", "PDw"), (np.eye(4), move)):
        v = small(c, m, vs=3.0)
        paths.append(tmp_path / f"{c}.nii.gz")
        nib.save(nib.Nifti1Image(v.data, v.affine), str(paths[-1]))
    rc, err = synthmorph("register", "-m", "rigid", "-M", paths[1], paths[0], "-o", tmp_path / "m.nii.gz",
                         "-O", tmp_path / "f.nii.gz", "-t", tmp_path / "m.lta", "-T", tmp_path / "f.lta", "-j", "1",
                         capsys=capsys)
    assert rc == 0, err
    to_m = read_transform(tmp_path / "m.lta").matrix     # halfway -> moving
    to_f = read_transform(tmp_path / "f.lta").matrix     # halfway -> fixed
    assert brain_disp(to_m @ np.linalg.inv(to_f), move) < 0.6
    # Halfway: each image moves by about half of the motion.
    assert abs(brain_disp(to_m, np.eye(4)) - brain_disp(to_f, np.eye(4))) < 0.3
    a, b = nib.load(str(tmp_path / "m.nii.gz")), nib.load(str(tmp_path / "f.nii.gz"))
    assert a.shape == b.shape and np.allclose(a.affine, b.affine)
