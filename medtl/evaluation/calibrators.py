"""Recalibration of predicted probabilities: a registry of calibrators (temperature, Platt,
isotonic) fitted on held-out predictions, stored in the model bundle as JSON and applied by
`medtl predict` before the operating threshold.

Fitting uses scikit-learn (logistic regression for Platt, ``IsotonicRegression``) and scipy
(the one temperature parameter); what is written here is the glue: a JSON form a bundle can
carry without pickle, and one ``apply`` for every method.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from medtl.errors import ConfigError, look_up_option

__all__ = [
    "CALIBRATORS",
    "Calibration",
    "apply_calibration",
    "fit_calibration",
    "resolve_method",
]

_EPS = 1e-6


@dataclass(frozen=True)
class Calibration:
    """A fitted calibrator in JSON form: ``method``, its ``params`` and a ``note`` when it fell
    back to the identity (e.g. one class only in the data it was fitted on)."""

    method: str
    params: dict[str, Any]
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "params": self.params, "note": self.note}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Calibration:
        if not d:
            return IDENTITY
        return cls(str(d["method"]), dict(d.get("params") or {}), d.get("note"))


IDENTITY = Calibration("none", {})


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _binary_columns(y: np.ndarray, probs: np.ndarray, task: str) -> list[tuple[np.ndarray, int]]:
    """(targets, column) pairs each calibrated on its own: the positive column, or every label."""
    if task == "binary":
        return [(np.asarray(y).astype(int).reshape(-1), 1)]
    y2 = np.asarray(y).reshape(len(y), -1).astype(int)
    return [(y2[:, j], j) for j in range(probs.shape[1])]


# -- Platt: p' = sigmoid(a * logit(p) + b) per binary column
def _platt_ab(t: np.ndarray, z: np.ndarray) -> tuple[float, float]:
    """Platt (1999) with his smoothed targets (N+ + 1)/(N+ + 2) and 1/(N- + 2): on the small
    held-out sets calibration is fitted on, plain logistic regression overfits. Written here:
    scikit-learn's logistic regression takes no soft targets (CalibratedClassifierCV does this
    internally but needs a fitted estimator, not stored predictions)."""
    from scipy.optimize import minimize

    n_pos, n_neg = int(t.sum()), int(len(t) - t.sum())
    target = np.where(t == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))

    def nll(ab: np.ndarray) -> float:
        s = ab[0] * z + ab[1]
        return float(np.mean(np.logaddexp(0, s) - target * s))

    start = np.array([1.0, np.log((n_pos + 1) / (n_neg + 1)) - float(np.mean(z))])
    res = minimize(nll, start, method="L-BFGS-B")
    return float(res.x[0]), float(res.x[1])


def _fit_platt(y: np.ndarray, probs: np.ndarray, task: str) -> dict[str, Any]:
    coef: dict[str, list[float]] = {}
    for t, j in _binary_columns(y, probs, task):
        if len(np.unique(t)) < 2:
            coef[str(j)] = [1.0, 0.0]  # one class: leave this column as it is
            continue
        coef[str(j)] = list(_platt_ab(t, _logit(probs[:, j])))
    return {"coef": coef}


def _apply_platt(params: Mapping[str, Any], probs: np.ndarray, task: str) -> np.ndarray:
    out = probs.copy()
    for j, (a, b) in params["coef"].items():
        out[:, int(j)] = _sigmoid(a * _logit(probs[:, int(j)]) + b)
    return out


# -- isotonic: a monotone step function per binary column (stored as its knots)
def _fit_isotonic(y: np.ndarray, probs: np.ndarray, task: str) -> dict[str, Any]:
    from sklearn.isotonic import IsotonicRegression

    knots: dict[str, list[list[float]]] = {}
    for t, j in _binary_columns(y, probs, task):
        if len(np.unique(t)) < 2:
            knots[str(j)] = [[0.0, 1.0], [0.0, 1.0]]
            continue
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
        iso.fit(probs[:, j], t)
        knots[str(j)] = [iso.X_thresholds_.tolist(), iso.y_thresholds_.tolist()]
    return {"knots": knots}


def _apply_isotonic(params: Mapping[str, Any], probs: np.ndarray, task: str) -> np.ndarray:
    out = probs.copy()
    for j, (xs, ys) in params["knots"].items():
        out[:, int(j)] = np.interp(probs[:, int(j)], xs, ys)  # clips outside the knots
    return out


# -- temperature: softmax(log p / T) for single-label tasks (Guo et al. 2017)
def _fit_temperature(y: np.ndarray, probs: np.ndarray, task: str) -> dict[str, Any]:
    from scipy.optimize import minimize_scalar

    logp = np.log(np.clip(probs, _EPS, 1.0))
    yi = np.asarray(y).astype(int).reshape(-1)

    def nll(log_t: float) -> float:
        z = logp / np.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        lse = np.log(np.exp(z).sum(axis=1))
        return float(np.mean(lse - z[np.arange(len(yi)), yi]))

    res = minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded")
    return {"temperature": float(np.exp(res.x))}


def _apply_temperature(params: Mapping[str, Any], probs: np.ndarray, task: str) -> np.ndarray:
    z = np.log(np.clip(probs, _EPS, 1.0)) / float(params["temperature"])
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class CalibratorSpec:
    """One registry entry: how to fit and apply a method, and the tasks it fits."""

    fit: Callable[[np.ndarray, np.ndarray, str], dict[str, Any]]
    apply: Callable[[Mapping[str, Any], np.ndarray, str], np.ndarray]
    tasks: tuple[str, ...]


CALIBRATORS: dict[str, CalibratorSpec] = {
    "temperature": CalibratorSpec(_fit_temperature, _apply_temperature, ("binary", "multiclass")),
    "platt": CalibratorSpec(_fit_platt, _apply_platt, ("binary", "multilabel")),
    "isotonic": CalibratorSpec(_fit_isotonic, _apply_isotonic, ("binary", "multilabel")),
}
_DEFAULT = {"binary": "platt", "multiclass": "temperature", "multilabel": "platt"}


def resolve_method(method: str, task: str) -> str:
    """``evaluation.calibration`` for this task: ``auto`` is Platt for binary and multi-label,
    temperature for multiclass; a method that does not fit the task is a ConfigError."""
    if method == "auto":
        return _DEFAULT[task]
    if method == "none":
        return "none"
    spec = CALIBRATORS[look_up_option(method, CALIBRATORS, "evaluation.calibration")]
    if task not in spec.tasks:
        fits = [m for m, s in CALIBRATORS.items() if task in s.tasks]
        raise ConfigError(
            f"evaluation.calibration={method} does not fit a {task} task; use one of "
            f"{['auto', 'none', *fits]}"
        )
    return method


def _one_class(y: np.ndarray, task: str) -> bool:
    if task == "multilabel":
        return False  # handled per label
    return len(np.unique(np.asarray(y).astype(int))) < 2


def fit_calibration(method: str, y: np.ndarray, probs: np.ndarray, task: str) -> Calibration:
    """Fit ``method`` (already resolved) on held-out labels and probabilities."""
    if method == "none":
        return IDENTITY
    if len(y) == 0 or _one_class(y, task):
        return Calibration("none", {}, note=f"{method} not fitted: one class or no data")
    probs = np.asarray(probs, dtype=float)
    return Calibration(method, CALIBRATORS[method].fit(np.asarray(y), probs, task))


def apply_calibration(
    calibration: Calibration | Mapping[str, Any] | None, probs: np.ndarray, task: str
) -> np.ndarray:
    """Calibrated ``(N, C)`` probabilities (the identity for ``none`` or no calibrator)."""
    cal = (
        calibration if isinstance(calibration, Calibration) else Calibration.from_dict(calibration)
    )
    probs = np.asarray(probs, dtype=float)
    if cal.method == "none" or len(probs) == 0:
        return probs
    out = CALIBRATORS[cal.method].apply(cal.params, probs, task)
    if task == "binary":
        out[:, 0] = 1.0 - out[:, 1]
    return out
