"""Scalar random draws from a ``torch.Generator``, used by the generator's
steps and the training recipes: a sample's seed alone decides every choice,
so it reproduces the sample exactly (no global random state)."""
from __future__ import annotations

import torch

__all__ = ["randint", "uniform"]


def randint(gen: torch.Generator, low: int, high: int) -> int:
    """One integer uniformly from [low, high] (both inclusive)."""
    return int(torch.randint(int(low), int(high) + 1, (1,), generator=gen))


def uniform(gen: torch.Generator, low: float, high: float, n: int | None = None):
    """Uniform sample(s) from [low, high]; a float when ``n`` is None."""
    u = torch.rand(1 if n is None else n, generator=gen, dtype=torch.float64)
    u = low + (high - low) * u
    return float(u) if n is None else u.tolist()
