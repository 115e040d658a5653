"""Clinical report of a run: ``report.md``, a self-contained ``report.html``, ``metrics.json``,
``oof_predictions.csv`` and ``plots/*.png``.

The report is built once as a list of blocks (:mod:`.blocks`: heading, paragraph, table,
image, list), one function per section (:mod:`.sections`: ``SECTIONS`` for a training run,
``EVALUATION_SECTIONS`` for a held-out evaluation), and rendered twice (:mod:`.write`): Markdown
linking ``plots/*.png``, and HTML with the same plots embedded as base64 PNG data URIs, inline
CSS and no external links or scripts (it opens offline and can be attached to an e-mail). Only
counts describe the data; no identifier appears in the report (quarantined files are listed by
the path the manifest gave).

``regenerate_report(run_dir)`` rebuilds everything from the run folder:

- ``oof_predictions.csv``: one row per image: image, patient_id, fold, label, prob_<class>...,
  pred, subgroup columns.
- ``config.yaml``: the resolved pipeline config (``medtl.config.load_config``).
- ``run_info.json`` (written by ``medtl.pipeline``), the keys read here::

      {"classes": ["normal", "pneumonia"],          # class order of the prob_ columns
       "task": "binary" | "multiclass" | "multilabel",
       "fold_thresholds": {"0": 0.41, "1": [0.3, 0.5, 0.2], ...},  # float, or one per class
       "final_threshold": 0.43 | [..] | null,       # optional: the deployed model's threshold
       "data_summary": {"n_images": 480, ...},      # counts; numeric leaves are shown
       "quarantine": [{"path": "...", "reason": "..."}],
       "threshold_source": "...",                   # optional: what data chose the thresholds
                                                    # (default: the fold's own validation set)
       ...}                                          # anything else: shown under "Run"

  The whole dict is the ``run_info`` argument of :func:`write_report`.
"""

from medtl.evaluation.report.formatting import (
    FOLD_COLUMNS,
    METRIC_LABELS,
    SUBGROUP_COLUMNS,
    format_ci,
    headline_rows,
)
from medtl.evaluation.report.sections import (
    DEFAULT_THRESHOLD_SOURCE,
    EVALUATION_SECTIONS,
    SECTIONS,
    ReportContext,
    Section,
)
from medtl.evaluation.report.write import (
    OOF_FILENAME,
    ReportPaths,
    regenerate_report,
    write_evaluation_report,
    write_report,
)

__all__ = [
    "DEFAULT_THRESHOLD_SOURCE",
    "EVALUATION_SECTIONS",
    "FOLD_COLUMNS",
    "METRIC_LABELS",
    "OOF_FILENAME",
    "SECTIONS",
    "SUBGROUP_COLUMNS",
    "ReportContext",
    "ReportPaths",
    "Section",
    "format_ci",
    "headline_rows",
    "regenerate_report",
    "write_evaluation_report",
    "write_report",
]
