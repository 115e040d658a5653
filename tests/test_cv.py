"""Patient-grouped splits: no leakage, stratification, honoured fold/split columns, thresholds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_curve

from medtl.config import CVConfig
from medtl.cv import (
    choose_threshold,
    choose_thresholds,
    load_splits,
    make_or_load_splits,
    make_splits,
    save_splits,
)
from medtl.errors import ConfigError, ManifestError, MedtlError


def manifest(n_patients: int = 200, pos_rate: float = 0.3, seed: int = 0) -> pd.DataFrame:
    """Patients with 1-8 images each; every image of a patient shares the patient's label."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_patients):
        label = "pneumonia" if rng.random() < pos_rate else "normal"
        for j in range(int(rng.integers(1, 9))):
            rows.append({"image": f"p{i:03d}/img{j}.dcm", "patient_id": f"{i:03d}", "label": label})
    return pd.DataFrame(rows)


def folds_per_patient(df: pd.DataFrame) -> pd.Series:
    return df.groupby("patient_id")["fold"].nunique()


@pytest.mark.parametrize("folds,test_fraction", [(5, 0.0), (3, 0.0), (5, 0.2)])
def test_no_patient_in_two_folds(folds, test_fraction):
    df = manifest()
    out = make_splits(df, CVConfig(folds=folds, test_fraction=test_fraction), seed=7)
    assert folds_per_patient(out).max() == 1
    assert sorted(set(out.loc[out["split"] == "train", "fold"])) == list(range(folds))
    # Row order and count unchanged: the pipeline indexes the result by manifest row.
    assert out["image"].tolist() == df["image"].tolist()


def test_stratification_keeps_class_ratio():
    df = manifest(pos_rate=0.25)
    out = make_splits(df, CVConfig(folds=5), seed=1)
    overall = (out["label"] == "pneumonia").mean()
    per_fold = out.groupby("fold")["label"].apply(lambda s: (s == "pneumonia").mean())
    assert (per_fold - overall).abs().max() < 0.05, per_fold.to_dict()
    sizes = out.groupby("fold").size()
    assert sizes.max() / sizes.min() < 1.3


def test_seeded_and_reproducible():
    df = manifest()
    a = make_splits(df, CVConfig(folds=5), seed=3)["fold"]
    b = make_splits(df, CVConfig(folds=5), seed=3)["fold"]
    c = make_splits(df, CVConfig(folds=5), seed=4)["fold"]
    assert a.equals(b)
    assert not a.equals(c)


def test_fold_column_is_honoured():
    df = manifest(60)
    given = {p: i % 4 for i, p in enumerate(sorted(df["patient_id"].unique()))}
    df["fold"] = df["patient_id"].map(given)
    out = make_splits(df, CVConfig(folds=4), seed=0)
    assert out["fold"].tolist() == df["fold"].tolist()
    assert set(out["split"]) == {"train"}


def test_fold_column_splitting_a_patient_is_an_error():
    df = manifest(40)
    df["fold"] = df["patient_id"].map(lambda p: int(p) % 3)
    victim = df.groupby("patient_id").size().idxmax()  # a patient with several images
    first = df.index[df["patient_id"] == victim][0]
    df.loc[first, "fold"] = (df.loc[first, "fold"] + 1) % 3
    with pytest.raises(ManifestError, match=rf"patient '{victim}' is in folds \[\d, \d\]"):
        make_splits(df, CVConfig(folds=3))


def test_fold_column_count_must_match_config():
    df = manifest(40)
    df["fold"] = df["patient_id"].map(lambda p: int(p) % 4)
    with pytest.raises(ConfigError, match="has 4 folds but cv.folds=5.*cv.folds=4"):
        make_splits(df, CVConfig(folds=5))


def test_split_column_test_patients_never_in_folds():
    df = manifest()
    test_patients = set(sorted(df["patient_id"].unique())[::5])
    df["split"] = np.where(df["patient_id"].isin(test_patients), "test", "train")
    out = make_splits(df, CVConfig(folds=5), seed=0)
    held = out[out["split"] == "test"]
    assert set(held["patient_id"]) == test_patients
    assert (held["fold"] == -1).all()
    assert not set(out.loc[out["fold"] >= 0, "patient_id"]) & test_patients


def test_split_column_half_test_patient_is_an_error():
    df = manifest(30)
    df["split"] = "train"
    victim = df.groupby("patient_id").size().idxmax()
    df.loc[df.index[df["patient_id"] == victim][0], "split"] = "test"
    with pytest.raises(ManifestError, match=victim):
        make_splits(df, CVConfig(folds=3))


def test_test_fraction_is_patient_grouped_and_stratified():
    df = manifest(200)
    out = make_splits(df, CVConfig(folds=5, test_fraction=0.2), seed=2)
    test_p = set(out.loc[out["split"] == "test", "patient_id"])
    train_p = set(out.loc[out["split"] == "train", "patient_id"])
    assert not test_p & train_p
    assert abs(len(test_p) / 200 - 0.2) < 0.02
    pos = out.groupby("patient_id")["label"].first() == "pneumonia"
    assert abs(pos[list(test_p)].mean() - pos.mean()) < 0.05
    assert (out.loc[out["split"] == "test", "fold"] == -1).all()


def test_too_few_patients_of_a_class():
    df = manifest(40, pos_rate=0.0)
    rare = df["patient_id"].isin(["000", "001"])
    df.loc[rare, "label"] = "effusion"
    with pytest.raises(ManifestError, match=r"'effusion' has 2 patient\(s\).*cv.folds=2"):
        make_splits(df, CVConfig(folds=5))


def test_multilabel_rare_label_spread_over_folds():
    rng = np.random.default_rng(0)
    rows = []
    for i in range(120):
        labs = [
            x
            for x, r in (("effusion", 0.5), ("nodule", 0.4), ("pneumothorax", 0.06))
            if rng.random() < r
        ]
        if i < 6:
            labs.append("pneumothorax")  # at least 6 patients with the rare label
        for j in range(2):
            rows.append(
                {"image": f"{i}_{j}", "patient_id": f"P{i}", "label": "|".join(sorted(set(labs)))}
            )
    df = pd.DataFrame(rows)
    out = make_splits(df, CVConfig(folds=3), seed=0)
    assert folds_per_patient(out).max() == 1
    rare = out[out["label"].str.contains("pneumothorax")]
    assert set(rare["fold"]) == {0, 1, 2}


def test_missing_column_names_the_columns():
    with pytest.raises(ManifestError, match="patient_id"):
        make_splits(pd.DataFrame({"label": ["a"]}), CVConfig())


def test_save_load_round_trip_keeps_identifiers(tmp_path):
    df = manifest(50)
    out = make_splits(df, CVConfig(folds=3, test_fraction=0.2), seed=0)
    path = save_splits(out, tmp_path)
    assert path.name == "fold_assignments.csv"
    back = load_splits(path)
    assert list(back.columns) == ["image", "patient_id", "label", "fold", "split"]
    assert back["patient_id"].tolist() == out["patient_id"].tolist()  # "007" stays "007"
    assert back["fold"].tolist() == out["fold"].tolist()
    # A stored table (fold -1 = test) fed back as a manifest fold column gives the same split.
    again = make_splits(back, CVConfig(folds=3))
    assert again["fold"].tolist() == out["fold"].tolist()
    assert again["split"].tolist() == out["split"].tolist()


def test_make_or_load_reuses_and_checks(tmp_path):
    df = manifest(50)
    first = make_or_load_splits(df, CVConfig(folds=3), tmp_path, seed=0)
    second = make_or_load_splits(df, CVConfig(folds=3), tmp_path, seed=99)  # seed ignored: reused
    assert first["fold"].tolist() == second["fold"].tolist()
    changed = pd.concat(
        [df, pd.DataFrame([{"image": "new.dcm", "patient_id": "999", "label": "normal"}])]
    )
    with pytest.raises(ManifestError, match="new.dcm"):
        make_or_load_splits(changed, CVConfig(folds=3), tmp_path)


def test_choose_threshold_youden_and_sensitivity():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(80), np.ones(40)].astype(int)
    p = np.r_[rng.beta(2, 5, 80), rng.beta(5, 2, 40)]
    t = choose_threshold(y, p, "youden")
    fpr, tpr, thr = roc_curve(y, p)
    assert t in thr[1:]
    pred = p >= t
    j = pred[y == 1].mean() - pred[y == 0].mean()
    assert j == pytest.approx(np.max(tpr - fpr))

    t90 = choose_threshold(y, p, "sensitivity", target_sensitivity=0.9)
    assert (p[y == 1] >= t90).mean() >= 0.9
    higher = np.sort(p[p > t90])
    assert len(higher) == 0 or (p[y == 1] >= higher[0]).mean() < 0.9


def test_choose_threshold_errors():
    with pytest.raises(MedtlError, match="one class"):
        choose_threshold(np.zeros(5), np.linspace(0, 1, 5))
    with pytest.raises(ConfigError, match="youden"):
        choose_threshold(np.r_[0, 1], np.r_[0.2, 0.8], method="youdn")


def test_choose_thresholds_per_class():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 90)
    probs = rng.dirichlet(np.ones(3), 90)
    thr = choose_thresholds(y, probs, "multiclass")
    assert len(thr) == 3
    assert thr[2] == choose_threshold((y == 2).astype(int), probs[:, 2])
    assert isinstance(choose_thresholds((y == 1).astype(int), probs[:, :2], "binary"), float)
