"""Clinical metrics equal scikit-learn's; bootstrap CIs resample patients."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from medtl.errors import ManifestError, MedtlError
from medtl.evaluation.calibration import expected_calibration_error, reliability_curve
from medtl.evaluation.metrics import (
    BINARY_METRICS,
    PatientResamples,
    binary_metrics,
    bootstrap_binary_metrics,
    bootstrap_ci,
    evaluate,
)


def fixture(n_patients=60, per_patient=(1, 4), seed=0, rounding=2):
    """Patient-level labels, image-level probabilities (rounded so ties occur)."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_patients), rng.integers(*per_patient, n_patients))
    y = (rng.random(n_patients) < 0.35).astype(int)[groups]
    p = np.clip(0.35 * y + 0.65 * rng.random(len(groups)), 0, 1).round(rounding)
    return y, p, groups


def auroc(y, p):
    return roc_auc_score(y, p) if 0 < y.sum() < len(y) else None


def test_binary_metrics_equal_sklearn():
    y, p, _ = fixture()
    m = binary_metrics(y, p, 0.5)
    pred = (p >= 0.5).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred).ravel()
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (tn, fp, fn, tp)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p))
    assert m["auprc"] == pytest.approx(average_precision_score(y, p))
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred))
    assert m["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0))
    assert m["ppv"] == pytest.approx(precision_score(y, pred))
    assert m["npv"] == pytest.approx(precision_score(y, pred, pos_label=0))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["brier"] == pytest.approx(brier_score_loss(y, p))
    assert (m["n"], m["n_pos"]) == (len(y), int(y.sum()))


def test_ece_matches_reliability_bins():
    y, p, _ = fixture(rounding=1)  # many probabilities exactly on bin edges
    prob_true, prob_pred = calibration_curve(y, p, n_bins=10)
    cur = reliability_curve(y, p, 10)
    assert np.allclose(cur["prob_true"], prob_true) and np.allclose(cur["prob_pred"], prob_pred)
    weights = np.asarray(cur["count"]) / len(y)
    assert expected_calibration_error(y, p, 10) == pytest.approx(
        float(np.sum(weights * np.abs(prob_true - prob_pred)))
    )
    assert expected_calibration_error(np.r_[0, 1], np.r_[0.0, 1.0]) == 0.0


def test_undefined_metrics_are_none_not_errors():
    m = binary_metrics(np.zeros(6), np.linspace(0, 1, 6), 0.5)
    assert m["auroc"] is None and m["sensitivity"] is None and m["auprc"] is None
    assert m["specificity"] == pytest.approx(0.5)
    m = binary_metrics(np.ones(4), np.full(4, 0.1), 0.5)
    assert m["ppv"] is None and m["f1"] == 0.0 and m["specificity"] is None


def test_vectorised_bootstrap_equals_materialised_resamples():
    y, p, groups = fixture(40)
    thr = np.where(groups % 2, 0.5, 0.4)  # per-row thresholds, as pooled OOF uses
    res = PatientResamples.draw(groups, 150, seed=3)
    reps = bootstrap_binary_metrics(y, p, thr, res)
    for b in range(150):
        idx = res.indices(b)
        counts = res.counts(b, b + 1)[0]
        assert np.array_equal(np.unique(res.codes[idx]), np.flatnonzero(counts))
        assert len(np.unique(groups[idx])) == np.count_nonzero(counts)
        direct = binary_metrics(y[idx], p[idx], thr[idx])
        for name in BINARY_METRICS:
            if direct[name] is None:
                assert np.isnan(reps[name][b]), (name, b)
            else:
                assert reps[name][b] == pytest.approx(direct[name], abs=1e-12), (name, b)


def test_resamples_in_chunks_are_the_same_resamples_and_metrics():
    """Chunking bounds memory; it must not change a single draw or value: int32 draws equal
    numpy's default int64 ones, and one chunk per resample gives the one-chunk result."""
    y, p, groups = fixture(40)
    res = PatientResamples.draw(groups, 150, seed=3)
    n_pat = len(np.unique(groups))
    assert np.array_equal(res.draws, np.random.default_rng(3).integers(0, n_pat, (150, n_pat)))
    whole = bootstrap_binary_metrics(y, p, 0.5, res)
    tiny = bootstrap_binary_metrics(y, p, 0.5, res, chunk_cells=1)  # one resample per chunk
    for name in BINARY_METRICS:
        np.testing.assert_allclose(tiny[name], whole[name], rtol=1e-12, atol=0, err_msg=name)
    assert sum(1 for _ in res.count_chunks(len(p), cells=1)) == 150


def test_bootstrap_ci_contains_estimate_and_widens_with_fewer_patients():
    y, p, groups = fixture(300, seed=1)
    full = bootstrap_ci(auroc, y, p, groups, n_boot=300, seed=0)
    assert full.low <= roc_auc_score(y, p) <= full.high
    few = groups < 40
    small = bootstrap_ci(auroc, y[few], p[few], groups[few], n_boot=300, seed=0)
    assert small.low <= roc_auc_score(y[few], p[few]) <= small.high
    assert (small.high - small.low) > 1.5 * (full.high - full.low)
    low, high = full  # unpacks as a (low, high) pair
    assert (low, high) == (full.low, full.high) and full.n_used + full.n_skipped == 300


def test_bootstrap_resamples_patients_not_images():
    """Ten identical images per patient carry one patient's information, not ten."""
    rng = np.random.default_rng(2)
    n_pat = 80
    y_pat = (rng.random(n_pat) < 0.5).astype(int)
    p_pat = np.clip(0.3 * y_pat + 0.7 * rng.random(n_pat), 0, 1)
    groups = np.repeat(np.arange(n_pat), 10)
    y, p = y_pat[groups], p_pat[groups]
    patient = bootstrap_ci(auroc, y, p, groups, n_boot=300, seed=0)
    image = bootstrap_ci(auroc, y, p, np.arange(len(y)), n_boot=300, seed=0)
    one_each = bootstrap_ci(auroc, y_pat, p_pat, np.arange(n_pat), n_boot=300, seed=0)
    width = {
        k: v.high - v.low for k, v in [("patient", patient), ("image", image), ("one", one_each)]
    }
    assert width["patient"] > 2 * width["image"], width
    assert width["patient"] == pytest.approx(width["one"], rel=0.35), width


def test_bootstrap_skips_and_counts_undefined_resamples():
    y = np.r_[1, np.zeros(9)].astype(int)  # one positive patient out of ten
    p = np.linspace(0.1, 0.9, 10)
    ci = bootstrap_ci(auroc, y, p, np.arange(10), n_boot=200, seed=0)
    assert ci.n_skipped > 0 and ci.n_used + ci.n_skipped == 200
    assert ci.low is not None


def oof_table(task: str, n_patients: int = 90, seed: int = 0):
    """A synthetic out-of-fold table: 3 folds by patient, site subgroup, informative probs."""
    rng = np.random.default_rng(seed)
    classes = {"binary": ["normal", "pneumonia"], "multiclass": ["a", "b", "c"]}.get(
        task, ["effusion", "nodule", "pneumothorax"]
    )
    rows = []
    for i in range(n_patients):
        if task == "multilabel":
            label = "|".join(c for c in classes if rng.random() < 0.4)
        elif task == "multiclass":
            label = classes[i % 3]
        else:
            label = classes[int(rng.random() < 0.35)]
        for j in range(int(rng.integers(1, 4))):
            rows.append(
                {
                    "image": f"{i}_{j}.dcm",
                    "patient_id": f"{i:04d}",
                    "label": label,
                    "fold": i % 3,
                    "site": "AB"[i % 2],
                }
            )
    df = pd.DataFrame(rows)
    Y = np.array([[c in str(lab).split("|") for c in classes] for lab in df["label"]], float)
    logits = 1.6 * Y + rng.normal(size=Y.shape)
    P = (
        1 / (1 + np.exp(-logits))
        if task == "multilabel"
        else np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    )
    for i, c in enumerate(classes):
        df[f"prob_{c}"] = P[:, i]
    return df, classes, Y, P


def test_evaluate_binary_pooled_folds_and_subgroups():
    df, classes, Y, P = oof_table("binary")
    thresholds = {0: 0.4, 1: 0.5, 2: 0.6}
    df.loc[df["patient_id"].isin(["0000", "0002", "0004"]), "site"] = "C"  # tiny subgroup
    df.loc[df["site"] == "C", "label"] = "normal"
    y = (df["label"] == "pneumonia").to_numpy().astype(int)
    p = df["prob_pneumonia"].to_numpy()
    r = evaluate(df, classes, "binary", thresholds, n_boot=200, seed=0, subgroups=["site", "sex"])
    pooled = r["pooled"]["summary"]
    assert pooled["auroc"]["value"] == pytest.approx(roc_auc_score(y, p))
    assert pooled["auroc"]["low"] <= pooled["auroc"]["value"] <= pooled["auroc"]["high"]
    # Pooled threshold metrics use each row's own fold threshold.
    pred = p >= df["fold"].map(thresholds).to_numpy()
    assert pooled["sensitivity"]["value"] == pytest.approx(recall_score(y, pred))
    for k in range(3):
        m = (df["fold"] == k).to_numpy()
        assert r["folds"][str(k)]["summary"]["auroc"]["value"] == pytest.approx(
            roc_auc_score(y[m], p[m])
        )
    mean = np.mean([r["folds"][str(k)]["summary"]["auroc"]["value"] for k in range(3)])
    assert r["fold_summary"]["summary"]["auroc"]["mean"] == pytest.approx(mean)
    site_c = r["subgroups"]["site"]["C"]
    assert site_c["summary"]["auroc"]["value"] is None and site_c["n_patients"] == 3
    assert site_c["summary"]["specificity"]["value"] is not None
    assert r["subgroups_missing"] == ["sex"]
    assert any("site=C" in note for note in r["notes"])
    assert r["n_patients"] == 90 and r["folds"]["0"]["n_patients"] == 30


def test_evaluate_multiclass_matches_sklearn_macro():
    df, classes, Y, P = oof_table("multiclass")
    r = evaluate(df, classes, "multiclass", [0.4, 0.3, 0.35], n_boot=100, seed=0)
    s = r["pooled"]["summary"]
    y_idx = Y.argmax(1)
    assert s["auroc"]["value"] == pytest.approx(
        roc_auc_score(y_idx, P, multi_class="ovr", average="macro")
    )
    assert s["accuracy"]["value"] == pytest.approx(accuracy_score(y_idx, P.argmax(1)))
    assert (
        s["balanced_accuracy"]["low"]
        <= s["balanced_accuracy"]["value"]
        <= s["balanced_accuracy"]["high"]
    )
    assert r["pooled"]["confusion"] == confusion_matrix(y_idx, P.argmax(1)).tolist()
    b = r["pooled"]["per_class"]["b"]
    pred_b = P[:, 1] >= 0.3
    assert b["metrics"]["sensitivity"]["value"] == pytest.approx(recall_score(Y[:, 1], pred_b))
    assert set(r["calibration"]) == set(classes)


def test_evaluate_multilabel_per_label():
    df, classes, Y, P = oof_table("multilabel")
    r = evaluate(df, classes, "multilabel", 0.5, n_boot=0)
    per_label = roc_auc_score(Y, P, average=None)
    for c, expected in zip(classes, per_label, strict=True):
        assert r["pooled"]["per_class"][c]["metrics"]["auroc"]["value"] == pytest.approx(expected)
    assert r["pooled"]["summary"]["auroc"]["value"] == pytest.approx(per_label.mean())
    assert r["pooled"]["summary"]["auroc"]["low"] is None  # no bootstrap requested


def test_evaluate_errors_name_the_problem():
    df, classes, _, _ = oof_table("binary", n_patients=12)
    bad = df.assign(label=df["label"].replace("pneumonia", "pneumonai"))
    with pytest.raises(ManifestError, match="pneumonai.*normal"):
        evaluate(bad, classes, "binary", 0.5, n_boot=0)
    with pytest.raises(MedtlError, match=r"fold\(s\) \[2\] have no threshold"):
        evaluate(df, classes, "binary", {0: 0.5, 1: 0.5}, n_boot=0)
    with pytest.raises(MedtlError, match="prob_pneumonia"):
        evaluate(df.drop(columns="prob_pneumonia"), classes, "binary", 0.5, n_boot=0)
