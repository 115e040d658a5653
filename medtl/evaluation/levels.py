"""Results at the level decisions are made: image predictions aggregated per study and per
patient (``evaluation.aggregate``: mean or max of the images' probabilities).

A study or patient is positive for a class when any of its images is (binary, multi-label);
for multiclass it takes its most frequent image label. Intervals still resample patients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from medtl.errors import look_up_option

__all__ = ["AGGREGATES", "aggregate_predictions", "level_columns"]

AGGREGATES = ("mean", "max")


def level_columns(pred: pd.DataFrame, study_col: str) -> dict[str, str]:
    """``{level: column}`` of the levels this table can be aggregated to."""
    levels = {}
    studies = pred[study_col].astype(str) if study_col in pred.columns else None
    # One image per study: study results would repeat the image results.
    if studies is not None and studies.str.strip().ne("").all() and studies.nunique() < len(pred):
        levels["study"] = study_col
    if pred["patient_id"].astype(str).nunique() < len(pred):  # else: the image results again
        levels["patient"] = "patient_id"
    return levels


def _label(values: pd.Series, classes: Sequence[str], task: str) -> str:
    """The aggregate label of one study or patient from its images' labels."""
    if task == "binary":
        return str(classes[1]) if (values == str(classes[1])).any() else str(classes[0])
    if task == "multilabel":
        hits = {c for v in values for c in str(v).split("|") if c}
        return "|".join(c for c in classes if c in hits)
    return str(values.mode().sort_values().iloc[0])


def aggregate_predictions(
    pred: pd.DataFrame,
    key: str,
    classes: Sequence[str],
    task: str,
    how: str = "mean",
    keep: Sequence[str] = (),
) -> pd.DataFrame:
    """One row per ``key`` value (study or patient) with aggregated ``prob_`` columns and label;
    ``fold``, ``patient_id`` and the ``keep`` columns are taken from its first image."""
    look_up_option(how, AGGREGATES, "evaluation.aggregate")
    prob_cols = [f"prob_{c}" for c in classes]
    g = pred.groupby(pred[key].astype(str), sort=True)
    out = g[prob_cols].agg(how)
    out["label"] = g["label"].agg(lambda v: _label(v, classes, task))
    first: dict[str, Any] = {"patient_id": "first"}
    if "fold" in pred.columns:
        first["fold"] = "first"
    for col in keep:
        if col in pred.columns and col not in first and col != key:
            first[col] = "first"
    out = out.join(g.agg(first))
    out.index.name = "image"  # the evaluator's row identity; here a study or patient id
    return out.reset_index()
