"""PNG grids of synthetic samples: three orthogonal middle slices each."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def grid_png(volumes: Sequence[np.ndarray], path: str, cols: int = 6) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = math.ceil(len(volumes) / cols)
    fig, axes = plt.subplots(rows, cols * 3, figsize=(cols * 3 * 1.2, rows * 1.3))
    axes = np.atleast_2d(axes)
    for ax in axes.ravel():
        ax.axis("off")
    for k, vol in enumerate(volumes):
        r, c = divmod(k, cols)
        for j in range(min(3, vol.ndim)):
            sl = np.take(vol, vol.shape[j] // 2, axis=j) if vol.ndim == 3 else vol
            axes[r, c * 3 + j].imshow(np.rot90(sl), cmap="gray", vmin=0, vmax=1)
    fig.subplots_adjust(wspace=0.02, hspace=0.02, left=0, right=1, top=1, bottom=0)
    fig.savefig(path, dpi=80)
    plt.close(fig)
