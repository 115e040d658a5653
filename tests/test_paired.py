"""Paired comparison statistics: clustered DeLong against a patient bootstrap, and McNemar."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medtl.evaluation.metrics import PatientResamples
from medtl.evaluation.paired import clustered_auc, compare_aurocs, mcnemar


def _clustered_example(seed: int = 0, n_patients: int = 150):
    """Several images per patient sharing a patient-level effect (so images are not iid)."""
    rng = np.random.default_rng(seed)
    per = rng.integers(1, 5, n_patients)
    patients = np.repeat(np.arange(n_patients), per)
    y = np.repeat(rng.random(n_patients) < 0.4, per).astype(int)
    shared = np.repeat(rng.normal(size=n_patients), per)
    strong = y * 1.0 + shared + rng.normal(size=len(y)) * 0.8
    weak = y * 0.6 + shared + rng.normal(size=len(y)) * 0.8
    return y, strong, weak, patients


def test_clustered_auc_is_the_mann_whitney_auc():
    y, a, b, pat = _clustered_example()
    est = clustered_auc(y, np.column_stack([a, b]), pat)
    assert est.auc == pytest.approx([roc_auc_score(y, a), roc_auc_score(y, b)])


def test_clustered_variance_agrees_with_a_patient_bootstrap():
    y, a, b, pat = _clustered_example()
    est = clustered_auc(y, np.column_stack([a, b]), pat)
    res = PatientResamples.draw(pat, 1500, seed=1)
    aucs, diffs = [], []
    for i in range(1500):
        idx = res.indices(i)
        aucs.append(roc_auc_score(y[idx], a[idx]))
        diffs.append(aucs[-1] - roc_auc_score(y[idx], b[idx]))
    var_diff = est.cov[0, 0] + est.cov[1, 1] - 2 * est.cov[0, 1]
    assert est.cov[0, 0] == pytest.approx(np.var(aucs), rel=0.2)
    assert var_diff == pytest.approx(np.var(diffs), rel=0.2)
    # Ignoring the clusters (one "patient" per image) underestimates the variance here.
    naive = clustered_auc(y, a[:, None], np.arange(len(y)))
    assert naive.cov[0, 0] < 0.7 * np.var(aucs)


def test_identical_models_differ_by_zero_with_a_ci_containing_zero():
    y, a, _, pat = _clustered_example()
    r = compare_aurocs(y, a, a.copy(), pat, n_boot=200)
    assert r.diff == 0.0 and r.delong_p == 1.0
    assert r.delong_ci[0] <= 0.0 <= r.delong_ci[1]
    assert r.bootstrap_ci[0] <= 0.0 <= r.bootstrap_ci[1]


def test_a_known_difference_gives_a_ci_that_excludes_zero():
    y, a, _, pat = _clustered_example(seed=3, n_patients=300)
    rng = np.random.default_rng(5)
    noise = a + rng.normal(size=len(a)) * 3.0  # the same model, much noisier: lower AUROC
    r = compare_aurocs(y, a, noise, pat, n_boot=300)
    assert r.diff > 0.1
    assert r.delong_ci[0] > 0 and r.bootstrap_ci[0] > 0
    assert r.delong_p < 0.001


def test_mcnemar_counts_discordant_pairs():
    a = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], dtype=bool)
    b = np.array([1, 0, 0, 0, 0, 0, 0, 0, 0, 1], dtype=bool)
    r = mcnemar(a, b)
    assert (r.a_only, r.b_only) == (7, 1)
    assert r.p_value == pytest.approx(0.0703125)  # exact binomial, two-sided: 2 * P(X <= 1 | 8)
    assert mcnemar(a, a).p_value == 1.0
