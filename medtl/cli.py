"""`medtl` command line: one thin command per verb over the typed API of each stage.

Heavy libraries (torch, MONAI, MLflow) are imported inside commands so `medtl --help` is fast.
Errors that medtl explains (MedtlError) print as one line and exit with status 2.
"""

from __future__ import annotations

import atexit
import functools
import gc
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from medtl.config import PipelineConfig

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


def _inference_options(fn):
    """--device, --batch-size and --allow-burned-in, shared by predict and evaluate."""
    fn = click.option(
        "--allow-burned-in",
        is_flag=True,
        help="Read DICOM images whose BurnedInAnnotation (0028,0301) is YES (pixels may "
        "show names); by default they are listed as refused, never read or rendered.",
    )(fn)
    fn = click.option(
        "--batch-size",
        default=32,
        show_default=True,
        type=click.IntRange(min=1),
        help="Images per forward pass.",
    )(fn)
    return click.option(
        "--device",
        default="auto",
        show_default=True,
        help="auto (a GPU when visible), cpu, cuda or cuda:N; autocast on CUDA.",
    )(fn)


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
    _exit_fast()


@functools.cache
def _exit_fast() -> None:
    """Freeze the heap as the last thing at exit (registered first, atexit runs it last).

    The interpreter's final garbage collections walk the whole torch/MONAI object graph: about
    2 s of every command's exit on these 2-core machines, 0.3 s frozen. atexit hooks (MLflow,
    logging) still run and objects freed by reference counting are still closed; only objects
    in reference cycles go unfinalized, which the interpreter never promised at exit anyway.
    """
    atexit.register(gc.freeze)


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
@click.option(
    "--folds",
    "fold_list",
    help="A fold job: train only these folds (e.g. 0,2) into --out; no refit or report.",
)
@click.option(
    "--collect",
    "collect_folds",
    is_flag=True,
    help="Pool the fold jobs' results in --out, then refit, report and register.",
)
@_friendly
def train(
    pipeline_path: str,
    manifest_path: str | None,
    overrides: tuple[str, ...],
    out: str | None,
    register_name: str | None,
    fold_list: str | None,
    collect_folds: bool,
) -> None:
    """Cross-validated training with per-fold clinical reports and MLflow tracking."""
    from medtl.config import load_config

    folds = _fold_numbers(fold_list) if fold_list is not None else None
    cfg = load_config(pipeline_path, list(overrides))
    _start_decoders(cfg)
    from medtl.jobs import print_train_summary, run_train

    if cfg.strategy.name == "few_shot":  # evaluated by episodes, not k-fold CV: `medtl fewshot`
        from medtl.fewshot.job import refuse_cross_validation

        refuse_cross_validation(cfg, pipeline_path)
    con = _console()
    outcome = run_train(
        cfg,
        manifest_path=manifest_path,
        out_dir=out,
        register_name=register_name,
        console=con,
        folds=folds,
        collect_folds=collect_folds,
    )
    if outcome.report_html is not None:
        print_train_summary(outcome, con)
    elif folds is not None:
        done = ",".join(map(str, outcome.folds_run))
        con.print(f"folds {done} written to {outcome.run_dir}/folds; when every fold is done run")
        con.print(f"  medtl train {pipeline_path} ... --collect --out {outcome.run_dir}")


def _start_decoders(cfg: PipelineConfig) -> None:
    """Start the decoding workers' forkserver now, when the job decodes in a pool: its
    imports then overlap with the job's own, on another core."""
    if cfg.data.prepare_workers != 0:
        from medtl.decoder_server import start_decoder_server

        start_decoder_server()


def _fold_numbers(text: str) -> list[int]:
    """``--folds 0,2`` as fold numbers (UsageError naming the flag otherwise)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.UsageError(
            f"--folds takes fold numbers separated by commas, e.g. --folds 0,2; got '{text}'"
        ) from None


@main.command()
@click.argument("pipeline_path", type=click.Path())
@click.option("--manifest", "manifest_path", type=click.Path(), help="Manifest CSV/Parquet.")
@click.option("--set", "overrides", multiple=True, help="Override a config key: key=value.")
@click.option("--out", type=click.Path(), help="Run folder (default: runs/<name>-<time>).")
@_friendly
def prepare(
    pipeline_path: str, manifest_path: str | None, overrides: tuple[str, ...], out: str | None
) -> None:
    """Decode every image into the cache, as `medtl train` would, and stop there.

    Run it once before fold jobs that share a cache, or on a CPU node before training: the
    train job with the same pipeline and --set values then finds every image cached.
    """
    from medtl.config import load_config

    cfg = load_config(pipeline_path, list(overrides))
    _start_decoders(cfg)
    from medtl.jobs.prepare_job import run_prepare

    done = run_prepare(cfg, manifest_path=manifest_path, out_dir=out)
    con = _console()
    con.print(
        f"[bold]medtl prepare[/bold] {cfg.name}: {done.ready} of {done.images} images in the "
        f"cache {done.cache_dir} ({done.seconds:.1f} s)"
    )
    if done.quarantined:
        con.print(
            f"[yellow]{done.quarantined} unreadable file(s) quarantined[/yellow]: see "
            f"{done.run_dir}/quarantine.csv"
        )


@main.command()
@_MODEL_OPTION
@click.option(
    "--target",
    "target_manifest",
    required=True,
    type=click.Path(exists=True),
    help="Manifest of the new site's images (labels optional: used only to score).",
)
@click.option("--method", type=click.Choice(["tent", "adabn"]), default="tent", show_default=True)
@click.option("--out", default=None, type=click.Path(), help="Folder for the adapted model.")
@click.option("--register", "register_name", help="Register the adapted model under this name.")
@_friendly
def adapt(
    model_ref: str,
    target_manifest: str,
    method: str,
    out: str | None,
    register_name: str | None,
) -> None:
    """Adapt a trained model to a new site's images (TENT or AdaBN, no retraining)."""
    from medtl.config import TrackingConfig
    from medtl.evaluation.report.formatting import format_ci
    from medtl.jobs.adapt import run_adapt

    res = run_adapt(
        model_ref,
        target_manifest,
        method=method,
        out_dir=out,
        register_name=register_name,
        tcfg=TrackingConfig(enabled=bool(register_name)),
    )
    t = res.target
    click.echo(f"adapted model ({method}): {res.bundle_dir}")
    if t.get("labelled"):
        before, after = t["before"]["summary"], t["after"]["summary"]
        click.echo(
            f"target AUROC before {format_ci(before.get('auroc'))}, "
            f"after {format_ci(after.get('auroc'))}"
        )
    if res.registered:
        reg = res.registered
        click.echo(f"registered {reg.get('name')} version {reg.get('version')} (alias: candidate)")
    click.echo(t["note"])


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
@_inference_options
@_friendly
def evaluate(
    model_ref: str,
    manifest_path: str,
    out: str | None,
    allow_overlap: bool,
    device: str,
    batch_size: int,
    allow_burned_in: bool,
) -> None:
    """The clinical report for a trained model on held-out data."""
    from medtl.evaluation.heldout import evaluate_model
    from medtl.prediction import PassOptions

    opts = PassOptions(device=device, batch_size=batch_size, allow_burned_in=allow_burned_in)
    paths = evaluate_model(model_ref, manifest_path, out, allow_overlap=allow_overlap, options=opts)
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
@click.option(
    "--allow-unapproved",
    is_flag=True,
    help="Predict with a version that is not approved (rejected, unreviewed, a bundle "
    "folder); every row is then marked approved=false.",
)
@click.option(
    "--strict",
    is_flag=True,
    help="Refuse inputs outside the model's training input profile (modality, body part, "
    "view, photometric, size); they keep a row with the reason, unpredicted.",
)
@_inference_options
@_friendly
def predict(
    model_ref: str,
    input_path: str,
    out: str,
    gradcam_dir: str | None,
    by_column: str | None,
    allow_unapproved: bool,
    strict: bool,
    device: str,
    batch_size: int,
    allow_burned_in: bool,
) -> None:
    """Batch prediction on a manifest or a folder of images; writes a CSV with provenance.

    Only an approved registered version runs unless --allow-unapproved; inputs outside the
    model's intended-use profile are flagged in out_of_profile (refused with --strict).
    """
    from medtl.inference import predict_for_use
    from medtl.prediction import PassOptions
    from medtl.spreadsheet import write_csv

    cam = Path(gradcam_dir) if gradcam_dir else None
    opts = PassOptions(
        device=device, batch_size=batch_size, gradcam_dir=cam, allow_burned_in=allow_burned_in
    )
    res = predict_for_use(
        model_ref, input_path, allow_unapproved=allow_unapproved, strict=strict, options=opts
    )
    bundle, df, prov = res.bundle, res.rows, res.provenance
    if not prov.approved:
        click.echo(f"warning: not approved: {prov.approval}; rows say approved=false", err=True)
    if not res.profile_checked:
        click.echo("warning: the model has no training input profile; inputs not checked", err=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_csv(df, out)  # text cells cannot run as spreadsheet formulas (medtl.spreadsheet)
    if by_column:
        _write_group_rows(bundle, df, input_path, by_column, Path(out))
    if gradcam_dir:  # made in the prediction pass, from the same decoded images
        pngs = df.attrs.get("gradcams", [])
        click.echo(f"{len(pngs)} Grad-CAM overlays written to {gradcam_dir}")
    n_err = int(df["error"].notna().sum()) - res.n_refused
    notes = [f"{n_err} unreadable"] * bool(n_err)
    if res.n_out_of_profile:
        verb = "refused" if strict else "flagged in out_of_profile"
        notes.append(f"{res.n_out_of_profile} outside the intended-use profile, {verb}")
    click.echo(
        f"{len(df)} predictions written to {out}" + (f" ({'; '.join(notes)})" if notes else "")
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
    from medtl.spreadsheet import write_csv

    write_csv(rows, dest)
    click.echo(f"{len(rows)} {column} rows written to {dest}")


# ---------------------------------------------------------------- few-shot
@main.command()
@click.option("--pipeline", "pipeline_path", type=click.Path(), help="Pipeline YAML (few_shot).")
@click.option("--manifest", "manifest_path", type=click.Path(exists=True), help="Episodic mode.")
@click.option("--shots", help="Episodic: patients per class, e.g. 1,5,10.")
@click.option("--episodes", type=click.IntRange(min=1), help="Episodic: episodes per k.")
@click.option("--support", "support_path", type=click.Path(exists=True), help="Fit mode.")
@click.option("--query", "query_path", type=click.Path(exists=True), help="Fit mode: scored.")
@click.option("--classifier", type=click.Choice(["logistic", "prototype"]), default=None)
@click.option("--seed", type=int, default=None, help="Episode sampling and head seed.")
@click.option("--set", "overrides", multiple=True, help="Override a config key: key=value.")
@click.option("--out", type=click.Path(), help="Output folder (default: runs/<name>-...).")
@click.option("--register", "register_name", help="Fit mode: register the model as NAME.")
@_friendly
def fewshot(
    pipeline_path: str | None,
    manifest_path: str | None,
    shots: str | None,
    episodes: int | None,
    support_path: str | None,
    query_path: str | None,
    classifier: str | None,
    seed: int | None,
    overrides: tuple[str, ...],
    out: str | None,
    register_name: str | None,
) -> None:
    """Few-shot from a handful of patients: episodic evaluation (--manifest) or a model
    fitted on --support and scored on --query."""
    from medtl.config import load_config
    from medtl.fewshot import run_fewshot_episodes, run_fewshot_fit

    sets = list(overrides) if pipeline_path else ["strategy.name=few_shot", *overrides]
    sets += [f"strategy.fewshot_classifier={classifier}"] if classifier else []
    sets += [f"seed={seed}"] if seed is not None else []
    cfg = load_config(pipeline_path, sets)
    con = _console()
    if manifest_path and not (support_path or query_path):
        k = _shot_numbers(shots) if shots else None
        res = run_fewshot_episodes(
            cfg, manifest_path, out, shots=k, episodes=episodes, say=con.print
        )
        _print_fewshot_episodes(con, res)
    elif support_path and query_path and not manifest_path:
        if shots or episodes:
            raise click.UsageError("--shots/--episodes belong to the episodic mode (--manifest)")
        fit = run_fewshot_fit(
            cfg, support_path, query_path, out, register_name=register_name, say=con.print
        )
        _print_fewshot_fit(con, fit)
    else:
        raise click.UsageError(
            "give either --manifest M.csv (episodic evaluation) or --support S.csv --query Q.csv "
            "(fit a model on the support patients, score the query patients)"
        )


def _shot_numbers(text: str) -> list[int]:
    """``--shots 1,5,10`` as patients per class (UsageError naming the flag otherwise)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.UsageError(
            f"--shots takes patients per class separated by commas, e.g. 1,5,10; got '{text}'"
        ) from None


def _print_fewshot_episodes(con, res) -> None:
    from rich.table import Table

    from medtl.fewshot.report import fmt_ci

    info = res.info
    table = Table(
        title=f"few-shot {info['classifier']}: {info['episodes']} episodes per k (95% CI)"
    )
    for h in ("variant", "k", "AUROC", "accuracy"):
        table.add_column(h)
    for r in res.result.rows:
        table.add_row(r.variant, str(r.k_shot), fmt_ci(r.auroc), fmt_ci(r.accuracy))
    con.print(table)
    con.print(f"report: {res.md_path}")


def _print_fewshot_fit(con, fit) -> None:
    from medtl.jobs.summary import print_headline_table

    title = "few-shot model on the query patients (patient-bootstrap 95% CI)"
    print_headline_table(con, title, fit.metrics)
    con.print(f"report:      {fit.report_html}")
    con.print(f"model:       {fit.bundle_dir}  (medtl predict --model {fit.bundle_dir} ...)")
    if fit.parent_run_id:
        con.print(f"MLflow run:  {fit.parent_run_id}  ({fit.tracking_uri})")
        if not fit.registered:
            con.print(f"register:    medtl register {fit.out_dir} --name NAME")
    if fit.registered:
        reg = fit.registered
        con.print(f"registered:  {reg.get('name')} version {reg.get('version')} (alias candidate)")


# ---------------------------------------------------------------- registry, review, audit
@main.command()
@click.argument("run", type=click.Path())
@click.option("--name", required=True, help="Registered model name.")
@click.option(
    "--card",
    "card_path",
    type=click.Path(),
    help="Model card items (YAML: intended_use, target_population, ...); they replace the "
    "pipeline's card: section item by item.",
)
@_friendly
def register(run: str, name: str, card_path: str | None) -> None:
    """Register a run's model (alias `candidate`) with its metrics, lineage and model card."""
    from medtl.config import TrackingConfig, load_card
    from medtl.tracking.registry import register as do_register

    card = load_card(card_path) if card_path else None
    res = do_register(run, name, TrackingConfig(), card=card)
    click.echo(f"registered {name} version {_version_of(res)} (alias: candidate)")


@main.command()
@click.argument("name")
@click.argument("version")
@click.option("--approve", is_flag=True, help="Approve the version (moves alias `approved`).")
@click.option("--reject", is_flag=True, help="Reject it (takes `approved` off it).")
@click.option("--by", "by", default="", help="Reviewer name or role (required).")
@click.option("--note", default="", help="Review note (no patient identifiers).")
@_friendly
def review(name: str, version: str, approve: bool, reject: bool, by: str, note: str) -> None:
    """Append a signed clinical review record to the model's review chain.

    The first review creates the audit key file (see README, "Review trail").
    """
    from medtl.config import TrackingConfig
    from medtl.errors import ConfigError
    from medtl.tracking.registry import review as do_review

    if approve == reject:
        given = "both" if approve else "neither"
        raise ConfigError(
            f"{given} of --approve and --reject given: pass exactly one, e.g. "
            f"medtl review {name} {version} --approve --by 'Dr. A. Radiologist'"
        )
    if not by.strip():
        raise ConfigError(f"a review needs a reviewer: medtl review {name} {version} --by NAME")
    decision = "approve" if approve else "reject"
    rec = do_review(name, version, decision, by, note, TrackingConfig())
    if rec.get("key_created"):
        click.echo(
            f"created audit key {rec['key_created']} (mode 0600): back it up and keep it out "
            "of the tracking store; audits need it",
            err=True,
        )
    click.echo(f"{name} version {version}: {decision}d by {rec['by']}")


@main.command()
@click.argument("spec")
@click.option("--json", "as_json", is_flag=True)
@_friendly
def audit(spec: str, as_json: bool) -> None:
    """Lineage of a model and a check of its review chain and bytes; exit 1 on any break.

    Exit status: 0 verified, 1 integrity failure (first bad record named), 2 usage error.
    """
    from medtl.config import TrackingConfig
    from medtl.tracking.registry import audit as do_audit
    from medtl.tracking.registry import render_audit

    info = do_audit(spec, TrackingConfig())
    click.echo(json.dumps(info, indent=2, default=str) if as_json else render_audit(info))
    if not info["ok"]:
        first = info["integrity"]["first_break"]
        where = f"record #{first['record']}" if first["record"] is not None else "the chain"
        click.echo(f"error: audit failed at {where}: {first['kind']}: {first['detail']}", err=True)
        sys.exit(1)


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
