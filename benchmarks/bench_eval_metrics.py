"""Speed of ``eval.metrics`` against the plain loops a user would write.

- DeLong variance + paired test: fast midrank algorithm (Sun & Xu 2014) vs the
  structural components computed from the full m x n comparison matrix (numpy, vectorised).
- Patient bootstrap of the AUC: one sort + case weights for all resamples vs a loop that
  materialises each resample's rows and calls ``sklearn.metrics.roc_auc_score``.

Both pairs are checked to agree before timing. Prints seconds and the speed-up ratio.

Run: ``python benchmarks/bench_eval_metrics.py [--patients 600] [--slices 32] [--n-boot 2000]``
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def delong_by_matrix(y: np.ndarray, s1: np.ndarray, s2: np.ndarray) -> tuple[float, float]:
    """Paired DeLong (delta, se) from the m x n comparison matrices (DeLong et al. 1988)."""
    comps = []
    for s in (s1, s2):
        pos, neg = s[y == 1], s[y == 0]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        comps.append((psi.mean(axis=1), psi.mean(axis=0), psi.mean()))
    (a10, a01, a1), (b10, b01, a2) = comps
    m, n = len(a10), len(a01)
    s10 = np.cov(np.stack([a10, b10]))
    s01 = np.cov(np.stack([a01, b01]))
    cov = s10 / m + s01 / n
    return a2 - a1, float(np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]))


def bootstrap_by_loop(y, s, groups, n_boot, seed):
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    uniq = np.unique(groups)
    rows_of = {g: np.flatnonzero(groups == g) for g in uniq}
    out = np.full(n_boot, np.nan)
    for b in range(n_boot):
        drawn = rng.choice(uniq, size=len(uniq), replace=True)
        rows = np.concatenate([rows_of[g] for g in drawn])
        if 0 < y[rows].sum() < len(rows):
            out[b] = roc_auc_score(y[rows], s[rows])
    return out


def timed(fn, *args, repeat: int = 1):
    best = np.inf
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - t)
    return best, result


def main() -> None:
    from eval.metrics import bootstrap_auc_samples, delong_paired_test

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=600)
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--n-boot", type=int, default=2000)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    y_pat = (rng.random(args.patients) < 0.15).astype(int)
    effect = rng.normal(size=args.patients) + y_pat
    groups = np.repeat(np.arange(args.patients), args.slices)
    y = y_pat[groups]
    s1 = effect[groups] + rng.normal(0, 0.5, len(groups))
    s2 = s1 + rng.normal(0, 0.3, len(groups))
    print(f"{args.patients} patients x {args.slices} slices = {len(y)} slices, {y.sum()} injured")

    t_fast, res = timed(delong_paired_test, y, s1, s2, repeat=3)
    t_slow, (delta, se) = timed(delong_by_matrix, y, s1, s2)
    assert abs(res.delta - delta) < 1e-9 and abs(res.se - se) < 1e-9 * max(1.0, se)
    print(
        f"paired DeLong, {len(y)} slices: fast midrank {t_fast:.4f} s | m x n matrix {t_slow:.3f} s "
        f"| speed-up x{t_slow / t_fast:.0f}"
    )

    n_check = 20
    ours = bootstrap_auc_samples(y, [s1], groups, n_check, seed=1)[0]
    rng_check = np.random.default_rng(1)
    # Same resamples as ours: reproduce its draws (integers over groups) for the check.
    draws = rng_check.integers(0, args.patients, size=(n_check, args.patients))
    from sklearn.metrics import roc_auc_score

    for b in range(n_check):
        rows = np.concatenate([np.flatnonzero(groups == g) for g in draws[b]])
        assert abs(ours[b] - roc_auc_score(y[rows], s1[rows])) < 1e-9

    t_fast, _ = timed(bootstrap_auc_samples, y, [s1], groups, args.n_boot, 0)
    n_loop = max(50, args.n_boot // 20)
    t_loop, _ = timed(bootstrap_by_loop, y, s1, groups, n_loop, 0)
    t_loop_full = t_loop * args.n_boot / n_loop
    print(
        f"patient bootstrap, {args.n_boot} resamples: weighted one-sort {t_fast:.2f} s | "
        f"sklearn loop {t_loop_full:.1f} s (timed {n_loop}, scaled) | speed-up x{t_loop_full / t_fast:.0f}"
    )


if __name__ == "__main__":
    main()
