"""Domain adaptation wired into `medtl train` and `medtl adapt` (issue 12).

The method building blocks (AdaBN, reversal, CORAL) are unit-tested in test_adaptation.py and
the gap on the shifted demo site in test_site_shift.py; here the job: a target manifest read
beside the source, refused when it shares patients, used by each method, and scored before and
after with CIs in metrics.json, the report, the bundle's lineage and a registered candidate.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from medtl.config import build_config
from medtl.errors import ConfigError, ManifestError

FAST = [
    "transforms.spatial_size=[48,48]",
    "train.epochs=1",
    "train.batch_size=8",
    "train.progress=false",
    "train.device=cpu",
    "data.num_workers=0",
    "tracking.enabled=false",
    "cv.folds=2",
    "evaluation.bootstrap=100",
    "evaluation.gallery_per_cell=0",
]


def _train(demo, out, method, extra=()):
    from medtl.jobs import run_train

    target = demo.target_manifest_csv
    cfg = build_config(
        {},
        [
            *FAST,
            f"domain_adaptation.method={method}",
            f"domain_adaptation.target_manifest={target}",
            f"data.cache_dir={out.parent / '.cache'}",
            *extra,
        ],
    )
    return run_train(cfg, manifest_path=demo.manifest_csv, out_dir=out)


@pytest.fixture(scope="module")
def adabn_run(demo_data, tmp_path_factory):
    return _train(demo_data, tmp_path_factory.mktemp("da") / "adabn", "adabn")


def test_joint_methods_need_a_strategy_that_trains_the_backbone():
    from medtl.jobs.target import prepare_target

    for method in ("coral", "dann"):
        with pytest.raises(ConfigError) as err:
            build_config(
                {},
                [
                    "strategy.name=feature_extraction",
                    f"domain_adaptation.method={method}",
                    "domain_adaptation.target_manifest=t.csv",
                ],
            )
        msg = str(err.value)
        assert f"'{method}'" in msg and "feature_extraction" in msg
        assert all(s in msg for s in ("fine_tune", "gradual_unfreeze", "lp_ft"))
    with pytest.raises(ConfigError, match="domain_adaptation.target_manifest"):
        prepare_target(build_config({}, ["domain_adaptation.method=adabn"]), None, None, None)
    # the post-hoc methods work with feature extraction too
    build_config(
        {},
        [
            "strategy.name=feature_extraction",
            "domain_adaptation.method=adabn",
            "domain_adaptation.target_manifest=t.csv",
        ],
    )


def test_target_sharing_patients_with_the_source_is_refused(demo_data, tmp_path):
    from medtl.jobs.prepare import read_inputs
    from medtl.jobs.target import read_target_records

    cfg = build_config({}, FAST)
    inputs = read_inputs(cfg, demo_data.manifest_csv)
    source = pd.read_csv(demo_data.manifest_csv)
    target = pd.read_csv(demo_data.target_manifest_csv)
    shared = source[source["patient_id"].isin(source["patient_id"].unique()[:3])]
    mixed = pd.concat([target, shared.assign(site="site_c")])
    # image paths are relative to the manifest's folder: keep the file beside the originals
    path = demo_data.root / "mixed_target.csv"
    mixed.to_csv(path, index=False)
    with pytest.raises(ManifestError, match=r"shares 3 patient\(s\) with the source"):
        read_target_records(cfg, path, inputs.records)
    records, labelled, _ = read_target_records(cfg, demo_data.target_manifest_csv, inputs.records)
    assert labelled and len(records) == len(target)
    records, labelled, _ = read_target_records(cfg, demo_data.target_unlabelled_csv, inputs.records)
    assert not labelled and {r["label"] for r in records} == {-1}


def test_tent_fits_only_batchnorm_affine_and_lowers_target_entropy():
    from medtl.training.adaptation import _entropy, tent

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2),
    )  # fmt: skip
    net.eval()
    batches = [torch.randn(8, 1, 12, 12) * 3 + 2 for _ in range(4)]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        ent0 = float(np.mean([_entropy(net(b), False) for b in batches]))
    tent(net, batches, epochs=5, lr=5e-2)
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {"1.weight", "1.bias", "1.running_mean", "1.running_var"} <= changed
    assert not changed & {"0.weight", "0.bias", "5.weight", "5.bias"}
    assert not net.training and all(p.requires_grad for p in net.parameters())
    with torch.no_grad():
        ent1 = float(np.mean([_entropy(net(b), False) for b in batches]))
    assert ent1 < ent0


def test_train_with_adabn_scores_the_target_before_and_after(adabn_run, demo_data):
    run = adabn_run.run_dir
    metrics = json.loads((run / "metrics.json").read_text())
    t = metrics["target"]
    n_target = len(pd.read_csv(demo_data.target_manifest_csv))
    assert t["method"] == "adabn" and t["labelled"] and t["n_images"] == n_target
    for arm in ("before", "after"):
        auroc = t[arm]["summary"]["auroc"]
        assert auroc["low"] <= auroc["value"] <= auroc["high"]
    assert t["before"]["summary"]["auroc"]["value"] != t["after"]["summary"]["auroc"]["value"]
    diff = t["difference"]
    assert diff["bootstrap_ci"][0] <= diff["auroc_after_minus_before"] <= diff["bootstrap_ci"][1]
    preds = pd.read_csv(run / "target_predictions.csv")
    assert sorted(preds["adaptation"].unique()) == ["after", "before"]
    assert set(preds["patient_id"]).isdisjoint(pd.read_csv(demo_data.manifest_csv)["patient_id"])
    report = (run / "report.md").read_text()
    assert "## Target site" in report and "not validated on the target site" in report
    meta = json.loads((run / "model" / "medtl_model.json").read_text())
    lineage = meta["lineage"]
    assert lineage["medtl.adaptation.method"] == "adabn"
    assert lineage["medtl.adaptation.target_manifest_sha256"] == t["manifest_sha256"]
    assert lineage["medtl.adaptation.target_images"] == str(n_target)


def test_joint_dann_trains_a_domain_classifier_and_compares_with_plain_refit(demo_data, tmp_path):
    out = tmp_path / "dann"
    res = _train(demo_data, out, "dann", ["cv.only_folds=[0]", "cv.selection=fixed"])
    last = torch.load(out / "final" / "last.pt", weights_only=True)
    head = last["strategy"]["domain_head"]
    assert {k for k in head} >= {"0.weight", "2.weight"}
    # the baseline (same recipe without adaptation) trained into its own folder
    plain = torch.load(out / "final_no_adaptation" / "last.pt", weights_only=True)
    assert not plain["strategy"]
    assert not torch.equal(last["model"]["head.fc.weight"], plain["model"]["head.fc.weight"])
    t = res.metrics["target"]
    assert t["method_kind"] == "joint" and {"before", "after", "difference"} <= set(t)


def test_adapt_registers_a_candidate_whose_lineage_names_its_parent(
    adabn_run, demo_data, tmp_path, monkeypatch
):
    from medtl.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    parent = adabn_run.run_dir / "model"
    out = tmp_path / "adapted"
    args = ["adapt", "--model", str(parent), "--target", str(demo_data.target_unlabelled_csv)]
    res = CliRunner().invoke(main, [*args, "--out", str(out), "--register", "demo-site-c"])
    assert res.exit_code == 0, res.output
    assert "registered demo-site-c version 1 (alias: candidate)" in res.output
    assert "not validated on the target site" in (out / "adapt_report.md").read_text()

    import mlflow

    client = mlflow.MlflowClient()
    mv = client.get_model_version_by_alias("demo-site-c", "candidate")
    tags = client.get_run(mv.run_id).data.tags
    target_hash = json.loads((out / "metrics.json").read_text())["target"]["manifest_sha256"]
    assert tags["medtl.adaptation.parent_model"] == str(parent)
    assert tags["medtl.adaptation.target_manifest_sha256"] == target_hash
    assert tags["medtl.adaptation.method"] == "tent"

    from safetensors.torch import load_file

    w0, w1 = load_file(parent / "weights.safetensors"), load_file(out / "model/weights.safetensors")
    changed = {k for k in w0 if not torch.equal(w0[k], w1[k])}
    assert changed and all(".bn" in k or "bn" in k.split(".")[-2] for k in changed), changed


def test_adapt_refuses_a_target_from_the_training_set(adabn_run, demo_data, tmp_path):
    from medtl.cli import main

    parent = adabn_run.run_dir / "model"
    args = ["adapt", "--model", str(parent), "--target", str(demo_data.manifest_csv)]
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "x")])
    assert res.exit_code != 0
    assert "overlaps the model's training set" in res.output
    assert "Traceback" not in res.output


def test_model_card_names_the_target_site_and_its_results(adabn_run):
    from medtl.tracking.model_card import build_model_card

    target = json.loads((adabn_run.run_dir / "metrics.json").read_text())["target"]
    md, html = build_model_card({"name": "m", "target": target, "card": {}})
    assert "## Domain adaptation" in md and target["manifest_sha256"] in md
    assert "not validated on the target site" in md and "Domain adaptation" in html
    md_plain, _ = build_model_card({"name": "m", "card": {}})
    assert "Domain adaptation" not in md_plain
