"""Fidelity and memorization audit of a synthetic slice set against its training slices.

Four checks, each reported overall and per class:

1. **Fréchet distance** (FID-style) between real and synthetic features. The
   ImageNet Inception net of FID is not available offline, so the features come
   from a small CNN trained here, quickly and deterministically, to tell healthy
   from injured real training slices of half the patients (its accuracy on the
   other half is reported). The other patients are split into B1 and B2; the FD
   of synthetic slices to B1 is reported beside the FD of B2 to B1 at the same
   sample count: the scale of "as close as real data is to itself".
2. **HU histogram distance** inside the body: Wasserstein-1 (in HU) and histogram
   intersection of the HU values of body pixels (above the window's lower edge
   and above -500 HU), after mapping windowed intensities back to HU.
3. **Diversity**: mean pairwise ``1 - cosine similarity`` of features (centred on
   the real mean) among synthetic slices and among real slices; a collapsed
   generator scores far below real.
4. **Memorization**: for every synthetic slice, the highest cosine similarity to
   any training slice, on 32x32 pixels minus the mean training slice. Removing
   the mean removes the anatomy every slice shares (body outline, spine), so
   what is compared is what makes a slice individual; an exact copy scores 1.0.
   Cheap enough to compare against every training slice, blind to fine texture.
   Slices at or above the threshold are flagged as near-copies. For scale, the
   same similarity between real slices of *different* patients is reported.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from scipy.stats import wasserstein_distance
from torch import nn

from gen.base import draw_balanced_batch
from toolkit.transforms import ABDOMEN_WINDOW

FEATURE_SIZE = 64
"""Pixels a side the audit CNN sees (slices are area-downsampled to it)."""
MEMO_SIZE = 32
"""Pixels a side of the memorization comparison."""
BODY_MIN_HU = -500.0

FEATURE_SPACE_NOTE = (
    "features of a small CNN trained on the real training slices to classify healthy vs injured "
    "(ImageNet Inception, used by the usual FID, is not available offline; values are not comparable to FID)"
)


# ---------------------------------------------------------------- feature network
class AuditFeatureNet(nn.Module):
    """Four conv-BN-ReLU layers and global average pooling: (n, 1, 64, 64) -> (n, 4 * width) features."""

    def __init__(self, width: int = 16, n_classes: int = 2) -> None:
        super().__init__()
        chans = [1, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for i in range(4):
            stride = 2 if i < 3 else 1
            layers += [
                nn.Conv2d(chans[i], chans[i + 1], 3, stride, 1, bias=False),
                nn.BatchNorm2d(chans[i + 1]),
            ]
            layers.append(nn.ReLU())
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], n_classes)
        self.num_features = chans[-1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def _to_input(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).unsqueeze(1)
    if x.shape[-1] != FEATURE_SIZE:
        mode = "area" if x.shape[-1] > FEATURE_SIZE else "bilinear"
        x = F.interpolate(x, size=(FEATURE_SIZE, FEATURE_SIZE), mode=mode)
    return x - 0.5


def train_feature_net(
    images: Any,
    labels: np.ndarray,
    epochs: int = 3,
    seed: int = 0,
    batch_size: int = 64,
    max_per_epoch: int = 4096,
) -> AuditFeatureNet:
    """Train :class:`AuditFeatureNet` on healthy (0) vs injured (>0) slices, class-balanced, on CPU.

    Parameters
    ----------
    images : array-like of shape (n, H, W), float in [0, 1]
    labels : ndarray of shape (n,), class per slice (any value > 0 counts as injured)
    epochs : int, default=3
        Passes of ``min(n, max_per_epoch)`` slices.
    seed : int, default=0
        Same seed, same network.
    """
    binary = (np.asarray(labels) > 0).astype(np.int64)
    class_index = [np.flatnonzero(binary == c) for c in (0, 1)]
    class_index = [c for c in class_index if len(c)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = AuditFeatureNet()
    if len(class_index) < 2:
        return net.eval()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    per_epoch = max(1, min(len(binary), max_per_epoch) // batch_size)
    net.train()
    for _ in range(epochs * per_epoch):
        idx, y = draw_balanced_batch(class_index, batch_size, 2, g)
        loss = F.cross_entropy(net(_to_input(images[idx])), torch.from_numpy(y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def extract_features(net: AuditFeatureNet, images: Any, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Features (n, D) float64 and P(injured) (n,) of ``images`` (n, H, W) in [0, 1]."""
    net.eval()
    feats, probs = [], []
    for start in range(0, len(images), batch_size):
        x = _to_input(images[np.arange(start, min(start + batch_size, len(images)))])
        f = net.forward_features(x)
        feats.append(f.double().numpy())
        probs.append(torch.softmax(net.head(f), dim=1)[:, 1].double().numpy())
    if not feats:
        return np.zeros((0, net.num_features)), np.zeros(0)
    return np.concatenate(feats), np.concatenate(probs)


# ---------------------------------------------------------------- metrics
def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` (n, D) and ``b`` (m, D)."""
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():
        # Few samples give singular covariances; handled below as pytorch-fid does.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            eps = np.eye(len(s1)) * 1e-6
            covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def mean_pairwise_cosine_distance(features: np.ndarray, center: np.ndarray, max_n: int = 500) -> float:
    """Mean of ``1 - cos`` over distinct pairs of (centred) feature vectors; NaN for fewer than 2."""
    f = features[:max_n] - center
    if len(f) < 2:
        return float("nan")
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    sim = f @ f.T
    n = len(f)
    return float(1.0 - (sim.sum() - np.trace(sim)) / (n * (n - 1)))


def _body_hu(images: np.ndarray, window: tuple[float, float], rng: np.random.Generator, max_pixels: int) -> np.ndarray:
    level, width = window
    low = level - width / 2.0
    x = np.asarray(images, dtype=np.float32)
    hu = x * width + low
    # Pixels at the window floor are air (or fat below the window): not "inside the body" here.
    values = hu[(x > 0.01) & (hu > BODY_MIN_HU)]
    if len(values) > max_pixels:
        values = rng.choice(values, max_pixels, replace=False)
    return values


def hu_histogram_distance(
    real: np.ndarray,
    synth: np.ndarray,
    window: tuple[float, float] = ABDOMEN_WINDOW,
    max_pixels: int = 200_000,
) -> dict[str, float]:
    """Wasserstein-1 (HU) and histogram intersection (0..1, 1 = identical) of body-pixel HU values."""
    rng = np.random.default_rng(0)
    r, s = _body_hu(real, window, rng, max_pixels), _body_hu(synth, window, rng, max_pixels)
    out = {
        "body_fraction_real": float(np.mean(np.asarray(real) > 0.01)) if np.size(real) else float("nan"),
        "body_fraction_synthetic": float(np.mean(np.asarray(synth) > 0.01)) if np.size(synth) else float("nan"),
    }
    if len(r) == 0 or len(s) == 0:
        return {**out, "wasserstein_hu": float("nan"), "histogram_intersection": float("nan")}
    level, width = window
    lo, hi = max(level - width / 2.0, BODY_MIN_HU), level + width / 2.0
    bins = np.linspace(lo, hi, 51)
    hr = np.histogram(r, bins)[0] / len(r)
    hs = np.histogram(s, bins)[0] / len(s)
    return {
        **out,
        "wasserstein_hu": float(wasserstein_distance(r, s)),
        "histogram_intersection": float(np.minimum(hr, hs).sum()),
        "mean_hu_real": float(r.mean()),
        "mean_hu_synthetic": float(s.mean()),
    }


def _small(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).unsqueeze(1)
    if x.shape[-1] != MEMO_SIZE:
        mode = "area" if x.shape[-1] > MEMO_SIZE else "bilinear"
        x = F.interpolate(x, size=(MEMO_SIZE, MEMO_SIZE), mode=mode)
    return x.flatten(1)


def mean_slice(images: np.ndarray) -> torch.Tensor:
    """The mean of ``images`` (n, H, W) at 32x32, flattened: the centre for :func:`nearest_training_similarity`."""
    return _small(images).mean(dim=0)


def _memo_vectors(images: np.ndarray, center: torch.Tensor) -> torch.Tensor:
    v = _small(images) - center
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-8)


@torch.no_grad()
def nearest_training_similarity(
    synth: np.ndarray,
    real: Any,
    center: torch.Tensor | None = None,
    chunk: int = 4096,
    query_groups: np.ndarray | None = None,
    real_groups: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Highest cosine similarity of each query slice to any real slice (32x32 pixels minus ``center``).

    Parameters
    ----------
    synth : ndarray of shape (n, H, W), float in [0, 1]
        Query slices.
    real : array-like of shape (m, H', W'), float in [0, 1]
        Reference slices, read ``chunk`` at a time.
    center : Tensor of shape (32 * 32,), optional
        Subtracted before the cosine (:func:`mean_slice` of the training slices); default: the
        mean of the first chunk of ``real``.
    query_groups, real_groups : ndarray, optional
        Patient ids; when given, pairs of the same patient are skipped (for the real-vs-real reference).

    Returns
    -------
    similarity : ndarray of shape (n,), float32 in [-1, 1]
    index : ndarray of shape (n,), int64, row of the nearest real slice
    """
    if center is None:
        center = mean_slice(real[np.arange(min(chunk, len(real)))])
    q = _memo_vectors(synth, center)
    best = torch.full((len(q),), -2.0)
    best_idx = torch.zeros(len(q), dtype=torch.int64)
    for start in range(0, len(real), chunk):
        rows = np.arange(start, min(start + chunk, len(real)))
        sim = q @ _memo_vectors(real[rows], center).T
        if query_groups is not None and real_groups is not None:
            same = torch.from_numpy(np.asarray(query_groups)[:, None] == np.asarray(real_groups)[rows][None, :])
            sim = sim.masked_fill(same, -2.0)
        value, where = sim.max(dim=1)
        better = value > best
        best = torch.where(better, value, best)
        best_idx = torch.where(better, where + start, best_idx)
    return best.numpy(), best_idx.numpy()


def _stats(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {"median": float("nan"), "p95": float("nan"), "max": float("nan")}
    return {
        "median": float(np.median(values)),
        "p95": float(np.percentile(values, 95)),
        "max": float(np.max(values)),
    }


# ---------------------------------------------------------------- the audit
def audit(
    real: Any,
    real_labels: np.ndarray,
    synth: np.ndarray,
    synth_labels: np.ndarray,
    feature_net: AuditFeatureNet | None = None,
    threshold: float = 0.95,
    *,
    class_names: list[str] | None = None,
    window: tuple[float, float] = ABDOMEN_WINDOW,
    real_groups: np.ndarray | None = None,
    epochs: int = 3,
    seed: int = 0,
    max_real: int = 4000,
) -> dict[str, Any]:
    """Compare synthetic slices with the real training slices they were learnt from.

    Parameters
    ----------
    real : array-like of shape (n_real, H, W), float in [0, 1]
        Real training slices, windowed (an ndarray or :class:`gen.data.WindowedSlices`).
    real_labels : ndarray of shape (n_real,), int class per slice
    synth : ndarray of shape (n_synth, H, W), float in [0, 1]
    synth_labels : ndarray of shape (n_synth,), int class per slice
    feature_net : AuditFeatureNet, optional
        Trained feature network; default: trained here on ``real`` for ``epochs``.
    threshold : float, default=0.95
        Near-copy threshold on the nearest-training-slice similarity.
    class_names : list of str, optional
    window : (level, width)
        HU window the intensities are in (for the HU histogram).
    real_groups : ndarray of shape (n_real,), optional
        Patient id per real slice: the feature net trains on half the patients; the real-vs-real
        FD and the different-patient similarity reference are computed between patients.
    epochs, seed : int
        Feature-net training length and seed.
    max_real : int, default=4000
        Real slices (a fixed random subset) used for features and histograms; memorization
        always compares with every real slice.

    Returns
    -------
    dict
        JSON-ready report, plus ``"per_slice"``: ``{"nn_similarity", "nn_index", "near_copy"}``
        arrays of shape (n_synth,) that are not meant for JSON (pop it before writing).
    """
    real_labels = np.asarray(real_labels).astype(np.int64)
    synth_labels = np.asarray(synth_labels).astype(np.int64)
    synth = np.asarray(synth, dtype=np.float32)
    n_classes = int(max(real_labels.max(initial=0), synth_labels.max(initial=0)) + 1)
    names = list(class_names or [f"class{c}" for c in range(n_classes)])
    groups = np.asarray(real_groups) if real_groups is not None else np.arange(len(real_labels))
    rng = np.random.default_rng(seed)

    # Patients split three ways: A trains the feature net; B1 is the FD reference; B2 (real, unseen
    # by the net like the synthetic slices) is compared with B1 at the same sample count as the
    # synthetic slices are, so "real vs real" is the floor the synthetic FD can be read against.
    patients = rng.permutation(np.unique(groups))
    n_a = len(patients) // 2 if feature_net is None else 0
    rest = patients[n_a:]
    role_of = {p: 0 for p in patients[:n_a]}
    role_of.update({p: 1 + (i >= len(rest) // 2) for i, p in enumerate(rest)})
    role = np.array([role_of[p] for p in groups], dtype=np.int8)
    held_out = np.flatnonzero(role > 0)
    sub = np.sort(rng.permutation(held_out)[:max_real])
    real_sub = np.asarray(real[sub], dtype=np.float32)
    lab_sub, role_sub = real_labels[sub], role[sub]

    net_note: dict[str, Any] = {"supplied": feature_net is not None}
    if feature_net is None:
        train_rows = np.flatnonzero(role == 0) if (role == 0).any() else np.arange(len(real_labels))
        feature_net = train_feature_net(_Rows(real, train_rows), real_labels[train_rows], epochs, seed)
        net_note.update({"trained_on": f"real training slices of {n_a} of {len(patients)} patients", "epochs": epochs})
    f_real, p_real = extract_features(feature_net, real_sub)
    f_syn, p_syn = extract_features(feature_net, synth)
    # One scale for all features: FD is then in units of the real features' mean variance.
    scale = np.sqrt(f_real.var(0).mean()) if len(f_real) > 1 else 1.0
    f_real, f_syn = f_real / max(scale, 1e-12), f_syn / max(scale, 1e-12)
    truth = lab_sub > 0
    if truth.any() and (~truth).any():
        pred = p_real > 0.5
        net_note["heldout_balanced_accuracy"] = float((pred[truth].mean() + (~pred[~truth]).mean()) / 2)

    f_center = f_real.mean(0) if len(f_real) else 0.0
    b1, b2 = role_sub == 1, role_sub == 2
    b2_rows = np.flatnonzero(b2)
    n_cmp = min(len(b2_rows), len(synth)) if len(b2_rows) else len(synth)
    fd_all = frechet_distance(f_syn[rng.permutation(len(synth))[:n_cmp]], f_real[b1])
    fd_ref = frechet_distance(f_real[rng.permutation(b2_rows)[:n_cmp]], f_real[b1])

    center = mean_slice(real_sub)
    sim, nn_index = nearest_training_similarity(synth, real, center)
    near = sim >= threshold
    ref_rows = sub[: min(len(sub), 300)]
    ref_sim, _ = nearest_training_similarity(
        np.asarray(real[ref_rows], dtype=np.float32),
        real,
        center,
        query_groups=groups[ref_rows],
        real_groups=groups,
    )
    ref_sim = ref_sim[ref_sim > -2.0]

    per_class: dict[str, Any] = {}
    for c, name in enumerate(names):
        rs, ss = lab_sub == c, synth_labels == c
        per_class[name] = {
            "n_real": int((real_labels == c).sum()),
            "n_synthetic": int(ss.sum()),
            "frechet_distance": frechet_distance(f_syn[ss], f_real[rs & b1]),
            "hu_wasserstein": hu_histogram_distance(real_sub[rs], synth[ss], window).get("wasserstein_hu"),
            "diversity_real": mean_pairwise_cosine_distance(f_real[rs], f_center),
            "diversity_synthetic": mean_pairwise_cosine_distance(f_syn[ss], f_center),
            "called_injured_real": float((p_real[rs] > 0.5).mean()) if rs.any() else float("nan"),
            "called_injured_synthetic": float((p_syn[ss] > 0.5).mean()) if ss.any() else float("nan"),
            "near_copies": int((near & ss).sum()),
        }

    hu = hu_histogram_distance(real_sub, synth, window)
    report: dict[str, Any] = {
        "summary": (
            f"Frechet distance {fd_all:.3g} (real vs real {fd_ref:.3g}); body HU Wasserstein-1 "
            f"{hu['wasserstein_hu']:.1f} HU; diversity {mean_pairwise_cosine_distance(f_syn, f_center):.3f} "
            f"(real {mean_pairwise_cosine_distance(f_real, f_center):.3f}); "
            f"near-copies {int(near.sum())}/{len(synth)}"
        ),
        "n_real": int(len(real_labels)),
        "n_real_audited": int(len(sub)),
        "n_synthetic": int(len(synth)),
        "classes": names,
        "frechet_distance": {
            "synthetic_vs_real": fd_all,
            "real_vs_real_reference": fd_ref,
            "feature_space": FEATURE_SPACE_NOTE,
            "feature_net": net_note,
            "n_compared": int(n_cmp),
            "note": "lower is better; both values compare with the same reference patients (B1) at the "
            "same sample count: synthetic slices vs B1, and real slices of other patients (B2) vs B1, "
            "which is the floor",
        },
        "hu_histogram": {
            **hu,
            "window": list(window),
            "note": f"HU of body pixels (above the window floor and > {BODY_MIN_HU:g} HU); intersection 1 = identical",
        },
        "diversity": {
            "synthetic": mean_pairwise_cosine_distance(f_syn, f_center),
            "real": mean_pairwise_cosine_distance(f_real, f_center),
            "note": "mean pairwise 1 - cosine similarity of audit features; far below real = mode collapse",
        },
        "memorization": {
            "method": f"max cosine similarity of {MEMO_SIZE}x{MEMO_SIZE} pixels minus the mean "
            "training slice, to every training slice",
            "threshold": float(threshold),
            "near_copies": int(near.sum()),
            "near_copy_share": float(near.mean()) if len(near) else 0.0,
            "nn_similarity": _stats(sim),
            "real_reference_other_patients": {
                **_stats(ref_sim),
                "share_above_threshold": float((ref_sim >= threshold).mean()) if len(ref_sim) else float("nan"),
                "note": "the same similarity between real slices of different patients (the anatomy's own sameness)",
            },
        },
        "per_class": per_class,
        "per_slice": {"nn_similarity": sim, "nn_index": nn_index, "near_copy": near},
    }
    return report


class _Rows:
    """``view[idx] == base[rows[idx]]`` without copying ``base``."""

    def __init__(self, base: Any, rows: np.ndarray) -> None:
        self.base, self.rows = base, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        return np.asarray(self.base[self.rows[np.asarray(idx)]], dtype=np.float32)
