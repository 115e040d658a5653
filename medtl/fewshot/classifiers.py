"""The two few-shot classifiers on cached embeddings (pure numpy in, numpy out).

Both act on L2-normalised embeddings and both are, exactly, the model's ``cosine`` head
(``medtl.models.heads``: normalise, then one linear layer), so a fitted classifier is saved as
an ordinary model bundle:

- ``prototype``: each class's prototype is the mean of its support images' L2-normalised
  embeddings; logits are ``scale * cosine(query, prototype)``, i.e. weight = unit-norm
  prototypes times the scale, bias 0 (SimpleShot, Wang et al. 2019, without centring).
  The class means are three lines of numpy, so easyfsl (whose ``SimpleShot`` computes the same
  thing in torch) is only used in the tests, as the reference.
- ``logistic``: scikit-learn logistic regression with a small ``C`` (strong L2 penalty) and
  balanced class weights, via ``medtl.training.features.fit_logistic`` (the feature-extraction
  head fitter), on the same normalised embeddings (Tian et al. 2020). The default: on the
  demo task it keeps improving with more shots while the prototypes barely do (BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from medtl.config import StrategyConfig
from medtl.errors import look_up_option

__all__ = [
    "CLASSIFIERS",
    "CosineHead",
    "FewShotClassifier",
    "fit_logistic_head",
    "fit_prototypes",
    "get_classifier",
    "l2_normalize",
]


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (the same ``eps`` as the model's cosine head)."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class CosineHead:
    """A fitted classifier as the cosine head holds it: ``logits = normalize(x) @ W.T + b``."""

    weight: np.ndarray  # (C, F)
    bias: np.ndarray  # (C,)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(N, C) logits of raw (unnormalised) embeddings."""
        return l2_normalize(x) @ self.weight.T.astype(np.float64) + self.bias

    def proba(self, x: np.ndarray) -> np.ndarray:
        """(N, C) softmax probabilities, as ``medtl predict`` computes them from the logits."""
        z = self.logits(x)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


def _check(x: np.ndarray, y: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x), np.asarray(y, dtype=int).reshape(-1)
    if x.ndim != 2 or len(x) != len(y) or len(y) == 0:
        raise ValueError(f"need (N, F) embeddings and N labels, got {x.shape} and {y.shape}")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"labels must be class indices 0..{n_classes - 1}, got {np.unique(y)}")
    return x, y


def fit_prototypes(x: np.ndarray, y: np.ndarray, n_classes: int, scale: float) -> CosineHead:
    """Prototype classifier: class means of the L2-normalised support embeddings; logits are
    ``scale`` times the cosine similarity to each prototype. A class without support images
    gets a zero row (logit 0): give every class a shot to predict it."""
    x, y = _check(x, y, n_classes)
    z = l2_normalize(x)
    w = np.zeros((n_classes, x.shape[1]))
    for c in np.unique(y):
        w[c] = z[y == c].mean(axis=0)
    w = scale * l2_normalize(w) * (np.linalg.norm(w, axis=1, keepdims=True) > 0)
    return CosineHead(w.astype(np.float32), np.zeros(n_classes, np.float32))


def fit_logistic_head(
    x: np.ndarray, y: np.ndarray, n_classes: int, c: float, seed: int
) -> CosineHead:
    """Strongly regularised logistic regression (inverse penalty ``c`` on ``fit_logistic``'s
    scale, balanced class weights) on the L2-normalised embeddings, as cosine-head weights.

    Fitted in the span of the centred support rows: with an L2 penalty and a free intercept
    the optimal weights lie in that span (representer theorem), so the fit in an orthonormal
    basis of it (n support images << F features) is the same solution, ~10x faster. The
    basis changes ``fit_logistic``'s global feature scale by sqrt(F / rank), which ``c`` is
    multiplied back by (scaling features by a is the same fit as multiplying C by a**2).
    """
    from medtl.training.features import fit_logistic

    x, y = _check(x, y, n_classes)
    z = l2_normalize(x)
    mu = z.mean(axis=0)
    _, sv, vt = np.linalg.svd(z - mu, full_matrices=False)
    basis = vt[sv > 1e-9 * max(float(sv.max(initial=0.0)), 1e-30)].T  # (F, r)
    if basis.shape[1] == 0:  # identical images: nothing to separate them by
        basis = np.zeros((x.shape[1], 1))
        basis[0, 0] = 1.0
    task = "binary" if n_classes == 2 else "multiclass"
    c_basis = c * x.shape[1] / basis.shape[1]
    w_q, b_q = fit_logistic((z - mu) @ basis, y, task, n_classes, c_basis, True, seed)
    w = w_q.astype(np.float64) @ basis.T
    return CosineHead(w.astype(np.float32), (b_q - w @ mu).astype(np.float32))


@dataclass(frozen=True)
class FewShotClassifier:
    """A registry entry: ``fit(x, y, n_classes, strategy config, seed) -> CosineHead``."""

    name: str
    description: str
    fit: Callable[[np.ndarray, np.ndarray, int, StrategyConfig, int], CosineHead]


CLASSIFIERS: dict[str, FewShotClassifier] = {
    "prototype": FewShotClassifier(
        "prototype",
        "class means of L2-normalised embeddings, scale x cosine similarity",
        lambda x, y, n, s, seed: fit_prototypes(x, y, n, s.fewshot_scale),
    ),
    "logistic": FewShotClassifier(
        "logistic",
        "L2-regularised logistic regression (small C) on L2-normalised embeddings",
        lambda x, y, n, s, seed: fit_logistic_head(x, y, n, s.fewshot_c, seed),
    ),
}


def get_classifier(name: str) -> FewShotClassifier:
    """The registry entry ``name`` (ConfigError listing the valid ones otherwise)."""
    return CLASSIFIERS[look_up_option(name, CLASSIFIERS, "strategy.fewshot_classifier")]
