"""The synthetic set artifact: what gen writes is what train reads, and train's compatibility checks."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.artifacts.synthetic import SyntheticSet
from toolkit.errors import ContractError
from toolkit.reporting import Reporter
from toolkit.workspace import Workspace
from train.run import load_synthetic_pool


def make_set(size: int = 16, window: list[float] | None = None) -> SyntheticSet:
    n = 6
    images = np.full((n, size, size), 40, np.int16)
    window = window or [60.0, 200.0]
    return SyntheticSet.from_samples(
        images,
        np.array([0, 0, 0, 1, 1, 1]),
        np.array([False, True, False, False, False, False]),
        np.linspace(0.1, 0.6, n),
        organ="spleen",
        generator_id="spleen-gan-0123abcd",
        backend="gan",
        window=window,
        windows=[window],
        class_names=["healthy", "injured"],
        split_hash="split-1",
        train_patients_hash="patients-1",
        provenance={"seed": 3, "audit": "Frechet distance 1.0"},
    )


class Collecting(Reporter):
    """Keeps warnings instead of logging them."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        self.warnings.append(message)


def test_what_gen_writes_train_reads_back(tmp_path):
    written = make_set()
    written.save(tmp_path / "s")
    read = SyntheticSet.load(tmp_path / "s")
    for key in ("organ", "mode", "generator_id", "backend", "window", "windows", "image_size", "class_names",
                "split_hash", "train_patients_hash", "provenance"):
        assert getattr(read, key) == getattr(written, key), key
    assert read.path == tmp_path / "s" and len(read) == 6 and read.image_size == 16
    np.testing.assert_array_equal(read.classes, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(read.near_copy, [False, True, False, False, False, False])
    table = read.slices.table
    assert (table["split"] == "synthetic").all() and (table["patient_id"] == -1).all()
    assert (table["spleen_patient"] == table["spleen"]).all()


def test_check_compatible_names_what_differs(tmp_path):
    s = make_set()
    s.save(tmp_path / "s")
    ok = dict(organ="spleen", split_hash="split-1", windows=[[60, 200]], image_size=16)
    assert s.check_compatible(**ok) is False
    assert s.check_compatible(**{**ok, "image_size": 64}, allow_resize=True) is True
    cases = {
        "split_hash": ("split-2", "made for split split-1 but the store's split is split-2"),
        "windows": ([[40, 400]], "made with data.windows [[60, 200]] but this run uses [[40, 400]]"),
        "image_size": (64, "made at 16 px (gen.image_size) but this run's spleen classifier trains at 64 px"),
        "organ": ("liver", "holds spleen slices, not liver"),
    }
    for key, (value, expected) in cases.items():
        with pytest.raises(ContractError) as err:
            s.check_compatible(**{**ok, key: value})
        assert expected in str(err.value) and str(tmp_path / "s") in str(err.value) and "\n" not in str(err.value)


def test_train_resizes_only_when_asked_and_says_so(tmp_path):
    ws = Workspace(tmp_path / "ws")
    make_set(size=16).save(ws.synthetic_dir("spleen"))
    with pytest.raises(ContractError, match="train.synthetic_resize=true"):
        load_synthetic_pool(ws, "spleen", "split-1", 32, [[60, 200]])
    reporter = Collecting()
    pool = load_synthetic_pool(ws, "spleen", "split-1", 32, [[60, 200]], allow_resize=True, reporter=reporter)
    assert pool.images.shape == (5, 32, 32)  # the near copy left out
    assert pool.info["resized"] == {"from": 16, "to": 32} and pool.info["generator_id"] == "spleen-gan-0123abcd"
    assert reporter.warnings == ["spleen: synthetic slices made at 16 px are resized to 32 px for training "
                                 "(train.synthetic_resize)"]
    same = Collecting()
    pool = load_synthetic_pool(ws, "spleen", "split-1", 16, [[60, 200]], allow_resize=True, reporter=same)
    assert "resized" not in pool.info and same.warnings == []
