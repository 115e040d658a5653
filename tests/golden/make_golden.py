"""Write the reference outputs that pin the train job's behaviour (issue 9's "must hold").

The committed files under ``tests/golden/<case>/`` were written by the code *before* the
train job was split into stages (commit a458b9c), with::

    git worktree add /tmp/ref a458b9c
    cd /tmp && PYTHONPATH=/tmp/ref /path/to/.venv/bin/python /path/to/tests/golden/make_golden.py

``tests/test_golden.py`` runs the same cases with the current code and compares bytes. The one
line it leaves out is metrics.json's ``config_identity``: a hash of the resolved config, which
holds the manifest and cache paths, so it differs between any two runs in different folders.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
FILES = ("oof_predictions.csv", "metrics.json", "fold_assignments.csv")
# The demo data of tests/conftest.py: 40 patients, 96 px, seed 0.
DEMO = {"n_patients": 40, "image_size": 96, "seed": 0}
CASES = {
    "feature_extraction": (
        "pipelines/cxr_2d_feature_extraction.yaml",
        ["transforms.spatial_size=[64,64]", "cv.folds=3", "evaluation.bootstrap=50"],
    ),
    "gradual_unfreeze": (
        "pipelines/cxr_2d_finetune.yaml",
        [
            "transforms.spatial_size=[64,64]",
            "cv.folds=3",
            "evaluation.bootstrap=50",
            "train.epochs=3",
            "train.batch_size=16",
            "data.num_workers=0",
        ],
    ),
}
COMMON = ["train.progress=false", "tracking.enabled=false"]


def run_case(
    name: str, manifest: Path, work: Path, pipelines_root: Path = ROOT, extra: list[str] = ()
) -> Path:
    """Train case ``name`` on ``manifest`` into ``work/name`` and return the run folder
    (``extra``: overrides for config keys the reference commit did not have)."""
    from medtl.config import load_config

    try:
        from medtl.jobs import run_train
    except ImportError:  # the code before the train job was split into stages
        from medtl.pipeline import run_train

    pipeline, overrides = CASES[name]
    cfg = load_config(pipelines_root / pipeline, overrides + COMMON + list(extra))
    cfg.data.cache_dir = str(work / "cache")
    outcome = run_train(cfg, manifest_path=manifest, out_dir=work / name)
    return outcome.run_dir


def main() -> None:
    from medtl.demo_data import make_demo_data

    with tempfile.TemporaryDirectory() as tmp:
        demo = make_demo_data(Path(tmp) / "demo", **DEMO)
        for name in CASES:
            work = Path(tmp) / "work"
            work.mkdir(exist_ok=True)
            run = run_case(name, demo.manifest_csv, work)
            dest = HERE / name
            dest.mkdir(exist_ok=True)
            for f in FILES:
                shutil.copyfile(run / f, dest / f)
            print(f"{name}: wrote {', '.join(FILES)} to {dest}", file=sys.stderr)


if __name__ == "__main__":
    main()
