"""Few-shot: patient-level episodes, the two classifiers, episodic evaluation against a randomly
initialised backbone, and the support/query model as an ordinary bundle (predict, register,
review) — on the real demo DICOM files through the real data, model and feature-cache stages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from medtl.config import TrackingConfig, build_config
from medtl.errors import ConfigError
from medtl.fewshot import (
    patient_table,
    run_fewshot_episodes,
    run_fewshot_fit,
    sample_episodes,
)
from medtl.fewshot.classifiers import fit_logistic_head, fit_prototypes, l2_normalize
from medtl.fewshot.episodes import check_shots, patient_class
from medtl.fewshot.job import check_disjoint

ROOT = Path(__file__).resolve().parent.parent
FAST = {
    "strategy": {"name": "few_shot"},
    # prepare_workers=0: ~100 tiny images decode faster in-process than a worker pool starts
    "data": {"positive_class": "nodule", "num_workers": 0, "prepare_workers": 0},
    # 128 px: the transfer effect is clear at k=1 there (64 and 96 px halve the margin).
    "transforms": {"spatial_size": [128, 128], "augment": "none"},
    "train": {"device": "cpu", "progress": False},
    "evaluation": {"bootstrap": 200, "subgroups": ["site"]},
    "tracking": {"enabled": False},
}


def _patients_per_class(manifest_csv) -> dict[str, int]:
    """Patients per class by the documented rule (majority label, ties to nodule)."""
    m = pd.read_csv(manifest_csv)
    nodule = m.groupby("patient_id")["label"].agg(lambda s: (s == "nodule").mean() >= 0.5)
    return {"normal": int((~nodule).sum()), "nodule": int(nodule.sum())}


def _cfg(cache, overrides=()):
    cfg = build_config(FAST, list(overrides))
    cfg.data.cache_dir = str(cache)
    return cfg


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("fewshot_cache")


@pytest.fixture(scope="module")
def episodic(demo_data, cache, tmp_path_factory):
    """Both classifiers at k = 1 and 5 over 100 episodes (embeddings computed once, cached)."""
    out = {}
    for name in ("logistic", "prototype"):
        cfg = _cfg(cache, [f"strategy.fewshot_classifier={name}"])
        out[name] = run_fewshot_episodes(
            cfg,
            demo_data.manifest_csv,
            tmp_path_factory.mktemp(f"episodic_{name}"),
            shots=[1, 5],
            episodes=100,
        )
    return out


@pytest.mark.parametrize("classifier", ["logistic", "prototype"])
def test_few_shot_beats_chance_and_the_random_backbone(demo_data, episodic, classifier):
    res = episodic[classifier].result
    for k in (1, 5):
        pre, rnd = res.row("pretrained", k), res.row("random_init", k)
        assert pre.episodes == rnd.episodes == 100 and pre.auroc.n == 100
        assert pre.auroc.low > 0.5, (k, pre.auroc)
        assert pre.auroc.low > rnd.auroc.mean, (k, pre.auroc, rnd.auroc)
        assert res.row("pretrained - random_init", k).auroc.low > 0  # paired, same episodes
    rows = pd.read_csv(episodic[classifier].out_dir / "episodes.csv")
    assert len(rows) == 2 * 2 * 100  # variants x k x episodes
    written = json.loads(episodic[classifier].json_path.read_text())
    assert written["patients_per_class"] == _patients_per_class(demo_data.manifest_csv)
    assert "| pretrained | 5 | 100 |" in episodic[classifier].md_path.read_text()


def test_more_shots_score_higher_with_the_logistic_head(episodic):
    res = episodic["logistic"].result
    assert res.row("pretrained", 5).auroc.low > res.row("pretrained", 1).auroc.high


def _random_table(rng, n_patients, n_classes):
    """Patients with 1-4 images whose labels are mostly, not always, the patient's class."""
    pids, labels = [], []
    for p in range(n_patients):
        c = p % n_classes
        for _ in range(rng.integers(1, 5)):
            labels.append(c if rng.random() < 0.8 else int(rng.integers(n_classes)))
            pids.append(f"P{p:03d}")
    order = rng.permutation(len(pids))  # manifest order unrelated to patients
    return np.array(pids)[order], np.array(labels)[order]


@pytest.mark.parametrize("n_way, n_query", [(None, None), (2, None), (None, 1), (2, 2)])
def test_episodes_never_put_a_patient_in_support_and_query(n_way, n_query):
    names = ["a", "b", "c"]
    for seed in range(60):
        rng = np.random.default_rng(seed)
        pids, labels = _random_table(rng, 24, 3)
        table = patient_table(pids, labels)
        k = int(rng.integers(1, 4))
        for ep in sample_episodes(table, names, k, 5, seed, n_way, n_query):
            sup, qry = set(ep.support_patients), set(ep.query_patients)
            assert not sup & qry
            assert not set(pids[ep.support_rows]) & set(pids[ep.query_rows])
            assert set(pids[ep.support_rows]) == sup and set(pids[ep.query_rows]) == qry
            assert len(ep.classes) == (n_way or 3)
            cls = dict(zip(table.patients, table.classes, strict=True))
            for c in ep.classes:  # k shots per class; the query: the rest (or n_query)
                assert sum(cls[p] == c for p in sup) == k
                rest = (table.classes == c).sum() - k
                assert sum(cls[p] == c for p in qry) == (rest if n_query is None else n_query)


def test_episodes_repeat_for_a_seed_and_differ_for_another():
    pids, labels = _random_table(np.random.default_rng(0), 20, 2)
    table = patient_table(pids, labels)
    a = sample_episodes(table, ["x", "y"], 2, 10, seed=1)
    b = sample_episodes(table, ["x", "y"], 2, 10, seed=1)
    c = sample_episodes(table, ["x", "y"], 2, 10, seed=2)
    assert [e.support_patients for e in a] == [e.support_patients for e in b]
    assert [e.support_patients for e in a] != [e.support_patients for e in c]


def test_a_patient_counts_for_its_majority_class_ties_to_the_later_one():
    assert patient_class([0, 1, 1]) == 1
    assert patient_class([0, 0, 1]) == 0
    assert patient_class([0, 1]) == 1  # binary: a nodule and a normal study = nodule patient


def test_too_few_patients_for_k_names_the_class_and_counts(demo_data, cache, tmp_path):
    pids = [f"P{i}" for i in range(9)]
    uneven = patient_table(pids, [0, 0, 0, 0, 0, 1, 1, 1, 2])
    with pytest.raises(ConfigError, match=r"class 'b' has 3; class 'c' has 1 .*c=1; add patients"):
        check_shots(uneven, ["a", "b", "c"], 3)
    even = patient_table(pids, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    with pytest.raises(ConfigError, match=r"a=3, b=3, c=3; use at most 2 shots"):
        check_shots(even, ["a", "b", "c"], 3)
    n = _patients_per_class(demo_data.manifest_csv)["nodule"]
    with pytest.raises(ConfigError, match=rf"class 'nodule' has {n} patient.*nodule={n}"):
        run_fewshot_episodes(_cfg(cache), demo_data.manifest_csv, tmp_path, shots=[1, n + 1])
    assert not (tmp_path / "fewshot.json").exists()  # refused before any embedding


def test_prototype_classifier_equals_easyfsl_simpleshot():
    """Reference: easyfsl's SimpleShot with L2 feature normalisation (same prototypes, same
    cosine similarity), on the same support and query."""
    easyfsl = pytest.importorskip("easyfsl.methods")
    rng = np.random.default_rng(0)
    xs, ys = rng.normal(size=(12, 32)) + 1.0, np.repeat([0, 1, 2], 4)
    xq = rng.normal(size=(9, 32)) + 1.0
    ref = easyfsl.SimpleShot(feature_normalization=2)
    ref.process_support_set(torch.tensor(xs), torch.tensor(ys))
    expected = ref(torch.tensor(xq)).numpy()
    head = fit_prototypes(xs, ys, 3, scale=10.0)
    np.testing.assert_allclose(head.logits(xq), 10.0 * expected, atol=1e-5)


def test_logistic_head_in_the_support_span_is_the_full_fit():
    from medtl.training.features import fit_logistic

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(14, 300)) + 2, np.repeat([0, 1], 7)
    x[y == 1, :4] += 1.5
    head = fit_logistic_head(x, y, 2, c=0.01, seed=0)
    w, b = fit_logistic(l2_normalize(x), y, "binary", 2, 0.01, True, 0)
    q = rng.normal(size=(10, 300)) + 2
    full = l2_normalize(q) @ w.T.astype(float) + b
    np.testing.assert_allclose(head.logits(q), full, atol=1e-3)


def test_cosine_head_is_scaled_cosine_similarity_with_a_linear_state_dict():
    from medtl.models.heads import build_head

    protos = np.random.default_rng(0).normal(size=(2, 16))
    head = build_head(16, 2, "cosine")
    assert set(head.state_dict()) == set(build_head(16, 2, "linear").state_dict())
    with torch.no_grad():
        head.fc.weight.copy_(torch.tensor(5.0 * l2_normalize(protos)))
        head.fc.bias.zero_()
    f = torch.randn(4, 16) * 7
    cos = torch.nn.functional.cosine_similarity(f[:, None], torch.tensor(protos)[None], dim=2)
    torch.testing.assert_close(head(f), 5.0 * cos.float(), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- support / query model
def _split_manifest(demo_data, tmp_path, n_per_class=3):
    """Support: the first ``n_per_class`` patients of each class; query: every other patient
    (absolute image paths, so the CSVs live outside the demo folder)."""
    m = pd.read_csv(demo_data.manifest_csv)
    m["image"] = [str(demo_data.manifest_csv.parent / p) for p in m["image"]]
    nodule = m.groupby("patient_id")["label"].agg(lambda s: (s == "nodule").mean() >= 0.5)
    support = [*nodule[nodule].index[:n_per_class], *nodule[~nodule].index[:n_per_class]]
    s, q = tmp_path / "support.csv", tmp_path / "query.csv"
    m[m["patient_id"].isin(support)].to_csv(s, index=False)
    m[~m["patient_id"].isin(support)].to_csv(q, index=False)
    return s, q


@pytest.fixture(scope="module")
def fitted(demo_data, cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("fewshot_fit")
    s, q = _split_manifest(demo_data, root)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = _cfg(cache, ["tracking.enabled=true", f"tracking.uri={uri}"])
    return run_fewshot_fit(cfg, s, q, root / "out"), q, TrackingConfig(uri=uri)


def test_support_query_model_is_a_normal_bundle(fitted):
    from medtl.bundle import read_bundle_meta

    fit, _, _ = fitted
    meta = read_bundle_meta(fit.bundle_dir)
    assert meta["model"]["head"] == "cosine" and meta["config"]["strategy"]["name"] == "few_shot"
    assert meta["training_set"]["n_patients"] == 6  # fingerprint of the support patients only
    assert meta["calibration"] is None and meta["threshold"] == 0.5


def test_registered_reviewed_model_predicts_what_the_job_reported(fitted, tmp_path, monkeypatch):
    """register -> review (approve) -> `medtl predict --model models:/NAME@approved`: the
    registry's copy of the bundle gives the job's own query probabilities."""
    from sklearn.metrics import roc_auc_score

    from medtl.cli import main
    from medtl.tracking.registry import register, review

    fit, query_csv, tcfg = fitted
    assert register(fit.out_dir, "fewshot-nodule", tcfg)["version"] == "1"
    review("fewshot-nodule", "1", "approve", "Dr. Test", "few-shot pilot", tcfg)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(tcfg.uri))
    out = tmp_path / "preds.csv"
    args = [
        "predict",
        "--model",
        "models:/fewshot-nodule@approved",
        str(query_csv),
        "--out",
        str(out),
    ]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    preds = pd.read_csv(out)
    np.testing.assert_allclose(preds["prob_nodule"], fit.query_probs[:, 1], atol=1e-4)
    labels = pd.read_csv(query_csv)["label"].eq("nodule")
    auroc = roc_auc_score(labels, preds["prob_nodule"])
    assert auroc > 0.5 and fit.headline["auroc"] == pytest.approx(auroc)
    assert (preds["pred"] == np.where(preds["prob_nodule"] >= 0.5, "nodule", "normal")).all()


def test_support_and_query_sharing_a_patient_is_refused(demo_data, cache, tmp_path):
    s, _ = _split_manifest(demo_data, tmp_path)
    with pytest.raises(ConfigError, match="6 patient.*both the support and the query"):
        run_fewshot_fit(_cfg(cache), s, s, tmp_path / "out")
    rec = [{"patient_id": "A", "image": "a.dcm"}]
    with pytest.raises(ConfigError, match="image file"):
        check_disjoint(rec, [{"patient_id": "B", "image": "a.dcm"}])


def test_cli_fewshot_episodic_mode_and_train_refusal(demo_data, cache, tmp_path, episodic):
    from medtl.cli import main

    sets = [f"--set={k}" for k in ("transforms.spatial_size=[128,128]", "transforms.augment=none",
            "train.device=cpu", "train.progress=false", "data.num_workers=0",
            "data.positive_class=nodule", f"data.cache_dir={cache}")]  # fmt: skip
    res = CliRunner().invoke(
        main,
        ["fewshot", "--manifest", str(demo_data.manifest_csv), "--shots", "1", "--episodes",
         "20", "--classifier", "prototype", "--out", str(tmp_path / "ep"), *sets],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "ep" / "fewshot.json").read_text())["rows"]
    assert [(r["variant"], r["k_shot"], r["episodes"]) for r in rows][:2] == [
        ("pretrained", 1, 20), ("random_init", 1, 20)
    ]  # fmt: skip
    assert "pretrained" in res.output
    res = CliRunner().invoke(main, ["fewshot", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--support S.csv --query Q.csv" in res.output
    train = CliRunner().invoke(
        main,
        [
            "train",
            str(ROOT / "pipelines/cxr_2d_fewshot.yaml"),
            "--manifest",
            str(demo_data.manifest_csv),
        ],
    )
    assert train.exit_code == 2 and "medtl fewshot --pipeline" in train.output
