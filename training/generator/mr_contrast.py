"""Physically plausible MR contrasts for the label maps: per-label tissue
parameters (T1, T2 in ms at ~1.5 T, proton density as a fraction) pushed
through the signal equation of a random sequence. Uniform GMM draws make
every contrast equally likely, so the few that real scanners produce --
FLAIR with CSF, dura and bone all dark while grey matter outshines white
matter -- are a small corner of the training set; these draws put a share of
the samples right there, with the parameters jittered so that no single
scanner setting is learnt.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .rng import randint, uniform

# Nominal (T1 ms, T2 ms, PD), brain values near published 1.5 T figures.
TISSUE = {
    "wm": (650.0, 75.0, 0.70),
    "gm": (1050.0, 95.0, 0.82),
    "deep_gm": (880.0, 85.0, 0.78),
    "csf": (3800.0, 1600.0, 1.00),
    "lesion": (1150.0, 150.0, 0.86),
    "fat": (300.0, 80.0, 0.90),
    "muscle": (1000.0, 45.0, 0.80),
    "skin": (800.0, 60.0, 0.70),
    "marrow": (550.0, 80.0, 0.85),
    "fluid": (3000.0, 1000.0, 1.00),   # eyes, sinus fluid
    "bone": (400.0, 5.0, 0.05),        # cortical bone: almost no signal
    "air": (1000.0, 1.0, 0.0),
}
WM = {2, 41, 7, 46, 16, 28, 60, 85}
GM = {3, 42, 8, 47}
DEEP_GM = {10, 49, 11, 50, 12, 51, 13, 52, 17, 53, 18, 54, 26, 58, 136, 137, 163, 164}
CSF = {4, 5, 14, 15, 24, 43, 44, 72}
LESION = {25, 57}
BONE = {515}      # the skull of the label maps' extra-cerebral clusters
# Other extra-cerebral clusters (500+) are of unknown tissue: each gets one of
# these per sample; vessels (30, 62) get flow-dark or flow-bright blood.
EXTRA = ("fat", "muscle", "skin", "marrow", "fluid", "bone")
SEQUENCES = ("spgr", "mprage", "t1_se", "t2_se", "pd_se", "flair")


def _tissue_of(value: int, gen: torch.Generator) -> str:
    for names, tissue in ((WM, "wm"), (GM, "gm"), (DEEP_GM, "deep_gm"), (CSF, "csf"),
                          (LESION, "lesion"), (BONE, "bone")):
        if value in names:
            return tissue
    if value == 0:
        return "air"
    if value in (30, 62):
        return ("air", "fluid")[randint(gen, 0, 1)]
    return EXTRA[randint(gen, 0, len(EXTRA) - 1)]


# Setting ranges per sequence (ms, flip angle in degrees): U(low, high) each.
SETTINGS = {
    "spgr": {"tr": (10, 30), "te": (2, 8), "fa": (10, 40)},       # spoiled gradient echo, T1-weighted
    "mprage": {"ti": (700, 1100), "te": (2, 5)},                  # inversion-prepared T1 (magnitude)
    "t1_se": {"tr": (400, 700), "te": (8, 20)},
    "t2_se": {"tr": (2500, 6000), "te": (80, 130)},
    "pd_se": {"tr": (2000, 5000), "te": (8, 30)},
    "flair": {"tr": (6000, 11000), "te": (80, 140), "ti_null": (0.95, 1.05)},  # TI near the CSF null
}


def random_settings(sequence: str, gen: torch.Generator) -> dict[str, float]:
    """One draw of ``sequence``'s settings from :data:`SETTINGS`."""
    if sequence not in SETTINGS:
        raise ValueError(f"unknown sequence {sequence!r}; known: {SEQUENCES}")
    return {k: uniform(gen, *r) for k, r in SETTINGS[sequence].items()}


def signal(t1: torch.Tensor, t2: torch.Tensor, pd: torch.Tensor, sequence: str,
           settings: dict[str, float]) -> torch.Tensor:
    """Magnitude signal (a.u.) of tissues (T1, T2 in ms; PD) for one
    ``sequence`` with ``settings`` (tr, te, ti in ms, fa in degrees; FLAIR:
    ti_null, the inversion time as a fraction of the one nulling CSF of
    T1 = t1_csf ms, default :data:`TISSUE`'s)."""
    p = settings
    if sequence == "spgr":
        e1, fa = torch.exp(-p["tr"] / t1), math.radians(p["fa"])
        s = math.sin(fa) * (1 - e1) / (1 - math.cos(fa) * e1)
    elif sequence == "mprage":
        s = (1 - 2 * torch.exp(-p["ti"] / t1)).abs()
    elif sequence in ("t1_se", "t2_se", "pd_se"):
        s = 1 - torch.exp(-p["tr"] / t1)
    elif sequence == "flair":
        t1_csf = p.get("t1_csf", TISSUE["csf"][0])
        ti = t1_csf * math.log(2 / (1 + math.exp(-p["tr"] / t1_csf))) * p["ti_null"]
        s = (1 - 2 * torch.exp(-ti / t1) + torch.exp(-p["tr"] / t1)).abs()
    else:
        raise ValueError(f"unknown sequence {sequence!r}; known: {SEQUENCES}")
    return pd * s * torch.exp(-p["te"] / t2)


def mr_means(values: Sequence[int], gen: torch.Generator, jitter: float = 0.15) -> torch.Tensor:
    """Per-label means in [0, 1] (the brightest label = 1) of a random
    sequence on the tissues of ``values`` (label values, one per index).
    Each tissue's T1, T2 and PD are scaled by U(1 - jitter, 1 + jitter) per
    sample, and each label by a further U(0.95, 1.05), so structures of one
    tissue still differ a little."""
    tissues = [_tissue_of(int(v), gen) for v in values]
    scale = {t: uniform(gen, 1 - jitter, 1 + jitter, n=3) for t in sorted(set(tissues))}
    params = torch.tensor([[p * f for p, f in zip(TISSUE[t], scale[t])] for t in tissues], dtype=torch.float64)
    params[:, 2] *= torch.tensor(uniform(gen, 0.95, 1.05, n=len(values)), dtype=torch.float64)
    sequence = SEQUENCES[randint(gen, 0, len(SEQUENCES) - 1)]
    s = signal(params[:, 0], params[:, 1], params[:, 2], sequence, random_settings(sequence, gen))
    return (s / s.max().clamp_min(1e-12)).to(torch.float32)
