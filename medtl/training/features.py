"""Feature-extraction fast path: frozen-backbone embeddings cached on disk, heads fit on them.

Embeddings are computed once per image with the *deterministic* transforms only (no
augmentation: a cached embedding must not depend on a random draw) and stored under a key of
backbone name + weights sha256 + a hash of the backbone's actual tensors + the transform/
preprocessing key + image path, size and mtime. Every CV fold then reuses them, so a 5-fold
run pays one forward pass per image instead of one per image per epoch per fold.

Heads: ``head_trainer=logistic`` fits scikit-learn ``LogisticRegression`` (C =
``strategy.logistic_c``; ``class_weight="balanced"`` when ``train.loss=weighted_ce``) on
centred, globally scaled features and writes its coefficients into the model's linear head, so the
returned model is an ordinary network; ``head_trainer=torch`` trains the model's own head
(linear or MLP) on the cached features with the configured loss and sampler.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from medtl.config import PipelineConfig
from medtl.errors import ConfigError
from medtl.models.model import MedtlModel
from medtl.training.outputs import auroc, probabilities

if TYPE_CHECKING:
    from medtl.training.engine import Engine


# --------------------------------------------------------------------------- cache keys
def feature_cache_root(cfg: PipelineConfig, workdir: Path) -> Path:
    """``<data.cache_dir>/features``, else ``$MEDTL_CACHE_DIR/features``, else beside the
    fold folders (``<workdir>/../.feature_cache``) so sibling folds share it."""
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir) / "features"
    env = os.environ.get("MEDTL_CACHE_DIR")
    if env:
        return Path(env) / "features"
    return Path(workdir).parent / ".feature_cache"


def backbone_fingerprint(model: MedtlModel) -> str:
    """sha256 over the backbone's parameters and buffers (every stage but the head)."""
    groups = model.stage_groups()
    head_ids = {id(p) for p in groups[-1][1]}
    h = hashlib.sha256()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in head_ids:
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def transform_key(cfg: PipelineConfig, model: MedtlModel) -> str:
    """The deterministic-preprocessing identity (medtl.transforms' cache key, which covers the
    model's preprocessing contract; augmentation is excluded: features never see it)."""
    from medtl.transforms import transform_cache_key

    return transform_cache_key(
        cfg.transforms,
        getattr(model, "preprocess", None),
        cfg.model.in_channels,
        cfg.model.channel_adapt,
    )


def feature_model_key(cfg: PipelineConfig, model: MedtlModel, dtype: torch.dtype | None) -> str:
    """Key of everything that determines an image's embedding except the image itself."""
    info = dict(getattr(model, "weights_info", {}) or {})
    parts = {
        "backbone": cfg.model.backbone,
        "weights_sha256": info.get("sha256"),
        "backbone_tensors": backbone_fingerprint(model),
        "transforms": transform_key(cfg, model),
        "spatial_dims": cfg.spatial_dims,
        "dtype": str(dtype or torch.float32),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def image_file_key(path: str | os.PathLike, slice_index: Any = None) -> str:
    """Path + size + mtime (a series folder: each file's) + the 2.5D slice: the same identity
    as the decoded-image cache (``medtl.data.file_identity_hash``)."""
    from medtl.data import SLICE_COLUMN, file_identity_hash

    return file_identity_hash({"image": str(path), SLICE_COLUMN: slice_index}).decode()


class FeatureCache:
    """One ``.npy`` per (model key, image key) under ``root/<model key>/``."""

    def __init__(self, root: str | Path, model_key: str):
        self.dir = Path(root) / model_key[:32]
        self.dir.mkdir(parents=True, exist_ok=True)

    def file_for(self, image_key: str) -> Path:
        """Where the embedding with this :func:`image_file_key` lives."""
        return self.dir / image_key[:2] / f"{image_key}.npy"

    def load(self, image: str | os.PathLike, slice_index: Any = None) -> np.ndarray | None:
        """The cached embedding of ``image``, or None."""
        return self.read(self.file_for(image_file_key(image, slice_index)))

    def save(self, image: str | os.PathLike, emb: np.ndarray, slice_index: Any = None) -> None:
        """Store an embedding (atomic rename)."""
        self.write(self.file_for(image_file_key(image, slice_index)), emb)

    @staticmethod
    def read(f: Path) -> np.ndarray | None:
        if not f.is_file():
            return None
        try:
            return np.load(f, allow_pickle=False)
        except (OSError, ValueError):
            return None  # a torn file from a killed run: recompute it

    @staticmethod
    def write(f: Path, emb: np.ndarray) -> None:
        f.parent.mkdir(exist_ok=True)
        tmp = f.with_name(f"{f.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, np.asarray(emb, dtype=np.float32), allow_pickle=False)
        os.replace(tmp, f)


# --------------------------------------------------------------------------- extraction
def deterministic_view(dataset: Any) -> Any:
    """The same samples through the deterministic transforms only (no augmentation)."""
    view = getattr(dataset, "deterministic_view", None)
    if callable(view):
        return view()
    return dataset


def extract_features(engine: Engine, dataset: Any) -> np.ndarray:
    """(N, F) float32 embeddings of ``dataset`` in order: cached ones are read, the rest computed
    (under DDP each rank computes its share of the missing images) and cached by rank 0.

    One (N, F) matrix is allocated and filled in place, from the cache and from each inference
    batch, so memory is that matrix (F floats per image) and nothing else of size N.
    """
    model = engine.model
    cache = FeatureCache(
        feature_cache_root(engine.cfg, engine.workdir),
        feature_model_key(engine.cfg, model, engine.amp_dtype),
    )
    # Keyed per record, slice included: 2.5D rows of one volume are different inputs.
    files = [cache.file_for(image_file_key(r["image"], r.get("slice"))) for r in dataset.records]
    out = np.empty((len(files), int(getattr(model, "num_features", 0))), np.float32)
    missing = []
    for i, f in enumerate(files):
        emb = cache.read(f)
        if emb is not None and emb.shape == out.shape[1:]:
            out[i] = emb
        else:
            missing.append(i)
    if missing:
        sub = torch.utils.data.Subset(deterministic_view(dataset), missing)
        engine.infer(lambda m, x: m.forward_features(x), sub, out=out, rows_at=np.array(missing))
        if engine.dist.is_main:
            for i in missing:
                cache.write(files[i], out[i])
    engine.dist.barrier()
    return out


# --------------------------------------------------------------------------- heads
def _head_linear(model: MedtlModel) -> nn.Linear:
    """The single nn.Linear of the head stage (logistic coefficients go there)."""
    head_params = {id(p) for p in model.stage_groups()[-1][1]}
    linears = [
        m for m in model.modules() if isinstance(m, nn.Linear) and id(m.weight) in head_params
    ]
    if len(linears) != 1:
        raise ConfigError(
            f"strategy.head_trainer=logistic needs a linear head, but the head has "
            f"{len(linears)} linear layers (model.head={getattr(model, 'head_kind', 'mlp')}); "
            "set model.head=linear or strategy.head_trainer=torch"
        )
    return linears[0]


def _standardise(feats: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(feats - mu) / sd`` in float64 with the per-feature mean ``mu`` and one global ``sd``,
    the same values as the whole-array expression but written row chunk by row chunk, so the
    float64 result is the only matrix of the features' size made beside them."""
    mu = feats.mean(0)
    sd = np.full(feats.shape[1], float((feats - mu).std()) + 1e-12)
    z = np.empty(feats.shape, np.float64)
    for s in range(0, len(feats), chunk):
        z[s : s + chunk] = (feats[s : s + chunk] - mu) / sd
    return z, mu, sd


def fit_logistic(
    feats: np.ndarray,
    labels: np.ndarray,
    task: str,
    num_classes: int,
    c: float,
    balanced: bool,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Logistic regression on centred, globally scaled features; returns head (weight (C, F), bias (C,))
    in the model's logit space (binary: two softmax columns whose difference is the LR logit;
    standardisation folded into the weights)."""
    from sklearn.linear_model import LogisticRegression

    # Centre per feature but scale by one global factor: per-feature standardisation would
    # give near-constant features (dead channels) enormous weights once folded into the head,
    # and those explode on any input where the channel moves (augmentation, BN updates).
    z, mu, sd = _standardise(feats)
    cw = "balanced" if balanced else None

    def one(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lr = LogisticRegression(C=c, class_weight=cw, max_iter=2000, random_state=seed)
        lr.fit(z, y)
        return lr.coef_, lr.intercept_

    f = feats.shape[1]
    if task == "multilabel":
        y: np.ndarray = labels.reshape(len(labels), -1).astype(int)
        w = np.zeros((num_classes, f))
        b = np.zeros(num_classes)
        for k in range(num_classes):
            if 0 < y[:, k].sum() < len(y):
                coef, icpt = one(y[:, k])
                w[k], b[k] = coef[0], icpt[0]
            else:  # a label never (or always) present: constant prevalence
                prev = np.clip(y[:, k].mean(), 1e-3, 1 - 1e-3)
                b[k] = np.log(prev / (1 - prev))
    else:
        y = labels.astype(int).reshape(-1)
        present = np.unique(y)
        w = np.zeros((num_classes, f))
        b = np.full(num_classes, -30.0)  # classes absent from training are never predicted
        if len(present) == 1:
            b[present[0]] = 0.0
        else:
            coef, icpt = one(y)
            if len(present) == 2:
                # sklearn's binary model is one logit for the larger class; split it evenly.
                lo, hi = present
                b[lo], b[hi] = -icpt[0] / 2, icpt[0] / 2
                w[lo], w[hi] = -coef[0] / 2, coef[0] / 2
            else:
                w[present], b[present] = coef, icpt
    w_model = w / sd[None, :]
    b_model = b - w_model @ mu
    return w_model.astype(np.float32), b_model.astype(np.float32)


@torch.no_grad()
def set_linear_head(model: MedtlModel, weight: np.ndarray, bias: np.ndarray) -> None:
    """Copy (C, F) weights and (C,) bias into the model's linear head."""
    lin = _head_linear(model)
    lin.weight.copy_(torch.as_tensor(weight, dtype=lin.weight.dtype))
    lin.bias.copy_(torch.as_tensor(bias, dtype=lin.bias.dtype))


def _head_logits(engine: Engine, feats: np.ndarray) -> np.ndarray:
    model = engine.model
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model.forward_head(torch.from_numpy(feats).to(engine.device)).float().cpu().numpy()
    model.train(was)
    return out


def _head_probs(engine: Engine, feats: np.ndarray) -> np.ndarray:

    return probabilities(_head_logits(engine, feats), engine.task)


def _eval_row(
    engine: Engine, feats: np.ndarray, labels: np.ndarray, prefix: str
) -> dict[str, float]:

    logits = _head_logits(engine, feats)
    y = torch.as_tensor(labels)
    y = y.float() if engine.task == "multilabel" else y.long().view(-1)
    with torch.no_grad():
        loss = float(
            engine.loss_fn(torch.from_numpy(logits).to(engine.device), y.to(engine.device))
        )
    probs = probabilities(logits, engine.task)
    return {f"{prefix}_loss": loss, f"{prefix}_auroc": auroc(labels, probs, engine.task)}


def train_torch_head(
    engine: Engine,
    xtr: np.ndarray,
    ytr: np.ndarray,
    xva: np.ndarray | None,
    yva: np.ndarray | None,
    epochs: int,
    phase: str,
) -> list[dict[str, Any]]:
    """Train the model's own head on cached features (AdamW at ``train.lr``, configured loss,
    sampler seeded by seed + epoch); keeps the best epoch by ``train.monitor``."""
    from medtl.training.sampling import build_train_sampler

    model, cfg = engine.model, engine.cfg
    head_params = list(model.stage_groups()[-1][1])
    opt = torch.optim.AdamW(head_params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    xt = torch.from_numpy(xtr).to(engine.device)
    yt = torch.as_tensor(ytr).to(engine.device)
    yt = yt.float() if engine.task == "multilabel" else yt.long().view(-1)
    ds = torch.utils.data.TensorDataset(xt, yt)
    rows: list[dict[str, Any]] = []
    best, best_state, bad = None, None, 0
    sign = -1.0 if cfg.train.monitor == "val_loss" else 1.0
    patience = cfg.train.early_stopping_patience
    for epoch in range(epochs):
        sampler = build_train_sampler(
            ds,
            ytr,
            engine.task,
            mode=cfg.train.sampler,
            weighting=cfg.train.sampler_weighting,
            beta=cfg.train.effective_beta,
            seed=cfg.seed,
            epoch=epoch,
        )
        order = torch.as_tensor(list(sampler))
        model.train()
        total = 0.0
        for s in range(0, len(order), cfg.train.batch_size):
            idx = order[s : s + cfg.train.batch_size].to(engine.device)
            if len(idx) < 2 and len(order) > 1:
                continue  # BatchNorm in an MLP head cannot train on a batch of one
            loss = engine.loss_fn(model.forward_head(xt[idx]).float(), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        row: dict[str, Any] = {
            "epoch": epoch,
            "phase": phase,
            "train_loss": total / max(len(order), 1),
        }
        if xva is not None and yva is not None and len(xva):
            row.update(_eval_row(engine, xva, yva, "val"))
            score = sign * row[cfg.train.monitor]
            if best is None or score > best:
                best, bad = score, 0
                best_state = {id(p): p.detach().clone() for p in head_params}
                row["best"] = True
            else:
                bad += 1
        rows.append(row)
        if patience is not None and best_state is not None and bad >= patience:
            break
    if best_state is not None:
        with torch.no_grad():
            for p in head_params:
                p.copy_(best_state[id(p)])
    return rows


def fit_head(
    engine: Engine, epochs: int, phase: str
) -> tuple[list[dict[str, Any]], np.ndarray | None]:
    """Extract (or read) features and fit the head on them; returns history rows and val features."""
    cfg = engine.cfg
    for p in engine.model.parameters():
        p.requires_grad_(False)
    xtr = extract_features(engine, engine.train_ds)
    xva = extract_features(engine, engine.val_ds) if engine.val_ds is not None else None
    if cfg.strategy.head_trainer == "logistic":
        w, b = fit_logistic(
            xtr,
            engine.train_labels,
            engine.task,
            engine.num_classes,
            cfg.strategy.logistic_c,
            cfg.train.loss == "weighted_ce",
            cfg.seed,
        )
        set_linear_head(engine.model, w, b)
        row: dict[str, Any] = {
            "epoch": 0,
            "phase": phase,
            **_eval_row(engine, xtr, engine.train_labels, "train"),
        }
        row.pop("train_auroc", None)
        if xva is not None and engine.val_labels is not None:
            row.update(_eval_row(engine, xva, engine.val_labels, "val"))
        rows = [row]
    else:
        for p in engine.model.stage_groups()[-1][1]:
            p.requires_grad_(True)
        rows = train_torch_head(
            engine, xtr, engine.train_labels, xva, engine.val_labels, epochs, phase
        )
    for p in engine.model.parameters():
        p.requires_grad_(True)
    return rows, xva


def probe_head(engine: Engine, epochs: int) -> list[dict[str, Any]]:
    """LP-FT's linear probe: fit the head on frozen features before fine-tuning."""
    rows, _ = fit_head(engine, epochs, phase="probe")
    return rows


def run_feature_extraction(engine: Engine) -> None:
    """The ``feature_extraction`` strategy: features once, head on features, no epoch loop."""
    rows, xva = fit_head(engine, engine.cfg.train.epochs, phase="head")
    engine.history = rows
    best = [r["epoch"] for r in rows if r.get("best")]
    engine.keep_best(best[-1] if best else rows[-1]["epoch"])
    if xva is not None:
        engine.val_probs = _head_probs(engine, xva)
        engine.val_probs_final = True
    if engine.log_fn is not None and engine.dist.is_main:
        for r in rows:
            metrics = {k: v for k, v in r.items() if k not in ("epoch", "best", "phase")}
            engine.log_fn(metrics, r["epoch"])
