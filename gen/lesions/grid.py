"""``lesion_grid.png``: counterfactual pairs side by side (healthy source | lesion mask | injured crop)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def save_lesion_grid(
    path: str | Path,
    sources: np.ndarray,
    lesion_masks: np.ndarray,
    injured: np.ndarray,
    title: str,
    captions: Sequence[str] | None = None,
    n_rows: int = 6,
    n_pairs_per_row: int = 2,
) -> Path:
    """Draw up to ``n_rows * n_pairs_per_row`` pairs: the source, its mask outlined on it, the injured crop.

    Parameters
    ----------
    sources : ndarray of shape (n, S, S), float in [0, 1]
        Healthy source crops, windowed.
    lesion_masks : ndarray of shape (n, S, S), bool
    injured : ndarray of shape (n, S, S), float in [0, 1]
        The synthetic injured crops, windowed as ``sources``.
    title : str
    captions : sequence of n str, optional
        Under each injured crop (e.g. the kind and grade).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(len(sources), n_rows * n_pairs_per_row)
    rows = max(1, -(-n // n_pairs_per_row))
    fig, axes = plt.subplots(rows, 3 * n_pairs_per_row, figsize=(1.5 * 3 * n_pairs_per_row, 1.6 * rows + 0.6),
                             squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    for i in range(n):
        r, c = divmod(i, n_pairs_per_row)
        a_src, a_mask, a_out = axes[r, 3 * c], axes[r, 3 * c + 1], axes[r, 3 * c + 2]
        a_src.imshow(sources[i], cmap="gray", vmin=0.0, vmax=1.0)
        a_mask.imshow(sources[i], cmap="gray", vmin=0.0, vmax=1.0)
        if np.asarray(lesion_masks[i]).any():
            a_mask.contour(np.asarray(lesion_masks[i], dtype=float), levels=[0.5], colors="red", linewidths=0.8)
        a_out.imshow(injured[i], cmap="gray", vmin=0.0, vmax=1.0)
        if captions is not None:
            a_out.set_xlabel(str(captions[i]), fontsize=7)
        if r == 0:
            for ax, name in ((a_src, "healthy source"), (a_mask, "lesion mask"), (a_out, "synthetic injured")):
                ax.set_title(name, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
