"""``grid.png``: real training slices beside synthetic ones, one row per class."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def save_grid(
    path: str | Path,
    real: Any,
    real_labels: np.ndarray,
    synth: np.ndarray,
    synth_labels: np.ndarray,
    class_names: list[str],
    title: str,
    n_cols: int = 6,
    seed: int = 0,
    near_copy: np.ndarray | None = None,
) -> Path:
    """Draw ``n_cols`` real and ``n_cols`` synthetic slices per class (windowed grey levels).

    Parameters
    ----------
    real : array-like of shape (n_real, S, S), float in [0, 1]
    real_labels : ndarray of shape (n_real,)
    synth : ndarray of shape (n_synth, S, S), float in [0, 1]
    synth_labels : ndarray of shape (n_synth,)
    class_names : list of str
        Row titles, in label order.
    near_copy : ndarray of shape (n_synth,), bool, optional
        Flagged synthetic slices get a red frame.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    n_rows = len(class_names)
    fig, axes = plt.subplots(n_rows, 2 * n_cols, figsize=(1.3 * 2 * n_cols + 0.4, 1.45 * n_rows + 0.6), squeeze=False)
    for c, name in enumerate(class_names):
        real_rows = np.flatnonzero(np.asarray(real_labels) == c)
        syn_rows = np.flatnonzero(np.asarray(synth_labels) == c)
        real_pick = np.sort(rng.choice(real_rows, min(n_cols, len(real_rows)), replace=False))
        syn_pick = syn_rows[:n_cols]
        real_imgs = np.asarray(real[real_pick]) if len(real_pick) else np.zeros((0, 1, 1))
        for j in range(2 * n_cols):
            ax = axes[c, j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            is_real = j < n_cols
            k = j if is_real else j - n_cols
            if is_real and k < len(real_imgs):
                ax.imshow(real_imgs[k], cmap="gray", vmin=0.0, vmax=1.0)
            elif not is_real and k < len(syn_pick):
                ax.imshow(synth[syn_pick[k]], cmap="gray", vmin=0.0, vmax=1.0)
                if near_copy is not None and near_copy[syn_pick[k]]:
                    for spine in ax.spines.values():
                        spine.set_visible(True)
                        spine.set_color("red")
                        spine.set_linewidth(2)
            if j == 0:
                ax.set_ylabel(name, fontsize=11)
            if c == 0 and j in (0, n_cols):
                ax.set_title("real (training)" if is_real else "synthetic", loc="left", fontsize=10)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
