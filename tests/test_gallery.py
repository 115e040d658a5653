"""The report's case gallery: case selection per confusion cell, Grad-CAM overlays from each
fold's best weights on a real tiny run, and the report section embedding them."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import pandas as pd
import pytest

from medtl.evaluation.gallery import (
    CELLS,
    fold_model_loader,
    render_gallery,
    select_cases,
    with_binary_pred,
    write_gallery,
)
from medtl.evaluation.report.gallery import CELL_TITLES, gallery_section

ROOT = Path(__file__).parent.parent
CLASSES = ["normal", "nodule"]


def _oof(rows: list[tuple[str, str, str, float]]) -> pd.DataFrame:
    """An OOF table from ``(image, label, pred, prob_nodule)`` rows (patient p_<image>, fold 0)."""
    return pd.DataFrame(
        {
            "image": [r[0] for r in rows],
            "patient_id": [f"p_{r[0]}" for r in rows],
            "fold": 0,
            "label": [r[1] for r in rows],
            "prob_normal": [1 - r[3] for r in rows],
            "prob_nodule": [r[3] for r in rows],
            "pred": [r[2] for r in rows],
        }
    )


def test_select_cases_most_confident_first_and_empty_cells():
    oof = _oof(
        [
            ("tp_low", "nodule", "nodule", 0.70),
            ("tp_b", "nodule", "nodule", 0.95),
            ("tp_a", "nodule", "nodule", 0.95),  # ties with tp_b: image order decides
            ("tp_mid", "nodule", "nodule", 0.90),
            ("fp_low", "normal", "nodule", 0.60),
            ("fp_high", "normal", "nodule", 0.80),
            ("tn_mid", "normal", "normal", 0.30),
            ("tn_low", "normal", "normal", 0.05),
            ("tn_high", "normal", "normal", 0.40),
        ]
    )
    cases = select_cases(oof.sample(frac=1, random_state=0), "nodule", 2)  # order-free
    got = {cell: [(c.rank, c.image) for c in cases if c.cell == cell] for cell in CELLS}
    assert got == {
        "TP": [(1, "tp_a"), (2, "tp_b")],
        "FP": [(1, "fp_high"), (2, "fp_low")],
        "FN": [],  # no false negative at all: the cell is simply empty
        "TN": [(1, "tn_low"), (2, "tn_mid")],
    }
    assert [c.cell for c in cases] == ["TP", "TP", "FP", "FP", "TN", "TN"]
    first = cases[0]
    assert (first.patient_id, first.fold, first.prob, first.label) == ("p_tp_a", 0, 0.95, "nodule")
    assert select_cases(oof, "nodule", 0) == []


def test_select_cases_is_binary_only():
    multi = _oof([("a", "normal", "normal", 0.2)]).assign(prob_mass=0.1)
    assert select_cases(multi, "nodule", 4) == []
    multilabel = _oof([("a", "normal|nodule", "nodule", 0.9), ("b", "", "", 0.1)])
    assert select_cases(multilabel, "nodule", 4) == []


def test_pred_from_fold_thresholds_uses_the_reports_rule():
    oof = _oof([("a", "nodule", "", 0.5), ("b", "normal", "", 0.49)]).drop(columns="pred")
    oof["fold"] = [0, 1]
    assert with_binary_pred(oof, CLASSES, {"0": 0.5, "1": 0.4})["pred"].tolist() == [
        "nodule",
        "nodule",
    ]


def test_section_without_gallery_is_empty_and_cells_match():
    from types import SimpleNamespace

    assert tuple(CELL_TITLES) == CELLS
    ctx = SimpleNamespace(run_info={}, classes=CLASSES, out_dir=Path("."))
    assert gallery_section(ctx) == []  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_run(demo_data, tmp_path_factory):
    """A 3-fold feature-extraction run at 64 px, and its TrainData rebuilt by the job's stages."""
    from medtl.config import load_config
    from medtl.jobs import run_train
    from medtl.jobs.prepare import prepare_data, read_inputs, split_patients
    from medtl.training.distributed import DistContext

    work = tmp_path_factory.mktemp("gallery")
    cfg = load_config(
        ROOT / "pipelines/cxr_2d_feature_extraction.yaml",
        [
            "transforms.spatial_size=[64,64]",
            "cv.folds=3",
            "evaluation.bootstrap=50",
            "train.progress=false",
            "tracking.enabled=false",
        ],
    )
    cfg.data.cache_dir = str(work / "cache")
    run_dir = run_train(cfg, manifest_path=demo_data.manifest_csv, out_dir=work / "run").run_dir
    cfg = load_config(run_dir / "config.yaml")
    inputs = read_inputs(cfg, cfg.data.manifest)
    data = prepare_data(cfg, inputs, split_patients(inputs, cfg), run_dir, DistContext())
    text = {c: str for c in ("image", "patient_id", "label", "pred")}
    oof = pd.read_csv(run_dir / "oof_predictions.csv", dtype=text, keep_default_na=False)
    return run_dir, cfg, data, oof


def _cell_counts(oof: pd.DataFrame, positive: str) -> dict[str, int]:
    actual, called = oof["label"] == positive, oof["pred"] == positive
    cells = {
        "TP": actual & called,
        "FP": ~actual & called,
        "FN": actual & ~called,
        "TN": ~actual & ~called,
    }
    return {k: int(v.sum()) for k, v in cells.items()}


def test_gallery_of_a_real_run_and_its_report(tiny_run):
    from medtl.evaluation.report import regenerate_report

    run_dir, cfg, data, oof = tiny_run
    assert data.task == "binary" and cfg.evaluation.gallery_per_cell == 4
    per_cell = 2
    items = write_gallery(run_dir, cfg, data, oof, per_cell)
    json.dumps(items)  # JSON-safe for run_info

    counts = _cell_counts(oof, data.classes[1])
    got = {cell: [it for it in items if it["cell"] == cell] for cell in CELLS}
    assert {k: len(v) for k, v in got.items()} == {k: min(n, per_cell) for k, n in counts.items()}
    assert sum(n > 0 for n in counts.values()) >= 2  # the run has cases in several cells
    for it in items:
        png = run_dir / it["png"]
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
        assert it["overlay_shape"] == it["image_shape"] == [64, 64]
        assert it["png"].startswith("gallery/") and it["image"] not in it["png"]

    # The same cases when the job passes the pooled table (no pred) and the fold thresholds.
    info = json.loads((run_dir / "run_info.json").read_text())
    pooled = with_binary_pred(oof.drop(columns="pred"), data.classes, info["fold_thresholds"])
    again = select_cases(pooled, data.classes[1], per_cell)
    assert [(c.cell, c.image) for c in again] == [(it["cell"], it["image"]) for it in items]

    info["gallery"] = items
    (run_dir / "run_info.json").write_text(json.dumps(info))
    paths = regenerate_report(run_dir)
    html, md = paths.html.read_text(), paths.markdown.read_text()
    assert "Case gallery (out-of-fold)" in html
    for it in items:
        assert base64.b64encode((run_dir / it["png"]).read_bytes()).decode() in html
        assert f"]({it['png']})" in md
        assert it["patient_id"] in html
    for cell in CELLS:
        assert CELL_TITLES[cell] in html


def test_a_fold_without_weights_is_skipped(tiny_run, tmp_path, caplog):
    run_dir, cfg, data, oof = tiny_run
    one_per_fold = {c.fold: c for c in reversed(select_cases(oof, data.classes[1], 4))}
    cases = [one_per_fold[k] for k in sorted(one_per_fold)]
    folds = [c.fold for c in cases]
    assert len(folds) >= 2
    best = run_dir / "folds" / f"fold_{folds[0]}" / "best.pt"
    moved = best.rename(tmp_path / "best.pt")
    try:
        with caplog.at_level(logging.WARNING, logger="medtl"):
            items = render_gallery(
                cases,
                {r["image_rel"]: r for r in data.train_pool},
                fold_model_loader(cfg, len(data.classes), run_dir),
                data.transforms.eval,
                data.cache_dir,
                tmp_path / "gallery",
            )
    finally:
        moved.rename(best)
    assert sorted(it.image for it in items) == sorted(c.image for c in cases[1:])
    assert all((tmp_path / "gallery" / it.png.name).is_file() for it in items)
    assert f"fold {folds[0]}" in caplog.text and "no weights file" in caplog.text
