"""The README cannot drift from the code: its quick start runs as written on the demo data
(with the fast settings of the other end-to-end tests), every command exits 0 and every
output it names exists."""

from __future__ import annotations

import pandas as pd
import pytest
from readme_quickstart import quickstart_commands, quickstart_section, run_quickstart

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    return run_quickstart(tmp_path_factory.getbasetemp())


def test_quickstart_block_is_found_and_covers_the_main_job():
    verbs = [cmd[1] for cmd in quickstart_commands(quickstart_section())]
    assert verbs[0] == "demo-data"
    for verb in ("train", "register", "review", "audit", "predict"):
        assert verb in verbs, verbs


def test_every_quickstart_command_exits_zero(quickstart):
    ran = [cmd for cmd, _ in quickstart.steps]
    assert ran == quickstart_commands(quickstart_section())  # none was left out
    for cmd, p in quickstart.steps:
        assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    assert all("Traceback" not in p.stderr for _, p in quickstart.steps)


def test_every_output_the_readme_names_exists(quickstart):
    assert len(quickstart.outputs) >= 5, quickstart.outputs
    missing = [o for o in quickstart.outputs if not quickstart.path(o).exists()]
    assert missing == [], missing


def test_quickstart_results_are_what_the_readme_says(quickstart):
    steps = {cmd[1]: p for cmd, p in quickstart.steps}
    assert "approved" in steps["audit"].stdout and "Dr. A. Radiologist" in steps["audit"].stdout
    preds = pd.read_csv(quickstart.path("preds.csv"))
    holdout = pd.read_csv(quickstart.path("data/holdout_manifest.csv"))
    assert len(preds) == len(holdout) and preds["error"].isna().all()
    assert set(preds["approved"].astype(str).str.lower()) == {"true"}
