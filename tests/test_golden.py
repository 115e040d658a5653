"""The staged train job gives byte-identical outputs to the code before it was split (a458b9c).

The reference files were written by ``tests/golden/make_golden.py`` run against that commit
(see its docstring); this test runs the same cases on the same demo data with today's code.
fold_assignments.csv must be identical bytes; every column of oof_predictions.csv and every
value of metrics.json the old code wrote must be reproduced exactly (later work adds columns
and keys: a study column, recalibration, per-level results).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent / "golden"))
from make_golden import CASES, DEMO, run_case  # noqa: E402

GOLDEN = Path(__file__).parent / "golden"
IDENTITY = "config_identity"  # a hash over this machine's paths (see make_golden.py)


def contains(new: Any, ref: Any, where: str = "") -> list[str]:
    """Where ``new`` differs from ``ref``: every key the reference has must hold the same value
    (later work may add keys; it may not change or drop one)."""
    if isinstance(ref, dict):
        if not isinstance(new, dict):
            return [where or "/"]
        out = []
        for k, v in ref.items():
            if k == IDENTITY:
                continue
            out += [f"{where}/{k} missing"] if k not in new else contains(new[k], v, f"{where}/{k}")
        return out
    return [] if new == ref else [where]


def csv_columns_match(new: Path, ref: Path) -> list[str]:
    """Every column of the reference CSV, as text, in the same rows (new columns allowed)."""
    a = pd.read_csv(new, dtype=str, keep_default_na=False)
    b = pd.read_csv(ref, dtype=str, keep_default_na=False)
    if len(a) != len(b):
        return [f"{len(a)} rows, reference {len(b)}"]
    return [c for c in b.columns if c not in a.columns or not a[c].equals(b[c])]


@pytest.fixture(scope="module")
def golden_demo(tmp_path_factory):
    """Its own copy, so no other test's files can reach the reference run."""
    from medtl.demo_data import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("golden_demo"), **DEMO)


# What the code at a458b9c did, in today's config: select epochs on the reported fold and
# keep the model's own probabilities (later work made nested selection and recalibration the
# defaults; with these two settings nothing the old code wrote may change).
BEFORE = ["cv.selection=outer", "evaluation.calibration=none"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_train_outputs_match_reference(case, golden_demo, tmp_path):
    run = run_case(case, golden_demo.manifest_csv, tmp_path, extra=BEFORE)
    want = GOLDEN / case
    assert (run / "fold_assignments.csv").read_bytes() == (
        want / "fold_assignments.csv"
    ).read_bytes()
    assert csv_columns_match(run / "oof_predictions.csv", want / "oof_predictions.csv") == []
    new = json.loads((run / "metrics.json").read_text())
    assert contains(new, json.loads((want / "metrics.json").read_text())) == []


def test_the_comparison_notices_a_changed_value():
    ref = {"pooled": {"auroc": {"value": 0.7}}, IDENTITY: "x"}
    assert contains({"pooled": {"auroc": {"value": 0.7, "low": 0.6}}}, ref) == []
    assert contains({"pooled": {"auroc": {"value": 0.71}}}, ref) == ["/pooled/auroc/value"]
    assert contains({"pooled": {}}, ref) == ["/pooled/auroc missing"]
