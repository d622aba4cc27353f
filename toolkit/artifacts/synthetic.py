"""The synthetic set: one organ's generated slices and how they were made.

``toolkit gen`` writes it (:meth:`SyntheticSet.from_samples`, :meth:`SyntheticSet.save`),
``toolkit train`` reads it (:meth:`SyntheticSet.load`) and calls
:meth:`SyntheticSet.check_compatible` before mixing it with real slices. On disk it is a
slice set folder (:class:`toolkit.sliceset.SliceSet`)::

    synthetic/<organ>/images.npy    int16 HU, shape (n, S, S), clipped to ``window``
    synthetic/<organ>/manifest.csv  patient_id -1, series_id -1, instance 0..n-1, z 0, <organ> and
                                    <organ>_patient (the class: 0 healthy, 1 injured/low, 2 high),
                                    split and source "synthetic", fold -1, generator_id, near_copy, nn_similarity
    synthetic/<organ>/meta.json     the fields of :class:`SyntheticSet` below (+ free provenance)

Mode ``lesion`` (an injury drawn into a real healthy crop) adds the counterfactual pair of each crop::

    synthetic/<organ>/lesion_masks.npy  bool, shape (n, S, S): where the lesion was drawn
    manifest.csv columns                source_row (row of the healthy source crop in the organ-crop set),
                                        source_patient (its patient id), lesion_kind, lesion_grade

Folders written before this record existed lack the fields and are refused with a request
to re-run ``toolkit gen``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from toolkit.errors import ContractError, DataError
from toolkit.sliceset import MANIFEST_FILE, META_FILE, SliceSet

ARTIFACT = "synthetic"
FORMAT_VERSION = 1
MODES = ("image", "lesion")
"""What a synthetic slice is: ``image``, a whole generated slice; ``lesion``, a real healthy crop with a
lesion drawn into it (paired with its source)."""
LESION_MASKS_FILE = "lesion_masks.npy"
PAIR_COLUMNS = ("source_row", "source_patient", "lesion_kind", "lesion_grade")
"""Manifest columns of a ``lesion`` set: the counterfactual pair of each crop."""

# meta.json keys this module owns; everything else in meta.json is provenance.
_FIELDS = (
    "organ",
    "mode",
    "generator_id",
    "backend",
    "window",
    "windows",
    "image_size",
    "class_names",
    "split_hash",
    "train_patients_hash",
)
_OWN_KEYS = {"artifact", "format_version", "source", *_FIELDS, "n_slices", "size"}


def _windows(windows: Any) -> list[list[float]]:
    return [[float(level), float(width)] for level, width in windows]


def _show(windows: list[list[float]]) -> str:
    return "[" + ", ".join(f"[{level:g}, {width:g}]" for level, width in windows) + "]"


@dataclass
class SyntheticSet:
    """An organ's synthetic slices and the settings they were made with.

    Attributes
    ----------
    slices : SliceSet
        ``images`` of shape (n, image_size, image_size), int16 HU; the manifest described above.
    organ : str
    mode : {"image", "lesion"}
        Whole generated slices, or lesions drawn into real healthy crops.
    generator_id : str
        ``<organ>-<backend>-<hash8>`` of :func:`gen.run.generator_id`.
    backend : str
        Registered generator name (``diffusion``, ``gan``).
    window : list of float
        ``[level, width]`` HU the generator saw and the slices are clipped to (``data.windows[0]``).
    windows : list of list of float
        The ``data.windows`` of the gen run.
    image_size : int
        Pixels per side (``gen.image_size``).
    class_names : list of str
        Name of each class, in label order.
    split_hash : str
        The store's split the generator's training patients came from.
    train_patients_hash : str
        sha256 of the sorted training patient ids (``gen.data.train_patients_hash``).
    provenance : dict
        Anything else worth keeping (seed, steps, audit summary, sampler...), stored in meta.json.
    path : Path, optional
        The folder it was read from or written to.
    lesion_masks : ndarray of shape (n, image_size, image_size), bool, optional
        Mode ``lesion`` only: where each crop's lesion is (outside it the crop equals its source).
    """

    slices: SliceSet
    organ: str
    mode: str
    generator_id: str
    backend: str
    window: list[float]
    windows: list[list[float]]
    image_size: int
    class_names: list[str]
    split_hash: str
    train_patients_hash: str
    provenance: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    lesion_masks: np.ndarray | None = None

    # ------------------------------------------------------------------ writer
    @classmethod
    def from_samples(
        cls,
        images_hu: np.ndarray,
        classes: np.ndarray,
        near_copy: np.ndarray,
        nn_similarity: np.ndarray,
        *,
        organ: str,
        generator_id: str,
        backend: str,
        window: tuple[float, float] | list[float],
        windows: list[list[float]],
        class_names: list[str],
        split_hash: str,
        train_patients_hash: str,
        mode: str = "image",
        provenance: dict[str, Any] | None = None,
        lesion_masks: np.ndarray | None = None,
        source_rows: np.ndarray | None = None,
        source_patients: np.ndarray | None = None,
        lesion_kinds: np.ndarray | None = None,
        lesion_grades: np.ndarray | None = None,
    ) -> SyntheticSet:
        """Build the set (manifest included) from generated slices.

        Parameters
        ----------
        images_hu : ndarray of shape (n, S, S)
            Hounsfield units (rounded to int16 here).
        classes : ndarray of shape (n,), int
            Class of each slice, which is its grade: 0 healthy, 1 injured (or low), 2 high.
        near_copy : ndarray of shape (n,), bool
            Flagged by the audit as a near copy of a training slice (train leaves these out).
        nn_similarity : ndarray of shape (n,), float
            Cosine similarity to the nearest training slice.
        lesion_masks : ndarray of shape (n, S, S), bool
            Mode ``lesion`` only (required there), as are the four below.
        source_rows : ndarray of shape (n,), int
            Row of each crop's healthy source in the organ-crop set.
        source_patients : ndarray of shape (n,), int
            Patient id of each source crop (a classifier's folds must follow it).
        lesion_kinds : ndarray of shape (n,), str, optional
        lesion_grades : ndarray of shape (n,), int, optional
        """
        if mode not in MODES:
            raise ContractError(f"unknown synthetic mode '{mode}'; valid modes: {', '.join(MODES)}")
        images = np.round(np.asarray(images_hu)).astype(np.int16)
        n = len(images)
        classes = np.asarray(classes).astype(np.int64)
        pairs = _pair_columns(mode, images.shape, lesion_masks, source_rows, source_patients, lesion_kinds,
                              lesion_grades)
        table = pd.DataFrame(
            {
                "patient_id": -1,
                "series_id": -1,
                "instance": np.arange(n),
                "z": 0.0,
                organ: classes,
                f"{organ}_patient": classes,
                "split": "synthetic",
                "fold": -1,
                "source": "synthetic",
                "generator_id": generator_id,
                "near_copy": np.asarray(near_copy).astype(bool),
                "nn_similarity": np.round(np.asarray(nn_similarity, dtype=np.float64), 5),
                **pairs,
            }
        )
        return cls(
            slices=SliceSet(images, table),
            organ=organ,
            mode=mode,
            generator_id=generator_id,
            backend=backend,
            window=[float(window[0]), float(window[1])],
            windows=_windows(windows),
            image_size=int(images.shape[1]),
            class_names=list(class_names),
            split_hash=str(split_hash),
            train_patients_hash=str(train_patients_hash),
            provenance=dict(provenance or {}),
            lesion_masks=None if lesion_masks is None else np.asarray(lesion_masks, dtype=bool),
        )

    def meta(self) -> dict[str, Any]:
        """What meta.json holds."""
        own = {key: getattr(self, key) for key in _FIELDS}
        return {**self.provenance, "artifact": ARTIFACT, "format_version": FORMAT_VERSION, "source": "synthetic", **own}

    def save(self, directory: str | Path, force: bool = False) -> Path:
        """Write the slice set folder (the manifest last: a folder without it is unfinished)."""
        directory = Path(directory)
        masks_file = directory / LESION_MASKS_FILE
        if (directory / MANIFEST_FILE).exists() and not force:
            raise ContractError(f"{directory} already holds a slice set; pass --force to overwrite it")
        if self.lesion_masks is not None:
            directory.mkdir(parents=True, exist_ok=True)
            tmp = directory / (LESION_MASKS_FILE + ".tmp.npy")
            np.save(tmp, np.ascontiguousarray(self.lesion_masks, dtype=bool))
            tmp.replace(masks_file)
        elif masks_file.exists():
            masks_file.unlink()  # an image-mode set written over a lesion-mode one (force)
        SliceSet(self.slices.images, self.slices.table, self.meta()).save(directory, force=force)
        self.path = directory
        return directory

    # ------------------------------------------------------------------ reader
    @classmethod
    def load(cls, directory: str | Path) -> SyntheticSet:
        """Read a folder :meth:`save` wrote; refuse one without this record (an earlier toolkit's)."""
        directory = Path(directory)
        slices = SliceSet.load(directory)
        meta = slices.meta
        missing = [key for key in _FIELDS if key not in meta]
        if meta.get("artifact") != ARTIFACT or missing:
            organ = meta.get("organ") or directory.name
            raise ContractError(
                f"{directory / META_FILE} does not record how the synthetic set was made "
                f"(no {', '.join(missing or ['artifact'])}; written by an earlier toolkit): "
                f"re-run `toolkit gen --organ {organ} --force`"
            )
        lesion = meta["mode"] == "lesion"
        for column in (meta["organ"], "near_copy", *(PAIR_COLUMNS if lesion else ())):
            if column not in slices.table.columns:
                raise DataError(
                    f"{directory / MANIFEST_FILE} lacks column '{column}'; re-run `toolkit gen --organ {meta['organ']} "
                    "--force`"
                )
        masks = None
        if lesion:
            masks_file = directory / LESION_MASKS_FILE
            if not masks_file.exists():
                raise DataError(f"{masks_file} is missing (a lesion set keeps its masks); re-run `toolkit gen "
                                f"--organ {meta['organ']} --mode lesion --force`")
            masks = np.load(masks_file, mmap_mode="r")
            if masks.shape != tuple(np.shape(slices.images)):
                raise DataError(f"{masks_file} has shape {masks.shape} but the images have {np.shape(slices.images)}; "
                                f"re-run `toolkit gen --organ {meta['organ']} --mode lesion --force`")
        return cls(
            slices=slices,
            provenance={k: v for k, v in meta.items() if k not in _OWN_KEYS},
            path=directory,
            lesion_masks=masks,
            **{key: meta[key] for key in _FIELDS},
        )

    def __len__(self) -> int:
        return len(self.slices)

    @property
    def classes(self) -> np.ndarray:
        """Class of each slice, shape (n,), int64 (0 healthy, 1 injured or low, 2 high)."""
        return self.slices.table[self.organ].to_numpy().astype(np.int64)

    @property
    def source_rows(self) -> np.ndarray:
        """Mode ``lesion``: row of each crop's healthy source in the organ-crop set, shape (n,), int64."""
        self._require_lesion("source_row")
        return self.slices.table["source_row"].to_numpy().astype(np.int64)

    @property
    def source_patients(self) -> np.ndarray:
        """Mode ``lesion``: patient id of each crop's healthy source, shape (n,), int64."""
        self._require_lesion("source_patient")
        return self.slices.table["source_patient"].to_numpy().astype(np.int64)

    def _require_lesion(self, what: str) -> None:
        if self.mode != "lesion":
            raise ContractError(f"synthetic set {self.path or self.organ} holds '{self.mode}' slices, which have "
                                f"no {what} (only mode 'lesion' pairs crops with their sources)")

    @property
    def near_copy(self) -> np.ndarray:
        """Whether the audit flagged each slice as a near copy of a training slice, shape (n,), bool."""
        return self.slices.table["near_copy"].astype(str).str.lower().isin(["true", "1"]).to_numpy()

    # ------------------------------------------------------------------ contract with train
    def check_compatible(
        self,
        *,
        organ: str,
        split_hash: str | None,
        windows: list[list[float]],
        image_size: int,
        allow_resize: bool = False,
        mode: str = "image",
        input_id: str = "slices",
    ) -> bool:
        """Refuse a set that does not fit a classifier run; return whether its slices need resizing.

        Parameters
        ----------
        organ : str
            The organ the run trains.
        split_hash : str or None
            The store's split; the generator must have been trained on its train patients.
        windows : list of [level, width]
            The run's ``data.windows``; the set must have been made with the same (its slices are
            clipped to the first, so another window would show synthetic slices a different HU range).
        image_size : int
            Pixels per side the classifier trains at (``train.image_size`` for this organ).
        allow_resize : bool, default=False
            ``train.synthetic_resize``: accept another size (the caller resizes and records it).
        mode : str, default="image"
        input_id : str, default="slices"
            What the classifier reads: ``"slices"`` or the crop id of its crop set. The generator must
            have learnt the same (provenance ``input_id``; sets from before organ crops learnt slices).

        Returns
        -------
        bool
            True when ``image_size`` differs from the set's and ``allow_resize`` accepts it.

        Raises
        ------
        ContractError
            One line naming the folder, what the set was made with, what the run needs and what to do.
        """
        where = self.path or f"the synthetic {self.organ} set"
        regen = f"re-run `toolkit gen --organ {organ} --force`"
        if self.organ != organ:
            raise ContractError(f"synthetic set {where} holds {self.organ} slices, not {organ}: {regen}")
        if self.mode != mode:
            raise ContractError(f"synthetic set {where} holds '{self.mode}' slices but this run needs '{mode}'")
        if split_hash is None or self.split_hash != split_hash:
            raise ContractError(
                f"synthetic set {where} was made for split {self.split_hash} but the store's split is "
                f"{split_hash}: {regen}"
            )
        made_from = str(self.provenance.get("input_id", "slices"))
        if made_from != input_id:
            raise ContractError(
                f"synthetic set {where} was learnt from {made_from} but this run's {organ} classifier reads "
                f"{input_id} (train.input / gen.input, toolkit crop): {regen}"
            )
        if _windows(self.windows) != _windows(windows):
            raise ContractError(
                f"synthetic set {where} was made with data.windows {_show(self.windows)} but this run uses "
                f"{_show(_windows(windows))}: {regen} --set data.windows='{_show(_windows(windows))}'"
            )
        if int(self.image_size) != int(image_size):
            if allow_resize:
                return True
            raise ContractError(
                f"synthetic set {where} was made at {self.image_size} px (gen.image_size) but this run's {organ} "
                f"classifier trains at {image_size} px: {regen} --image-size {image_size}, "
                "or set train.synthetic_resize=true to resize it"
            )
        return False


def _pair_columns(
    mode: str,
    shape: tuple[int, ...],
    lesion_masks: np.ndarray | None,
    source_rows: np.ndarray | None,
    source_patients: np.ndarray | None,
    lesion_kinds: np.ndarray | None,
    lesion_grades: np.ndarray | None,
) -> dict[str, Any]:
    """The manifest columns of a lesion set's pairs (none for mode ``image``), checked against the images."""
    given = {"lesion_masks": lesion_masks, "source_rows": source_rows, "source_patients": source_patients}
    if mode == "image":
        extra = [k for k, v in {**given, "lesion_kinds": lesion_kinds, "lesion_grades": lesion_grades}.items()
                 if v is not None]
        if extra:
            raise ContractError(f"synthetic mode 'image' takes no {', '.join(extra)} (those pair mode 'lesion' crops)")
        return {}
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise ContractError(
            f"a synthetic 'lesion' set needs {', '.join(missing)}: every crop keeps its source and its mask"
        )
    n = shape[0]
    if np.shape(lesion_masks) != tuple(shape):
        raise ContractError(f"lesion masks have shape {np.shape(lesion_masks)} but the images {tuple(shape)}")
    columns = {
        "source_row": np.asarray(source_rows).astype(np.int64),
        "source_patient": np.asarray(source_patients).astype(np.int64),
        "lesion_kind": np.asarray(lesion_kinds if lesion_kinds is not None else [""] * n).astype(str),
        "lesion_grade": np.asarray(lesion_grades if lesion_grades is not None else [0] * n).astype(np.int64),
    }
    wrong = {k: len(v) for k, v in columns.items() if len(v) != n}
    if wrong:
        raise ContractError(f"a synthetic 'lesion' set of {n} crops got pair columns of other lengths: {wrong}")
    return columns
