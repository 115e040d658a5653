"""The closing console summary of a train job, shown by `medtl train` and `medtl demo`."""

from __future__ import annotations

from typing import Any


def print_headline_table(con: Any, title: str, metrics: Any) -> None:
    """A metric | value table of the pooled headline metrics (with their CIs)."""
    from rich.table import Table

    from medtl.evaluation.report import headline_rows

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value")
    for name, value in headline_rows(metrics):
        table.add_row(name, value)
    con.print(table)


def print_train_summary(outcome: Any, con: Any) -> None:
    """The closing table of `medtl train`: pooled metrics and where to look next."""
    title = "cross-validated results (pooled out-of-fold, 95% CI)"
    print_headline_table(con, title, outcome.metrics)
    con.print(f"report:      {outcome.report_html}")
    con.print(f"model:       {outcome.bundle_dir}")
    if outcome.parent_run_id:
        con.print(f"MLflow run:  {outcome.parent_run_id}  ({outcome.tracking_uri})")
        if outcome.tracking_uri and outcome.tracking_uri.startswith("sqlite:"):
            con.print(f"browse:      mlflow ui --backend-store-uri {outcome.tracking_uri}")
    if outcome.registered:
        reg = outcome.registered
        con.print(
            f"registered:  {reg.get('name')} version {reg.get('version')} "
            f"(alias {reg.get('alias', 'candidate')}); model card {reg.get('model_card')}"
        )
