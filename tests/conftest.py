"""Shared fixtures: small slice sets built in memory, so stage tests need no DICOM.

``toy_slice_set`` draws a crude abdomen: an elliptic body (soft tissue ~40 HU
in air), a round "organ" (~60 HU) and, on injured slices, a dark irregular
lesion (~10 HU) inside it. It has every manifest column a real store has.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from toolkit import GRADED_ORGANS, ORGANS
from toolkit.sliceset import SliceSet


def make_toy_slice_set(
    n_patients: int = 24,
    slices_per_patient: int = 6,
    size: int = 32,
    prevalence: float = 0.4,
    folds: int = 3,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> SliceSet:
    """A slice set of ``n_patients`` with every organ injured in ~``prevalence`` of patients.

    Split: the last ``test_fraction`` of patients are test, the rest get folds 0..folds-1
    round-robin (patients of each label are interleaved so every fold holds positives).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images, rows = [], []
    n_test = max(2, int(round(n_patients * test_fraction)))
    grades = {}
    for p in range(n_patients):
        grades[p] = {}
        for organ in ORGANS:
            injured = (p + ORGANS.index(organ)) % max(2, int(round(1 / prevalence))) == 0
            grade = 0
            if injured:
                grade = 2 if (organ in GRADED_ORGANS and p % 2) else 1
            grades[p][organ] = grade
    for p in range(n_patients):
        split = "test" if p >= n_patients - n_test else "train"
        fold = -1 if split == "test" else p % folds
        cx, cy = 0.5 + rng.normal(0, 0.03), 0.5 + rng.normal(0, 0.03)
        for s in range(slices_per_patient):
            body = ((xx - cx) / 0.42) ** 2 + ((yy - cy) / 0.32) ** 2 < 1
            img = np.full((size, size), -1000.0, np.float32)
            img[body] = 40.0
            organ_mask = ((xx - cx + 0.12) / 0.15) ** 2 + ((yy - cy) / 0.13) ** 2 < 1
            img[organ_mask] = 60.0
            injured_any = any(grades[p][o] > 0 for o in ORGANS)
            if injured_any:
                lesion = ((xx - cx + 0.12 + rng.normal(0, 0.02)) / 0.06) ** 2 + ((yy - cy) / 0.04) ** 2 < 1
                img[lesion & organ_mask] = 10.0
            img += rng.normal(0, 8, img.shape).astype(np.float32)
            images.append(np.round(img).astype(np.int16))
            row = {
                "patient_id": 1000 + p,
                "series_id": 50000 + p,
                "instance": s + 1,
                "z": float(-s * 5.0),
                "split": split,
                "fold": fold,
                "source": "real",
            }
            for organ in ORGANS:
                row[organ] = grades[p][organ]
                row[f"{organ}_patient"] = grades[p][organ]
            rows.append(row)
    meta = {"size": [size, size], "split_hash": "toy-split", "source": "toy"}
    return SliceSet(np.stack(images), pd.DataFrame(rows), meta)


@pytest.fixture
def toy_slice_set() -> SliceSet:
    return make_toy_slice_set()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread per test module: the nets are tiny and other jobs share this machine's 2 cores."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
