"""The shifted third site of the demo data, leave-one-site-out CV, and the gap it shows.

The gap test trains the calibrated source model of ``tests/adapt_helpers.py`` once (module
fixture) and checks the two facts the adaptation work rests on: without adaptation site C
scores well below the source validation AUROC, and AdaBN on site C's unlabelled images raises it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from adapt_helpers import DEMO_ADAPT_DATA, adabn_target_auroc, train_source_model
from click.testing import CliRunner

from medtl.config import CVConfig
from medtl.cv import make_or_load_splits, make_splits
from medtl.demo_data import demo_phi_values, make_demo_data
from medtl.errors import ConfigError, ManifestError

ROOT = Path(__file__).parent.parent
FE = ROOT / "pipelines/cxr_2d_feature_extraction.yaml"


def _digest(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.relative_to(root).as_posix().startswith(skip)
    }


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    """The same small demo with and without site C."""
    root = tmp_path_factory.mktemp("site_c")
    kw = {"n_patients": 6, "image_size": 64, "seed": 3, "n_3d": 2, "n_holdout": 2}
    return (
        make_demo_data(root / "with", target_patients=8, **kw),
        make_demo_data(root / "without", target_patients=0, **kw),
    )


def test_site_c_is_its_own_export_with_new_patients(small_pair):
    with_c, _ = small_pair
    source = pd.read_csv(with_c.manifest_csv)
    target = pd.read_csv(with_c.target_manifest_csv)
    unlabelled = pd.read_csv(with_c.target_unlabelled_csv)
    assert set(target["site"]) == {"site_c"} and "site_c" not in set(source["site"])
    assert target["patient_id"].nunique() == 8
    assert target["patient_id"].str.fullmatch(r"P-[0-9a-f]{12}").all()
    assert not set(target["patient_id"]) & set(source["patient_id"])
    holdout = pd.read_csv(with_c.holdout_manifest_csv)
    assert not set(target["patient_id"]) & set(holdout["patient_id"])
    assert set(target["label"]) == {"normal", "nodule"}
    assert list(unlabelled.columns) == [c for c in target.columns if c != "label"]
    assert unlabelled["image"].tolist() == target["image"].tolist()
    assert all(p.startswith("target/") for p in target["image"])
    # A different scanner: coarser matrix, wider pixels, more MONOCHROME1 files.
    ds_c = [pydicom.dcmread(with_c.root / p) for p in target["image"]]
    ds_a = pydicom.dcmread(with_c.root / source["image"].iloc[0])
    assert {d.Rows for d in ds_c} == {48} and ds_a.Rows == 64
    assert float(ds_c[0].PixelSpacing[0]) == pytest.approx(64 / 48 * float(ds_a.PixelSpacing[0]))
    assert {d.InstitutionName for d in ds_c} == {"Lakeside Valley Community Hospital"}
    mono1 = sum(d.PhotometricInterpretation == "MONOCHROME1" for d in ds_c)
    assert mono1 == round(0.5 * len(ds_c))
    # Its identifying headers count as PHI for the leak tests, and are new values.
    target_mrns = {d.PatientID for d in ds_c}
    assert target_mrns <= demo_phi_values(with_c)
    assert not target_mrns & {pydicom.dcmread(with_c.root / p).PatientID for p in source["image"]}


def test_site_c_leaves_every_source_output_byte_identical(small_pair):
    with_c, without = small_pair
    a = _digest(with_c.root, skip=("target", "demo_info.json"))
    b = _digest(without.root, skip=("demo_info.json",))
    assert a == b and len(a) > 20
    assert not (without.root / "target").exists() and without.target_manifest_csv is None
    info = json.loads((with_c.root / "demo_info.json").read_text())
    assert info["target_patients"] == 8
    assert "target_patients" not in json.loads((without.root / "demo_info.json").read_text())


def test_demo_refuses_a_one_patient_target_site(tmp_path):
    with pytest.raises(ValueError, match="target_patients=1"):
        make_demo_data(tmp_path, n_patients=4, image_size=32, target_patients=1)


def _three_sites(n: int = 12) -> pd.DataFrame:
    rows = []
    for i in range(n):
        for j in range(1 + i % 3):
            label = "nodule" if i % 4 == 0 else "normal"
            rows.append({"image": f"{i}_{j}", "patient_id": f"P{i:02d}", "label": label})
            rows[-1]["site"] = "abc"[i % 3]
    return pd.DataFrame(rows)


def test_leave_one_site_out_gives_one_fold_per_site(tmp_path):
    df = _three_sites()
    out = make_splits(df, CVConfig(group_by="site", folds=5), seed=0)  # cv.folds ignored
    per_fold = out.groupby("fold")["site"].unique()
    assert sorted(per_fold.index) == [0, 1, 2]
    assert {k: list(v) for k, v in per_fold.items()} == {0: ["a"], 1: ["b"], 2: ["c"]}
    # Saved once and reused; a later run with other patient folds is refused.
    first = make_or_load_splits(df, CVConfig(group_by="site"), tmp_path)
    again = make_or_load_splits(df, CVConfig(group_by="site"), tmp_path)
    assert first["fold"].tolist() == again["fold"].tolist()
    with pytest.raises(ConfigError, match="have 3 folds but cv.folds=5"):
        make_or_load_splits(df, CVConfig(folds=5), tmp_path)


def test_patient_at_two_sites_is_refused_with_the_count():
    df = _three_sites()
    for pid in ("P01", "P04"):  # each has 2 images; move one of them to another site
        i = df.index[df["patient_id"] == pid][0]
        df.loc[i, "site"] = "c"
    with pytest.raises(ManifestError, match=r"2 patient\(s\) appear under more than one 'site'"):
        make_splits(df, CVConfig(group_by="site"))


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda df: df.assign(site="a"), r"needs at least 2 values.*\['a'\]"),
        (lambda df: df.drop(columns="site"), "cv.group_by='site' is not a manifest column"),
        (lambda df: df.assign(fold=0), "gives folds too"),
    ],
)
def test_unusable_group_column_is_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        make_splits(change(_three_sites()), CVConfig(group_by="site"))


def _few_patients_per_site(df: pd.DataFrame, pos: int = 4, neg: int = 5) -> pd.DataFrame:
    """Every image of the first ``pos`` nodule and ``neg`` normal patients of each site."""
    keep: list[str] = []
    for _, site in df.groupby("site"):
        nodule = site.groupby("patient_id")["label"].agg(lambda s: bool((s == "nodule").any()))
        keep += nodule[nodule].index[:pos].tolist() + nodule[~nodule].index[:neg].tolist()
    return df[df["patient_id"].isin(keep)].reset_index(drop=True)


def test_medtl_train_leave_one_site_out_end_to_end(demo_data, tmp_path):
    """`medtl train --set cv.group_by=site` on sites A, B and C: 3 folds, each one site,
    inner selection within the training sites, and a report that says which fold held out
    which site."""
    from medtl.cli import main

    source = pd.read_csv(demo_data.manifest_csv)
    target = pd.read_csv(demo_data.target_manifest_csv)
    both = _few_patients_per_site(pd.concat([source, target], ignore_index=True))
    target = both[both["site"] == "site_c"]
    both["image"] = [str(demo_data.root / p) for p in both["image"]]
    manifest = tmp_path / "three_sites.csv"
    both.to_csv(manifest, index=False)
    sets = [
        "cv.group_by=site",
        "transforms.spatial_size=[32,32]",
        "train.progress=false",
        "tracking.enabled=false",
        "evaluation.bootstrap=50",
        "evaluation.gallery_per_cell=0",
        "data.prepare_workers=0",  # 70 small files: starting decoding processes costs more
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    args = ["train", str(FE), "--manifest", str(manifest), "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(main, args + [a for s in sets for a in ("--set", s)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    run = tmp_path / "run"
    folds = pd.read_csv(run / "fold_assignments.csv").merge(both[["image", "site"]], on="image")
    assert folds.groupby("fold")["site"].nunique().tolist() == [1, 1, 1]
    assert sorted(folds.groupby("site")["fold"].first().tolist()) == [0, 1, 2]
    metrics = json.loads((run / "metrics.json").read_text())
    assert sorted(metrics["folds"]) == ["0", "1", "2"]
    site_c = metrics["subgroups"]["site"]["site_c"]
    assert site_c["n_patients"] == target["patient_id"].nunique()
    assert site_c["summary"]["auroc"]["low"] is not None  # a CI, from the fold that held it out
    report = (run / "report.md").read_text()
    assert "leave-one-site-out cross-validation over 3 site values" in report
    assert "site_c (held out, fold 2)" in report


@pytest.fixture(scope="module")
def source_model(tmp_path_factory):
    """The calibrated site-shift data and the model fine-tuned on its source sites."""
    root = tmp_path_factory.mktemp("shift")
    demo = make_demo_data(root / "demo", **DEMO_ADAPT_DATA)
    return train_source_model(demo, root / "work")


def test_site_c_gap_without_adaptation_and_adabn_raises_it(source_model):
    src = source_model
    # Calibrated (benchmarks/results/site_shift.md, seed 0): source 0.76, site C 0.47, AdaBN 0.71.
    assert src.source_auroc >= 0.7, src.source_auroc  # the source model learned the task
    assert src.target_auroc <= src.source_auroc - 0.1, (src.source_auroc, src.target_auroc)
    after = adabn_target_auroc(src)
    assert after >= src.target_auroc + 0.1, (src.target_auroc, after)
    # AdaBN adapted a copy: the shared source model keeps its own statistics.
    assert src.fresh_model() is not src.model
