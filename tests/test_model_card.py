"""The model card from the user: a pipeline's ``card:`` section and ``medtl register --card``
reach the registered card, every item nobody supplied is listed as not yet known, and an
unknown key is refused by name. The numbers come from the run (TRIPOD+AI items)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tracking_helpers
import yaml

from medtl.config import CardConfig, TrackingConfig, build_config, load_card
from medtl.errors import ConfigError
from medtl.tracking.model_card import CARD_ITEMS, build_model_card, not_yet_known

ROOT = Path(__file__).parent.parent
PIPELINE_CARD = {
    "intended_use": "Flags frontal chest radiographs with a suspected nodule for priority reading.",
    "target_population": "Adults with a frontal chest radiograph at sites A and B.",
    "known_limitations": ["Two sites only."],
}


def _medtl(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medtl.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


def _card_md(tcfg: TrackingConfig, name: str, version: str) -> str:
    """The registered version's Markdown card, read back through the store."""
    import mlflow

    from medtl.tracking.store import make_client

    tag = make_client(tcfg.uri).get_model_version(name, version).tags["medtl.model_card"]
    return Path(
        mlflow.artifacts.download_artifacts(
            tag.removesuffix(".html") + ".md", tracking_uri=tcfg.uri
        )
    ).read_text()


def _section(md: str, head: str) -> str:
    return md.split(f"## {head}\n", 1)[1].split("\n## ", 1)[0]


@pytest.fixture(scope="module")
def carded_run(tmp_path_factory):
    """A tiny tracked run whose pipeline has a ``card:`` section (SQLite store)."""
    root = tmp_path_factory.mktemp("card_store")
    tcfg = TrackingConfig(uri=f"sqlite:///{root / 'mlflow.db'}", experiment="medtl-card")
    plain = tracking_helpers.tiny_cfg

    def with_card(*args, **kwargs):
        cfg = plain(*args, **kwargs)
        cfg.card = CardConfig(**PIPELINE_CARD)
        return cfg

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tracking_helpers, "tiny_cfg", with_card)
        tracker, run_dir, _, _ = tracking_helpers.tiny_tracked_run(tcfg, root, n_folds=2)
    return {"tcfg": tcfg, "run_id": tracker.parent_run_id, "run_dir": run_dir, "root": root}


def test_pipeline_card_reaches_the_registered_card_and_gaps_say_not_yet_known(carded_run):
    from medtl.tracking.registry import register

    tcfg = carded_run["tcfg"]
    res = register(carded_run["run_id"], "card-pipeline", tcfg)
    md = _card_md(tcfg, "card-pipeline", res["version"])
    assert PIPELINE_CARD["intended_use"] in _section(md, "Intended use")
    assert PIPELINE_CARD["target_population"] in _section(md, "Intended use")
    assert "- Two sites only." in _section(md, "Limitations")
    gaps = _section(md, "Not yet known")
    for supplied in ("intended use", "target population", "known limitations"):
        assert f"- {supplied}\n" not in gaps
    for missing in ("data sources", "data collection dates", "outcome definition", "contact"):
        assert f"- {missing}\n" in gaps
    assert "Not yet known: data sources." in _section(md, "Data sources and dates")
    assert "Not yet known: outcome definition." in _section(md, "Outcome")
    # The run's own numbers: the pooled AUROC with its CI, the subgroup with its CI.
    assert "| auroc | 0.910 (0.820 to 0.970) |" in md
    assert "| site | A | auroc | 0.900 (0.800 to 0.950) |" in _section(md, "Subgroup results")


def test_register_card_file_replaces_pipeline_items_one_by_one(carded_run, tmp_path):
    card_file = tmp_path / "card.yaml"
    card_file.write_text(
        yaml.safe_dump(
            {
                "intended_use": "Research use on retrospective radiographs only.",
                "data_sources": ["Site A PACS export", "Site B PACS export"],
                "data_dates": "2019-01 to 2022-12",
            }
        )
    )
    env = {"MLFLOW_TRACKING_URI": carded_run["tcfg"].uri}
    args = ["register", str(carded_run["run_dir"]), "--name", "card-file"]
    p = _medtl(*args, "--card", str(card_file), env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    md = _card_md(carded_run["tcfg"], "card-file", "1")
    use = _section(md, "Intended use")
    assert "Research use on retrospective radiographs only." in use
    assert PIPELINE_CARD["intended_use"] not in md  # the file's item replaced the pipeline's
    assert PIPELINE_CARD["target_population"] in use  # the pipeline's other items stay
    sources = _section(md, "Data sources and dates")
    assert "- Site B PACS export" in sources and "2019-01 to 2022-12" in sources
    assert "- data sources\n" not in _section(md, "Not yet known")


def test_unknown_card_key_is_refused_by_name(carded_run, tmp_path):
    bad = tmp_path / "bad_card.yaml"
    bad.write_text("intended_usage: triage\ncontact: me\n")
    env = {"MLFLOW_TRACKING_URI": carded_run["tcfg"].uri}
    p = _medtl("register", str(carded_run["run_dir"]), "--name", "card-bad", "--card", str(bad), env=env)  # fmt: skip
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "'intended_usage'" in p.stderr and "Did you mean 'intended_use'" in p.stderr
    from medtl.tracking.store import make_client

    assert not make_client(carded_run["tcfg"].uri).search_registered_models("name = 'card-bad'")
    with pytest.raises(
        ConfigError, match=r"'card\.audience'.*Valid keys here: .*card\.intended_use"
    ):
        build_config({"card": {"audience": "radiologists"}})


def test_example_card_file_supplies_every_item(tmp_path):
    card = load_card(ROOT / "pipelines" / "cards" / "cxr_nodule_card.yaml")
    assert not_yet_known(card.model_dump()) == []
    nested = tmp_path / "nested.yaml"  # the same keys also load under `card:` (from a pipeline)
    nested.write_text("card:\n  contact: QA board\n")
    assert load_card(nested).contact == "QA board"


def test_card_covers_tripod_items_from_run_facts():
    """Counts, quarantine, discrimination and calibration with CIs, from metrics.json shapes."""
    info = {
        "name": "m",
        "card": {},
        "participants": {"patients": 40, "images": 120, "sites": {"A": 70, "B": 50}},
        "quarantine": {"n": 3, "listed": 123, "by": {"site": {"B": {"quarantined": 3, "total": 53}}}},
        "performance": {
            "auroc": {"value": 0.81, "ci_low": 0.7, "ci_high": 0.9},
            "ece": {"value": 0.05, "ci_low": 0.02, "ci_high": 0.09},
        },
        "subgroups": {
            "site": {
                "B": {"n": 50, "n_patients": 17, "summary": {"auroc": {"value": 0.7, "low": 0.5, "high": 0.85}}}
            }
        },
    }  # fmt: skip
    md, html = build_model_card(info)
    assert "3 of 123 listed images could not be read" in md
    assert "| site | B | 3 of 53 |" in md
    assert "| auroc | 0.810 (0.700 to 0.900) |" in _section(md, "Performance")
    assert "| ece | 0.050 (0.020 to 0.090) |" in _section(md, "Performance")
    assert "| site | B (50 images, 17 patients) | auroc | 0.700 (0.500 to 0.850) |" in md
    assert "| images from site B | 50 |" in md
    gaps = _section(md, "Not yet known")
    assert all(f"- {label}\n" in gaps for label in CARD_ITEMS.values())
    assert "src=" not in html and "<script" not in html
