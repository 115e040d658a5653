"""Evaluation: clinical metrics with patient-bootstrap CIs, calibration, plots and the report.

Only the metric functions are re-exported here (light imports, used inside training loops);
the report lives in :mod:`medtl.evaluation.report` (it imports matplotlib).
"""

from medtl.evaluation.calibration import expected_calibration_error, reliability_curve
from medtl.evaluation.metrics import (
    BootstrapCI,
    binary_metrics,
    bootstrap_ci,
    evaluate,
    evaluate_predictions,
)

__all__ = [
    "BootstrapCI",
    "binary_metrics",
    "bootstrap_ci",
    "evaluate",
    "evaluate_predictions",
    "expected_calibration_error",
    "reliability_curve",
]
