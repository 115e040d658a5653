"""The clinical report: every file written, standalone HTML, all tasks, regeneration."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pandas as pd
import pytest

from medtl.config import build_config
from medtl.evaluation.report import (
    format_ci,
    headline_rows,
    regenerate_report,
    write_evaluation_report,
    write_report,
)

CLASSES = {
    "binary": ["normal", "pneumonia"],
    "multiclass": ["covid", "normal", "pneumonia"],
    "multilabel": ["effusion", "nodule", "pneumothorax"],
}
PNG = b"\x89PNG\r\n\x1a\n"


def synthetic_oof(task: str, n_patients: int = 60, seed: int = 0) -> pd.DataFrame:
    """3-fold out-of-fold table with pseudonymised patients, a site column and real signal."""
    rng = np.random.default_rng(seed)
    classes = CLASSES[task]
    rows = []
    for i in range(n_patients):
        if task == "multilabel":
            label = "|".join(c for c in classes if rng.random() < 0.4)
        elif task == "multiclass":
            label = classes[i % 3]
        else:
            label = classes[int(i % 3 == 0)]
        for j in range(int(rng.integers(1, 4))):
            rows.append(
                {
                    "image": f"img/{i}_{j}.dcm",
                    "patient_id": f"PSN-{i:04d}",
                    "label": label,
                    "fold": i % 3,
                    "site": ["north", "south", None][i % 3 if i < 6 else i % 2],
                }
            )
    df = pd.DataFrame(rows)
    Y = np.array([[c in lab.split("|") for c in classes] for lab in df["label"]], float)
    logits = 1.5 * Y + rng.normal(size=Y.shape)
    if task == "multilabel":
        P = 1 / (1 + np.exp(-logits))
    else:
        P = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    for i, c in enumerate(classes):
        df[f"prob_{c}"] = P[:, i]
    return df


def thresholds_for(task: str):
    if task == "binary":
        return {0: 0.45, 1: 0.5, 2: 0.55}
    return {k: [0.3 + 0.05 * k] * 3 for k in range(3)}


def config(task: str):
    return build_config(
        {
            "name": f"test_{task}",
            "data": {"task": task, "classes": CLASSES[task]},
            "cv": {"folds": 3},
            "evaluation": {"bootstrap": 100, "subgroups": ["site", "scanner"]},
        }
    )


def write(task: str, out_dir, **extra):
    cfg = config(task)
    oof = synthetic_oof(task)
    fold_thresholds = thresholds_for(task)
    run_info = {
        "classes": CLASSES[task],
        "task": task,
        "fold_thresholds": {str(k): v for k, v in fold_thresholds.items()},
        "final_threshold": 0.5 if task == "binary" else [0.35] * 3,
        "data_summary": {"n_images": len(oof), "n_patients": 60, "per_site": {"north": 2}},
        "quarantine": [{"path": "img/broken.dcm", "reason": "truncated pixel data"}],
        "created": "2026-01-01T00:00:00+00:00",
        "weights": {"tag": "imagenet", "sha256": "ab" * 32},
    }
    paths = write_report(
        out_dir,
        oof=oof,
        classes=CLASSES[task],
        task=task,
        fold_thresholds=fold_thresholds,
        cfg=cfg,
        data_summary=run_info["data_summary"],
        quarantine=run_info["quarantine"],
        run_info=run_info,
        **extra,
    )
    (out_dir / "config.yaml").write_text(cfg.to_yaml())
    (out_dir / "run_info.json").write_text(json.dumps(run_info))
    return paths, oof


def assert_standalone_html(text: str) -> None:
    assert "<script" not in text.lower() and "<link" not in text.lower()
    assert not re.search(r"(?:src|href)\s*=\s*[\"']?\s*(?:https?:)?//", text, re.IGNORECASE)
    assert "url(" not in text  # no external CSS resources either
    sources = re.findall(r"<img[^>]*\ssrc=\"([^\"]+)\"", text)
    assert len(sources) == 4
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1], validate=True).startswith(PNG)


@pytest.mark.parametrize("task", ["binary", "multiclass", "multilabel"])
def test_report_writes_every_file(task, tmp_path):
    paths, oof = write(task, tmp_path)
    for p in (paths.markdown, paths.html, paths.metrics, paths.predictions):
        assert p.is_file() and p.stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "confusion.png",
        "pr.png",
        "reliability.png",
        "roc.png",
    ]
    assert all(p.read_bytes().startswith(PNG) for p in paths.plots.values())
    assert_standalone_html(paths.html.read_text())

    pred = pd.read_csv(paths.predictions, dtype=str, keep_default_na=False)
    assert list(pred.columns[:4]) == ["image", "patient_id", "fold", "label"]
    assert [c for c in pred.columns if c.startswith("prob_")] == [
        f"prob_{c}" for c in CLASSES[task]
    ]
    assert "pred" in pred.columns and "site" in pred.columns and len(pred) == len(oof)

    metrics = json.loads(paths.metrics.read_text())
    assert set(metrics["folds"]) == {"0", "1", "2"}
    assert metrics["subgroups_missing"] == ["scanner"]
    if task != "binary":
        assert set(metrics["pooled"]["per_class"]) == set(CLASSES[task])

    md = paths.markdown.read_text()
    assert re.search(r"AUROC \| 0\.\d\d \(0\.\d\d–[01]\.\d\d\)", md)  # value (low–high)
    for section in (
        "## Per fold",
        "## Operating threshold",
        "## Calibration",
        "## Subgroups",
        "## Quarantined files",
        "## Limitations and notes",
    ):
        assert section in md
    assert "img/broken.dcm" in md and "retrospective internal validation" in md.lower()
    assert "PSN-" not in md and "PSN-" not in paths.html.read_text()  # counts only, no patient IDs


def test_binary_predictions_follow_fold_thresholds(tmp_path):
    paths, oof = write("binary", tmp_path)
    pred = pd.read_csv(paths.predictions)
    thr = oof["fold"].map(thresholds_for("binary"))
    expected = np.where(oof["prob_pneumonia"] >= thr, "pneumonia", "normal")
    assert pred["pred"].tolist() == expected.tolist()


def test_regenerate_reproduces_metrics(tmp_path):
    paths, _ = write("multiclass", tmp_path)
    before = paths.metrics.read_text()
    md_before = paths.markdown.read_text()
    paths.metrics.unlink()
    again = regenerate_report(tmp_path)
    assert again.metrics.read_text() == before
    assert again.markdown.read_text() == md_before


def test_regenerate_names_what_is_missing(tmp_path):
    from medtl.errors import MedtlError

    with pytest.raises(MedtlError, match="run_info.json"):
        regenerate_report(tmp_path)


def test_held_out_evaluation_report(tmp_path):
    cfg = build_config(
        {
            "data": {"label_column": "finding", "patient_column": "subject"},
            "evaluation": {"bootstrap": 50},
        }
    )
    df = synthetic_oof("binary").drop(columns="fold")
    df = df.rename(columns={"label": "finding", "patient_id": "subject"})
    paths = write_evaluation_report(
        tmp_path / "test", df, CLASSES["binary"], "binary", 0.5, cfg, {"source": "heldout.csv"}
    )
    md = paths.markdown.read_text()
    assert "## Per fold" not in md and "heldout.csv" in md
    assert paths.predictions.name == "predictions.csv"
    metrics = json.loads(paths.metrics.read_text())
    assert metrics["folds"] == {} and metrics["thresholds"]["final"] == 0.5
    assert_standalone_html(paths.html.read_text())


def test_formatting_helpers():
    assert format_ci({"value": 0.912, "low": 0.851, "high": 0.958}) == "0.91 (0.85–0.96)"
    assert format_ci({"value": None, "low": None, "high": None}) == "n/a"
    assert format_ci({"value": 0.5, "low": None, "high": None}) == "0.50"
    rows = headline_rows(
        {"pooled": {"summary": {"auroc": {"value": 0.9, "low": 0.8, "high": 0.95}}}}
    )
    assert rows == [("AUROC", "0.90 (0.80–0.95)")]
