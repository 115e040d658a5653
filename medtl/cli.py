"""`medtl` command line: one thin command per verb over the typed API of each stage.

Heavy libraries (torch, MONAI, MLflow) are imported inside commands so `medtl --help` is fast.
Errors that medtl explains (MedtlError) print as one line and exit with status 2.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import click

# Offline by default: no telemetry, no hub downloads (set before any library is imported).
for _k, _v in {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}.items():
    os.environ.setdefault(_k, _v)


def _console():
    from rich.console import Console

    # Not a terminal (CI logs, pipes): wide enough that tables are not truncated.
    return Console(stderr=False, highlight=False, width=None if sys.stdout.isatty() else 200)


def _friendly(fn):
    """Turn MedtlError into a one-line message and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from medtl.errors import MedtlError

        try:
            return fn(*args, **kwargs)
        except MedtlError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)

    return wrapper


_MODEL_OPTION = click.option(
    "--model",
    "model_ref",
    required=True,
    help="models:/NAME@ALIAS, models:/NAME/V or a bundle dir.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="medtl")
def main() -> None:
    """medtl: transfer learning for medical image classification."""


# ---------------------------------------------------------------- inspect
@main.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--png", "png", type=click.Path(), help="Write an 8-bit preview PNG here.")
@_friendly
def inspect(path: str, as_json: bool, png: str | None) -> None:
    """Show what the pipeline reads from one image file or DICOM series folder."""
    from medtl.inspect import inspect_path, write_preview
    from medtl.io import load_image

    image = load_image(path)  # decoded once, for the table and the preview
    info = inspect_path(path, image)
    if png:
        write_preview(image, png)
        info["preview"] = png
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    from rich.table import Table

    table = Table(title=f"medtl inspect: {path}", show_header=False)
    for k, v in info.items():
        table.add_row(str(k), str(v))
    _console().print(table)


# ---------------------------------------------------------------- manifests
@main.group()
def manifest() -> None:
    """Validate manifests and build them from hospital DICOM exports."""


@manifest.command("validate")
@click.argument("path", type=click.Path())
@click.option("--deep", is_flag=True, help="Decode every image (slow, finds corrupt files).")
@click.option("--classes", help="Comma-separated allowed labels.")
@click.option("--json", "as_json", is_flag=True)
@_friendly
def manifest_validate(path: str, deep: bool, classes: str | None, as_json: bool) -> None:
    """Check files, labels, duplicates and patients; print a summary and the content hash."""
    from medtl.manifest import read_manifest, render_summary, validate_manifest

    m = read_manifest(path)
    report = validate_manifest(
        m, deep=deep, classes=classes.split(",") if classes else None, progress=True
    )
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        con = _console()
        con.print(render_summary(report))
        for w in report.warnings:
            con.print(f"[yellow]warning:[/yellow] {w}")
        for e in report.errors:
            con.print(f"[red]error:[/red] {e}")
        con.print(f"content hash: {report.content_hash}")
    if not report.ok:
        sys.exit(1)


@manifest.command("scan")
@click.argument("dicom_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--labels", "labels_csv", required=True, type=click.Path(exists=True))
@click.option(
    "--key",
    default="AccessionNumber",
    show_default=True,
    help="DICOM attribute joined to the labels CSV column of the same name.",
)
@click.option("--out", required=True, type=click.Path())
@click.option(
    "--keep-ids", is_flag=True, help="Keep real patient IDs (default: salted pseudonyms)."
)
@_friendly
def manifest_scan(dicom_dir: str, labels_csv: str, key: str, out: str, keep_ids: bool) -> None:
    """Walk a DICOM export (headers only), join labels, and write a pseudonymised manifest."""
    from medtl.manifest import scan_dicom_dir

    res = scan_dicom_dir(dicom_dir, labels_csv, key=key, out=out, keep_ids=keep_ids)
    click.echo(res.summary() if hasattr(res, "summary") else str(res))


# ---------------------------------------------------------------- demo
@main.command("demo-data")
@click.argument("out", type=click.Path())
@click.option("--patients", default=60, show_default=True)
@click.option("--size", default=128, show_default=True, help="Image side in pixels.")
@click.option("--seed", default=0, show_default=True)
@_friendly
def demo_data(out: str, patients: int, size: int, seed: int) -> None:
    """Write the built-in demo dataset (DICOM radiographs, NIfTI volumes, manifests)."""
    from medtl.demo_data import make_demo_data

    demo = make_demo_data(out, n_patients=patients, image_size=size, seed=seed)
    click.echo(f"demo data written to {demo.root}")
    click.echo(f"  2D manifest: {demo.manifest_csv}")
    click.echo(f"  3D manifest: {demo.manifest_3d_csv}")
    click.echo(f"  held-out manifest: {demo.holdout_manifest_csv}")


@main.command()
@click.option("--out", default="demo_run", show_default=True, type=click.Path())
@click.option(
    "--pipeline",
    "pipeline_path",
    default="pipelines/cxr_2d_finetune.yaml",
    show_default=True,
    type=click.Path(),
)
@click.option("--set", "overrides", multiple=True, help="Override a config key: key=value.")
@click.option("--patients", type=click.IntRange(min=2), help="Fewer demo patients (smoke runs).")
@click.option("--size", type=click.IntRange(min=32), help="Smaller demo images, side in pixels.")
@_friendly
def demo(
    out: str,
    pipeline_path: str,
    overrides: tuple[str, ...],
    patients: int | None,
    size: int | None,
) -> None:
    """Build demo data and run the main job on it end to end (train, report, register)."""
    from medtl.demo import run_demo

    run_demo(
        Path(out),
        Path(pipeline_path),
        list(overrides),
        console=_console(),
        patients=patients,
        image_size=size,
    )


# ---------------------------------------------------------------- train / report / evaluate
@main.command()
@click.argument("pipeline_path", type=click.Path())
@click.option("--manifest", "manifest_path", type=click.Path(), help="Manifest CSV/Parquet.")
@click.option("--set", "overrides", multiple=True, help="Override a config key: key=value.")
@click.option("--out", type=click.Path(), help="Run folder (default: runs/<name>-<time>).")
@click.option("--register", "register_name", help="Register the model under this name.")
@_friendly
def train(
    pipeline_path: str,
    manifest_path: str | None,
    overrides: tuple[str, ...],
    out: str | None,
    register_name: str | None,
) -> None:
    """Cross-validated training with per-fold clinical reports and MLflow tracking."""
    from medtl.config import load_config
    from medtl.jobs import print_train_summary, run_train

    cfg = load_config(pipeline_path, list(overrides))
    con = _console()
    outcome = run_train(
        cfg, manifest_path=manifest_path, out_dir=out, register_name=register_name, console=con
    )
    if outcome.report_html is not None:
        print_train_summary(outcome, con)


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@_friendly
def report(run_dir: str) -> None:
    """Regenerate a run's report from its stored predictions."""
    from medtl.evaluation.report import regenerate_report

    paths = regenerate_report(Path(run_dir))
    click.echo(f"report: {paths.html}")


@main.command()
@_MODEL_OPTION
@click.option("--manifest", "manifest_path", required=True, type=click.Path(exists=True))
@click.option("--out", default=None, type=click.Path(), help="Report folder.")
@click.option(
    "--allow-overlap",
    is_flag=True,
    help="Evaluate even if patients or images are in the model's training set (the report "
    "records the overlap; metrics are then optimistic).",
)
@_friendly
def evaluate(model_ref: str, manifest_path: str, out: str | None, allow_overlap: bool) -> None:
    """The clinical report for a trained model on held-out data."""
    from medtl.evaluation.heldout import evaluate_model

    paths = evaluate_model(model_ref, manifest_path, out, allow_overlap=allow_overlap)
    click.echo(f"report: {paths.html}")


@main.command()
@click.argument("a")
@click.argument("b")
@click.option(
    "--manifest",
    "manifest_path",
    type=click.Path(exists=True, dir_okay=False),
    help="Score both models on this labelled manifest (default: the runs' shared OOF images).",
)
@click.option("--out", default=None, type=click.Path(), help="Report folder.")
@click.option(
    "--bootstrap",
    "n_boot",
    default=1000,
    show_default=True,
    type=click.IntRange(min=0),
    help="Paired patient-bootstrap resamples.",
)
@click.option("--tracking-uri", default=None, help="Log an MLflow run here ($MLFLOW_TRACKING_URI).")
@click.option("--experiment", default="medtl-compare", show_default=True, help="MLflow experiment.")
@_friendly
def compare(
    a: str,
    b: str,
    manifest_path: str | None,
    out: str | None,
    n_boot: int,
    tracking_uri: str | None,
    experiment: str,
) -> None:
    """Paired comparison of two runs or models on the same patients (AUROC, sens., spec.)."""
    from rich.table import Table

    from medtl.evaluation.compare import compare_sources, headline_table

    res = compare_sources(
        a, b, manifest_path, out, n_boot, tracking_uri=tracking_uri, experiment=experiment
    )
    header, rows = headline_table(res)
    table = Table(
        title=f"A = {res.a.name}, B = {res.b.name}: "
        f"{res.n_images} images of {res.n_patients} patients"
    )
    for h in header:
        table.add_column(h)
    for r in rows:
        table.add_row(*r)
    _console().print(table)
    click.echo(f"report: {res.html_path}")
    if res.mlflow_run_id:
        click.echo(f"MLflow run: {res.mlflow_run_id} (experiment {experiment})")


@main.command()
@_MODEL_OPTION
@click.argument("input_path", type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path())
@click.option(
    "--gradcam",
    "gradcam_dir",
    type=click.Path(file_okay=False),
    help="Also write Grad-CAM overlays here (2D models), named by the CSV row number.",
)
@click.option(
    "--by",
    "by_column",
    help="Also write one row per study or patient: the manifest column to group by "
    "(e.g. study_id); rows go to OUT with a _by_<column> suffix.",
)
@_friendly
def predict(
    model_ref: str, input_path: str, out: str, gradcam_dir: str | None, by_column: str | None
) -> None:
    """Batch prediction on a manifest or a folder of images; writes a CSV."""
    from medtl.inference import predict as run_predict
    from medtl.inference import resolve_model

    bundle = resolve_model(model_ref)
    df = run_predict(bundle, input_path)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    if by_column:
        _write_group_rows(bundle, df, input_path, by_column, Path(out))
    if gradcam_dir:
        from medtl.explain import write_gradcam_pngs

        pngs = write_gradcam_pngs(bundle, input_path, gradcam_dir)
        click.echo(f"{len(pngs)} Grad-CAM overlays written to {gradcam_dir}")
    n_err = int(df["error"].notna().sum()) if "error" in df.columns else 0
    click.echo(
        f"{len(df)} predictions written to {out}" + (f" ({n_err} unreadable)" if n_err else "")
    )


def _write_group_rows(bundle, df, input_path: str, column: str, out: Path) -> None:
    """The study- or patient-level rows of ``medtl predict --by COLUMN``."""
    import pandas as pd

    from medtl.errors import ConfigError
    from medtl.inference import group_predictions
    from medtl.manifest import read_manifest

    if Path(input_path).is_dir():
        raise ConfigError("--by needs a manifest input (a CSV with the grouping column)")
    manifest = read_manifest(input_path)
    if column not in manifest.df.columns:
        raise ConfigError(
            f"--by {column}: no such column in {input_path}; it has {list(manifest.df.columns)}"
        )
    by_image = dict(zip(manifest.df["image"].astype(str), manifest.df[column], strict=False))
    groups = pd.Series([by_image.get(str(i)) for i in df["image"]], index=df.index)
    rows = group_predictions(df, groups, bundle).rename(columns={"group": column})
    dest = out.with_name(f"{out.stem}_by_{column}{out.suffix}")
    rows.to_csv(dest, index=False)
    click.echo(f"{len(rows)} {column} rows written to {dest}")


# ---------------------------------------------------------------- registry, review, audit
@main.command()
@click.argument("run", type=click.Path())
@click.option("--name", required=True, help="Registered model name.")
@_friendly
def register(run: str, name: str) -> None:
    """Register a run's model (alias `candidate`) with its metrics and lineage."""
    from medtl.config import TrackingConfig
    from medtl.tracking.registry import register as do_register

    res = do_register(run, name, TrackingConfig())
    click.echo(f"registered {name} version {_version_of(res)} (alias: candidate)")


@main.command()
@click.argument("name")
@click.argument("version")
@click.option("--approve", "decision", flag_value="approve")
@click.option("--reject", "decision", flag_value="reject")
@click.option("--by", "by", required=True, help="Reviewer name or role.")
@click.option("--note", default="", help="Review note.")
@_friendly
def review(name: str, version: str, decision: str | None, by: str, note: str) -> None:
    """Record a clinical review decision on a model version (moves alias `approved`)."""
    from medtl.config import TrackingConfig
    from medtl.errors import ConfigError
    from medtl.tracking.registry import review as do_review

    if decision is None:
        raise ConfigError("give --approve or --reject")
    do_review(name, version, decision, by, note, TrackingConfig())
    click.echo(f"{name} version {version}: {decision}d by {by}")


@main.command()
@click.argument("spec")
@click.option("--json", "as_json", is_flag=True)
@_friendly
def audit(spec: str, as_json: bool) -> None:
    """Full lineage of a model: data, code, weights, metrics with CIs, review history."""
    from medtl.config import TrackingConfig
    from medtl.tracking.registry import audit as do_audit
    from medtl.tracking.registry import render_audit

    info = do_audit(spec, TrackingConfig())
    click.echo(json.dumps(info, indent=2, default=str) if as_json else render_audit(info))


# ---------------------------------------------------------------- weights
@main.group()
def weights() -> None:
    """Pretrained weights: local files only, verified by sha256."""


@weights.command("list")
@_friendly
def weights_list() -> None:
    """Show every backbone's weight files and whether they are present and verified."""
    from rich.table import Table

    from medtl.models.weights import default_weights_dir, list_weights

    table = Table(title=f"medtl weights (weights dir: {default_weights_dir()})")
    for c in ("backbone", "tag", "status", "file", "license"):
        table.add_column(c)
    for r in list_weights():
        if r.get("found") is None:
            status = "[red]missing[/red]"
        elif r.get("sha256_verified"):
            status = "[green]verified[/green]"
        else:
            status = "[yellow]present, no known sha256[/yellow]"
        table.add_row(
            r["backbone"], str(r["tag"]), status, str(r["found"] or r["file"]), r["license"]
        )
    _console().print(table)


@weights.command("import")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--as", "as_name", required=True, help="Backbone entry (or entry:tag) the file is for."
)
@_friendly
def weights_import(path: str, as_name: str) -> None:
    """Copy a weights file into the weights directory and record its sha256."""
    from medtl.models.weights import import_weights

    res = import_weights(path, as_name)
    click.echo(str(res))


@weights.command("convert")
@click.argument("h5_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--backbone", required=True, help="e.g. radimagenet_resnet50")
@click.option("--out", required=True, type=click.Path())
@_friendly
def weights_convert(h5_path: str, backbone: str, out: str) -> None:
    """One-time conversion of a Keras .h5 (RadImageNet notop) file into PyTorch weights."""
    from medtl.models.weights import convert_keras_h5

    res = convert_keras_h5(h5_path, backbone, out)
    click.echo(str(res))


# ---------------------------------------------------------------- config
@main.command("config")
@click.argument("pipeline_path", type=click.Path(), required=False)
@click.option("--set", "overrides", multiple=True)
@_friendly
def config_show(pipeline_path: str | None, overrides: tuple[str, ...]) -> None:
    """Print the resolved pipeline config (defaults + file + overrides) as YAML."""
    from medtl.config import load_config

    click.echo(load_config(pipeline_path, list(overrides)).to_yaml())


def _version_of(res) -> str:
    if isinstance(res, dict):
        return str(res.get("version"))
    return str(getattr(res, "version", res))


if __name__ == "__main__":
    main()
