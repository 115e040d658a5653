"""Paired comparison of two models scored on the same patients: AUROC difference with a paired
patient-bootstrap CI and the clustered DeLong test, and McNemar's test at each model's own
operating threshold.

Written here: scikit-learn, scipy and statsmodels have no DeLong test, and none has the
clustered form that several images per patient need (Obuchowski 1997, Biometrics 53:567-578,
"Nonparametric analysis of clustered ROC curve data"). With one image per patient it is
DeLong, DeLong & Clarke-Pearson (1988) up to the I/(I-1) small-sample factor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from medtl.evaluation.metrics import PatientResamples, percentile_ci

__all__ = [
    "ClusteredAUC",
    "McNemarResult",
    "PairedAUCResult",
    "clustered_auc",
    "compare_aurocs",
    "mcnemar",
    "paired_bootstrap_auc_diff",
]


@dataclass(frozen=True)
class ClusteredAUC:
    """AUROCs of several score columns with their clustered covariance matrix."""

    auc: np.ndarray  # (R,)
    cov: np.ndarray  # (R, R)
    n_pos: int
    n_neg: int
    n_clusters: int


def _psi(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Mann-Whitney kernel for every (positive, negative) pair: 1, 1/2 on ties, 0."""
    d = pos[:, None] - neg[None, :]
    return (d > 0).astype(float) + 0.5 * (d == 0)


def clustered_auc(y: np.ndarray, scores: np.ndarray, clusters: np.ndarray) -> ClusteredAUC:
    """AUROC of each column of ``scores`` (N, R) and their covariance, clustered by patient.

    Obuchowski's structural components: per cluster, the sums of each positive image's
    placement among all negatives (V10) and of each negative's among all positives (V01).
    """
    y = np.asarray(y).astype(int)
    s = np.asarray(scores, dtype=float).reshape(len(y), -1)
    codes, uniques = pd.factorize(pd.Series(np.asarray(clusters)).astype(str), sort=True)
    n_cl = len(uniques)
    pos, neg = y == 1, y == 0
    m, n = int(pos.sum()), int(neg.sum())
    if m == 0 or n == 0 or n_cl < 2:
        raise ValueError("the clustered AUROC needs positives, negatives and two or more patients")
    m_i = np.bincount(codes[pos], minlength=n_cl).astype(float)
    n_i = np.bincount(codes[neg], minlength=n_cl).astype(float)
    r = s.shape[1]
    auc = np.zeros(r)
    v10 = np.zeros((n_cl, r))
    v01 = np.zeros((n_cl, r))
    for j in range(r):
        psi = _psi(s[pos, j], s[neg, j])
        auc[j] = psi.mean()
        v10[:, j] = np.bincount(codes[pos], weights=psi.mean(axis=1), minlength=n_cl)
        v01[:, j] = np.bincount(codes[neg], weights=psi.mean(axis=0), minlength=n_cl)
    d10 = v10 - m_i[:, None] * auc[None, :]
    d01 = v01 - n_i[:, None] * auc[None, :]
    f = n_cl / (n_cl - 1)
    s10 = f * d10.T @ d10 / m
    s01 = f * d01.T @ d01 / n
    s11 = f * d10.T @ d01
    cov = s10 / m + s01 / n + (s11 + s11.T) / (m * n)
    return ClusteredAUC(auc, cov, m, n, n_cl)


@dataclass(frozen=True)
class PairedAUCResult:
    """AUROC of A and B on the same images, their difference A - B, and both tests."""

    auc_a: float
    auc_b: float
    diff: float
    delong_se: float
    delong_z: float
    delong_p: float
    delong_ci: tuple[float, float]
    bootstrap_ci: tuple[float | None, float | None]
    n_boot_used: int
    n_images: int
    n_patients: int


def paired_bootstrap_auc_diff(
    y: np.ndarray,
    p_a: np.ndarray,
    p_b: np.ndarray,
    patients: np.ndarray,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> tuple[tuple[float | None, float | None], int]:
    """Percentile CI of AUROC(A) - AUROC(B), both computed on each patient resample."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y).astype(int)
    res = PatientResamples.draw(patients, n_boot, seed)
    diffs = np.full(n_boot, np.nan)
    for b in range(n_boot):
        idx = res.indices(b)
        if len(np.unique(y[idx])) < 2:
            continue  # one-class resample: undefined, counted as skipped
        diffs[b] = roc_auc_score(y[idx], p_a[idx]) - roc_auc_score(y[idx], p_b[idx])
    interval = percentile_ci(diffs, ci)
    return (interval.low, interval.high), interval.n_used


def compare_aurocs(
    y: np.ndarray,
    p_a: np.ndarray,
    p_b: np.ndarray,
    patients: np.ndarray,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> PairedAUCResult:
    """AUROC difference A - B: clustered DeLong z-test and CI, and the paired bootstrap CI."""
    est = clustered_auc(y, np.column_stack([p_a, p_b]), patients)
    diff = float(est.auc[0] - est.auc[1])
    var = float(est.cov[0, 0] + est.cov[1, 1] - 2 * est.cov[0, 1])
    se = float(np.sqrt(max(var, 0.0)))
    z_crit = float(stats.norm.ppf(0.5 + ci / 2))
    if se > 0:
        z = diff / se
        p = float(2 * stats.norm.sf(abs(z)))
    else:  # identical rankings: no difference and no variance
        z, p = 0.0, 1.0
    boot, used = paired_bootstrap_auc_diff(y, p_a, p_b, patients, n_boot, ci, seed)
    return PairedAUCResult(
        auc_a=float(est.auc[0]),
        auc_b=float(est.auc[1]),
        diff=diff,
        delong_se=se,
        delong_z=float(z),
        delong_p=p,
        delong_ci=(diff - z_crit * se, diff + z_crit * se),
        bootstrap_ci=boot,
        n_boot_used=used,
        n_images=len(y),
        n_patients=est.n_clusters,
    )


@dataclass(frozen=True)
class McNemarResult:
    """McNemar's exact test on paired correct/incorrect calls of one group of images."""

    rate_a: float | None  # e.g. sensitivity of A on the positives
    rate_b: float | None
    a_only: int  # images A gets right and B wrong
    b_only: int
    p_value: float
    n: int


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> McNemarResult:
    """Exact (binomial) McNemar test on the discordant pairs.

    It treats images as independent; with several images per patient it is approximate, which
    is why the AUROC comparison above is the clustered one.
    """
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    k = a_only + b_only
    p = float(stats.binomtest(a_only, k, 0.5).pvalue) if k else 1.0
    n = len(a)
    return McNemarResult(
        rate_a=float(a.mean()) if n else None,
        rate_b=float(b.mean()) if n else None,
        a_only=a_only,
        b_only=b_only,
        p_value=p,
        n=n,
    )
