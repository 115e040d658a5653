"""Registry semantics (aliases, review history, errors that list what exists) and model cards."""

from __future__ import annotations

import pytest
from tracking_helpers import tiny_tracked_run

from medtl.config import TrackingConfig
from medtl.errors import ConfigError, MedtlError
from medtl.tracking.model_card import (
    DEFAULT_INTENDED_USE,
    build_model_card,
    format_metric,
    group_metrics,
)
from medtl.tracking.registry import parse_model_spec, review_history


# ---------------------------------------------------------------- pure helpers
@pytest.mark.parametrize(
    ("flat", "expected"),
    [
        ({"auroc": 0.9, "auroc_ci_low": 0.8, "auroc_ci_high": 0.95},
         {"auroc": {"value": 0.9, "ci_low": 0.8, "ci_high": 0.95}}),
        ({"auroc.value": 0.9, "auroc.ci_low": 0.8, "auroc.ci_high": 0.95, "ece": 0.02},
         {"auroc": {"value": 0.9, "ci_low": 0.8, "ci_high": 0.95}, "ece": {"value": 0.02, "ci_low": None, "ci_high": None}}),
        ({"sens.lower": 0.6, "sens.upper": 0.9}, {"sens": {"value": None, "ci_low": 0.6, "ci_high": 0.9}}),
    ],
)  # fmt: skip
def test_group_metrics(flat, expected):
    assert group_metrics(flat) == expected


def test_format_metric():
    assert (
        format_metric({"value": 0.91234, "ci_low": 0.8, "ci_high": 0.95})
        == "0.912 (0.800 to 0.950)"
    )
    assert format_metric({"value": 0.5}) == "0.500"


@pytest.mark.parametrize(
    ("spec", "parts"),
    [
        ("m", ("m", None, None)),
        ("m@approved", ("m", "approved", None)),
        ("models:/m/3", ("m", None, "3")),
    ],
)
def test_parse_model_spec(spec, parts):
    assert parse_model_spec(spec) == parts


def test_review_history_orders_entries():
    tags = {
        "medtl.review.2.decision": "reject",
        "medtl.review.10.by": "c",
        "medtl.review.1.by": "a",
        "other": "x",
    }
    assert [e["n"] for e in review_history(tags)] == [1, 2, 10]


def test_model_card_sections_and_escaping():
    info = {
        "name": "cxr<script>",
        "version": "3",
        "task": "binary",
        "classes": ["normal", "effusion"],
        "data": {"images": "120", "patients": "40", "class_counts": {"effusion": 50, "normal": 70}},
        "metrics": {"auroc": {"value": 0.9, "ci_low": 0.8, "ci_high": 0.95}},
        "subgroups": {"site": {"A": {"auroc": 0.88, "auroc_ci_low": 0.7, "auroc_ci_high": 0.96}}},
        "threshold": 0.37,
        "threshold_method": "youden",
        "lineage": {"medtl.manifest_hash": "abc"},
    }
    md, html = build_model_card(info)
    for section in ("Intended use", "Training data", "Performance", "Subgroup results",
                    "Operating threshold", "Limitations", "Lineage"):  # fmt: skip
        assert f"## {section}" in md and f"<h2>{section}</h2>" in html
    assert DEFAULT_INTENDED_USE in md and "not for autonomous diagnosis" in html
    assert "| site | A | auroc | 0.880 (0.700 to 0.960) |" in md
    assert "images labelled effusion | 50" in md and "'youden' rule" in md
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<link" not in html and "src=" not in html  # self-contained
    md2, _ = build_model_card({**info, "intended_use": "Triage research only.", "subgroups": None})
    assert "Triage research only." in md2 and "No subgroup results" in md2


# ---------------------------------------------------------------- against a SQLite store
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry_store")
    tcfg = TrackingConfig(uri=f"sqlite:///{root / 'mlflow.db'}", experiment="medtl-registry")
    tracker, run_dir, _, _ = tiny_tracked_run(tcfg, root, n_folds=2)
    return {"tcfg": tcfg, "run_id": tracker.parent_run_id, "run_dir": run_dir, "tracker": tracker}


def test_review_moves_aliases_and_keeps_history(store):
    from medtl.tracking.registry import audit, register, review
    from medtl.tracking.store import make_client

    tcfg = store["tcfg"]
    v1 = register(store["run_id"], "reg-model", tcfg)["version"]
    v2 = register(store["run_dir"], "reg-model", tcfg)["version"]
    assert (v1, v2) == ("1", "2")
    client = make_client(tcfg.uri)
    assert client.get_registered_model("reg-model").aliases == {"candidate": 2}

    review("reg-model", v1, "approve", "reviewer A", "first look", tcfg)
    review("reg-model", v2, "approve", "reviewer B", "", tcfg)
    assert client.get_registered_model("reg-model").aliases["approved"] == 2
    entry = review("reg-model", v2, "reject", "reviewer C", "drift on site B", tcfg)
    # The third record of the model's chain, the second on v2.
    assert entry["seq"] == 3 and entry["at"].endswith("+00:00")
    assert "approved" not in client.get_registered_model("reg-model").aliases
    review("reg-model", v1, "reject", "reviewer D", "", tcfg)  # approved was not v1: nothing moves

    info = audit("reg-model/2", tcfg)
    assert [(r["seq"], r["decision"], r["by"]) for r in info["reviews"]] == [
        (2, "approve", "reviewer B"), (3, "reject", "reviewer C")
    ]  # fmt: skip
    assert info["ok"], info["integrity"]["breaks"]
    assert info["model"]["status"] == "rejected"
    assert [v["version"] for v in info["versions"]] == ["1", "2"]
    assert audit("reg-model", tcfg)["model"]["version"] == "2"  # no approved alias: newest
    assert audit("reg-model@candidate", tcfg)["model"]["aliases"] == ["candidate"]

    mv = client.get_model_version("reg-model", "1")
    assert mv.tags["medtl.metric.auroc"] == "0.9100 (0.8200 to 0.9700)"
    assert (
        mv.tags["medtl.manifest_hash"] == "f" * 64 and "Pending clinical review" in mv.description
    )
    card = client.list_artifacts(store["run_id"], "model_card")
    assert {f.path for f in card} >= {"model_card/reg-model-v1.md", "model_card/reg-model-v1.html"}


def test_errors_name_the_value_and_list_valid_ones(store):
    from medtl.inference import resolve_model
    from medtl.tracking.registry import audit, register, review
    from medtl.tracking.store import make_client

    tcfg = store["tcfg"]
    register(store["run_id"], "err-model", tcfg)
    with pytest.raises(ConfigError, match="Did you mean 'approve'"):
        review("err-model", "1", "aprove", "x", "", tcfg)
    with pytest.raises(MedtlError, match="Valid versions: 1"):
        review("err-model", "7", "approve", "x", "", tcfg)
    with pytest.raises(ConfigError, match="Valid aliases: candidate"):
        audit("err-model@approved", tcfg)
    with pytest.raises(ConfigError, match="Valid aliases: candidate"):
        resolve_model("models:/err-model@approved", tcfg)
    with pytest.raises(MedtlError, match="no registered model 'nope'"):
        audit("nope", tcfg)
    with pytest.raises(ConfigError, match="models:/NAME@ALIAS"):
        resolve_model("not-a-model", tcfg)

    client = make_client(tcfg.uri)
    bare = client.create_run(store["tracker"].experiment_id, run_name="no-model")
    with pytest.raises(MedtlError, match="no logged model"):
        register(bare.info.run_id, "err-model", tcfg)
