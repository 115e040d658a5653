"""Results at the level decisions are made: studies and patients from their images."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest

from medtl.config import PipelineConfig
from medtl.evaluation.levels import aggregate_predictions, level_columns
from medtl.inference import group_predictions

CLASSES = ["normal", "nodule"]


def _pred() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image": ["a1", "a2", "b1", "c1", "c2"],
            "patient_id": ["P1", "P1", "P2", "P3", "P3"],
            "study_id": ["S1", "S1", "S2", "S3", "S4"],
            "fold": [0, 0, 1, 1, 1],
            "label": ["normal", "nodule", "normal", "normal", "normal"],
            "prob_normal": [0.9, 0.2, 0.6, 0.7, 0.1],
            "prob_nodule": [0.1, 0.8, 0.4, 0.3, 0.9],
        }
    )


@pytest.mark.parametrize(("how", "p1"), [("mean", 0.45), ("max", 0.8)])
def test_a_patient_is_positive_when_any_image_is_and_probabilities_aggregate(how, p1):
    agg = aggregate_predictions(_pred(), "patient_id", CLASSES, "binary", how)
    row = agg.set_index("image").loc["P1"]
    assert row["label"] == "nodule"
    assert row["prob_nodule"] == pytest.approx(p1)
    assert list(agg["fold"]) == [0, 1, 1]  # a patient's images share one fold
    assert len(agg) == 3


def test_levels_need_a_filled_study_column():
    assert list(level_columns(_pred(), "study_id")) == ["study", "patient"]
    assert list(level_columns(_pred().drop(columns="study_id"), "study_id")) == ["patient"]
    one_per_study = _pred().assign(study_id=lambda d: d["image"])
    assert list(level_columns(one_per_study, "study_id")) == ["patient"]
    one_each = one_per_study.assign(patient_id=lambda d: d["image"])
    assert list(level_columns(one_each, "study_id")) == []


def test_predict_group_rows_threshold_the_aggregate_and_count_unreadable_images():
    preds = _pred()[["image", "prob_normal", "prob_nodule"]].assign(error=None)
    preds.loc[4, ["prob_normal", "prob_nodule"]] = float("nan")
    preds.loc[4, "error"] = "UnreadableImageError: truncated"
    cfg = PipelineConfig()
    bundle = SimpleNamespace(classes=CLASSES, task="binary", threshold=0.5, cfg=cfg)
    rows = group_predictions(preds, _pred()["patient_id"], bundle).set_index("group")
    assert rows.loc["P1", "pred"] == "normal"  # mean 0.45 < 0.5
    assert rows.loc["P3", "n_images"] == 1 and rows.loc["P3", "n_unreadable"] == 1
    assert rows.loc["P3", "prob_nodule"] == pytest.approx(0.3)
    rows_max = group_predictions(preds, _pred()["patient_id"], bundle, how="max")
    assert rows_max.set_index("group").loc["P1", "pred"] == "nodule"
