"""The staged train job gives byte-identical outputs to the code before it was split (a458b9c).

The reference files were written by ``tests/golden/make_golden.py`` run against that commit
(see its docstring); this test runs the same cases on the same demo data with today's code.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "golden"))
from make_golden import CASES, DEMO, FILES, run_case  # noqa: E402

GOLDEN = Path(__file__).parent / "golden"
IDENTITY = re.compile(rb'\n\s*"config_identity": "[0-9a-f]+"')


@pytest.fixture(scope="module")
def golden_demo(tmp_path_factory):
    """Its own copy, so no other test's files can reach the reference run."""
    from medtl.demo_data import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("golden_demo"), **DEMO)


@pytest.mark.parametrize("case", sorted(CASES))
def test_train_outputs_match_reference(case, golden_demo, tmp_path):
    run = run_case(case, golden_demo.manifest_csv, tmp_path)
    for name in FILES:
        got, want = (run / name).read_bytes(), (GOLDEN / case / name).read_bytes()
        if name == "metrics.json":  # a hash over this machine's paths (see make_golden.py)
            got, want = IDENTITY.sub(b"", got), IDENTITY.sub(b"", want)
        assert got == want, f"{case}/{name} differs from the reference written at a458b9c"
