"""`make demo` / `medtl demo`: build the demo dataset and run the main job on it end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Small enough to finish in a few minutes on a 2-core CPU, large enough to show transfer.
DEMO_OVERRIDES = [
    "transforms.spatial_size=[160,160]",
    "cv.folds=5",
    "evaluation.bootstrap=1000",
]
DEMO_PATIENTS = 80
DEMO_IMAGE_SIZE = 192


def run_demo(
    out: Path,
    pipeline_path: Path,
    overrides: list[str],
    console: Any = None,
    *,
    patients: int | None = None,
    image_size: int | None = None,
) -> Any:
    """Write demo data under ``out/data``, train with ``pipeline_path``, register, and predict.

    ``patients`` and ``image_size`` (default :data:`DEMO_PATIENTS`, :data:`DEMO_IMAGE_SIZE`)
    shrink the demo dataset for a quick smoke run.
    """
    from medtl.config import load_config
    from medtl.demo_data import make_demo_data
    from medtl.inference import predict_for_use
    from medtl.jobs import print_train_summary, run_train
    from medtl.spreadsheet import write_csv

    say = console.print if console is not None else print
    out.mkdir(parents=True, exist_ok=True)
    demo = make_demo_data(
        out / "data",
        n_patients=DEMO_PATIENTS if patients is None else patients,
        image_size=DEMO_IMAGE_SIZE if image_size is None else image_size,
        seed=0,
    )
    say(f"demo data: {demo.root} (manifest {demo.manifest_csv})")
    cfg = load_config(pipeline_path, DEMO_OVERRIDES + list(overrides))
    cfg.data.cache_dir = str(out / ".cache")
    if cfg.tracking.uri is None:
        import os

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            cfg.tracking.uri = f"sqlite:///{(out / 'mlflow.db').resolve()}"
            cfg.tracking.artifact_location = str((out / "mlartifacts").resolve())
    outcome = run_train(
        cfg,
        manifest_path=demo.manifest_csv,
        out_dir=out / "run",
        register_name="medtl-demo-cxr",
        console=console,
    )
    if console is not None:
        print_train_summary(outcome, console)
    # The run's own bundle folder has no review yet: its rows say approved=false.
    preds = predict_for_use(
        str(outcome.bundle_dir), demo.holdout_manifest_csv, allow_unapproved=True
    ).rows
    preds_path = out / "holdout_predictions.csv"
    write_csv(preds, preds_path)  # text cells cannot run as spreadsheet formulas
    say(f"held-out predictions: {preds_path} ({len(preds)} images, unreviewed model)")
    if outcome.bundle_dir is not None:
        _site_shift(outcome.bundle_dir, demo, out, say)
    say("")
    say("[bold]Where to look[/bold]" if console is not None else "Where to look")
    say(f"  report:   {outcome.report_html}")
    if outcome.tracking_uri:
        say(f"  MLflow:   mlflow ui --backend-store-uri {outcome.tracking_uri}")
    if outcome.tracking_uri:
        env = f"MLFLOW_TRACKING_URI={outcome.tracking_uri}"
        # The demo's review key stays in the demo folder, not in the user's ~/.config/medtl.
        say(f"  key:      export MEDTL_AUDIT_KEY_FILE={(out / 'audit.key').resolve()}")
        say(f"  review:   {env} medtl review medtl-demo-cxr 1 --approve --by 'Dr. Reviewer'")
        say(f"  audit:    {env} medtl audit medtl-demo-cxr@approved")
        model = "models:/medtl-demo-cxr@approved"
        say(f"  predict:  {env} medtl predict --model {model} IMAGES --out preds.csv")
    return outcome


def _site_shift(bundle_dir: Path, demo: Any, out: Path, say: Any) -> None:
    """The demo's shifted site C: the model's gap there, and what AdaBN does about it."""
    from medtl.evaluation.report.formatting import format_ci
    from medtl.jobs.adapt import run_adapt

    if demo.target_manifest_csv is None:
        return
    res = run_adapt(
        str(bundle_dir), demo.target_manifest_csv, method="adabn", out_dir=out / "adapt"
    )
    t = res.target
    before, after = t["before"]["summary"]["auroc"], t["after"]["summary"]["auroc"]
    say(
        f"site C (shifted scanner, {t['n_patients']} patients): AUROC {format_ci(before)} "
        f"without adaptation, {format_ci(after)} after AdaBN ({res.run_dir / 'adapt_report.md'})"
    )
