"""A gallery of out-of-fold cases for clinical review: the most confident true and false
positives, false negatives and true negatives, each with its fold model's Grad-CAM overlay.

``select_cases`` picks the cases from the out-of-fold table (pure); ``render_gallery`` rebuilds
each case's input exactly as its fold model saw it (the evaluation transforms, the cached
deterministic output) and writes one PNG per case (image | overlay); ``write_gallery`` is the
train job's one call and returns the JSON-safe list the report reads from ``run_info["gallery"]``.

Pixels can carry burned-in identifiers (names, dates): the gallery is written only into the run
folder (``gallery/*.png``, named by cell and rank, never by image path) and its report.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from medtl.config import PipelineConfig
from medtl.errors import MedtlError, WeightsError

if TYPE_CHECKING:
    from medtl.jobs.prepare import TrainData
    from medtl.models.model import MedtlModel
    from medtl.transforms import TransformPair

log = logging.getLogger("medtl")

# Confusion-matrix cells, in the report's order.
CELLS = ("TP", "FP", "FN", "TN")
GALLERY_DIR = "gallery"
_CELL_WORDS = {
    "TP": "True positive",
    "FP": "False positive",
    "FN": "False negative",
    "TN": "True negative",
}


@dataclass(frozen=True)
class Case:
    """One out-of-fold image picked for the gallery; ``rank`` 1 is the most confident."""

    cell: str
    rank: int
    image: str  # the manifest's image column (the OOF table's key)
    patient_id: str  # the manifest's patient_id: already a pseudonym
    fold: int
    prob: float  # out-of-fold probability of the positive class
    label: str


@dataclass(frozen=True)
class GalleryItem:
    """A rendered case: its PNG and the shapes of the model input and of the Grad-CAM map."""

    cell: str
    rank: int
    image: str
    patient_id: str
    fold: int
    prob: float
    png: Path
    image_shape: tuple[int, ...]  # spatial shape of the network input
    overlay_shape: tuple[int, ...]

    def to_json(self, run_dir: str | Path) -> dict[str, Any]:
        """The ``run_info["gallery"]`` entry: plain JSON, ``png`` relative to ``run_dir``."""
        png = self.png.resolve().relative_to(Path(run_dir).resolve()).as_posix()
        return {
            "cell": self.cell,
            "rank": self.rank,
            "image": self.image,
            "patient_id": self.patient_id,
            "fold": self.fold,
            "prob": self.prob,
            "png": png,
            "image_shape": list(self.image_shape),
            "overlay_shape": list(self.overlay_shape),
        }


# ----------------------------------------------------------------------------- selection
def select_cases(oof: pd.DataFrame, positive_class: str, per_cell: int) -> list[Case]:
    """Up to ``per_cell`` most confident cases per cell (TP, FP, FN, TN), in that order.

    Binary tasks only: ``oof`` needs image, patient_id, fold, label, two ``prob_<class>``
    columns and ``pred`` (class names); anything else (multiclass, multi-label) gives ``[]``.
    TP/FP are ranked by highest positive probability, FN/TN by lowest; ties by image.
    """
    prob_cols = [c for c in oof.columns if str(c).startswith("prob_")]
    pos_col = f"prob_{positive_class}"
    if per_cell <= 0 or len(prob_cols) != 2 or pos_col not in prob_cols or "pred" not in oof:
        return []
    classes = {str(c)[len("prob_") :] for c in prob_cols}
    labels = oof["label"].astype(str)
    if not set(labels) <= classes:  # ``a|b`` or empty cells: a multi-label table
        return []
    frame = pd.DataFrame(
        {
            "image": oof["image"].astype(str).to_numpy(),
            "patient_id": oof["patient_id"].astype(str).to_numpy(),
            "fold": oof["fold"].astype(int).to_numpy(),
            "prob": oof[pos_col].astype(float).to_numpy(),
            "label": labels.to_numpy(),
            "actual": (labels == positive_class).to_numpy(),
            "called": (oof["pred"].astype(str) == positive_class).to_numpy(),
        }
    )
    frame = frame[np.isfinite(frame["prob"])]
    masks = {
        "TP": frame["actual"] & frame["called"],
        "FP": ~frame["actual"] & frame["called"],
        "FN": frame["actual"] & ~frame["called"],
        "TN": ~frame["actual"] & ~frame["called"],
    }
    cases: list[Case] = []
    for cell in CELLS:
        high_first = cell in ("TP", "FP")
        top = (
            frame[masks[cell]]
            .sort_values(
                ["prob", "image", "fold", "patient_id"],
                ascending=[not high_first, True, True, True],
                kind="mergesort",
            )
            .head(per_cell)
        )
        for rank, row in enumerate(top.itertuples(index=False), start=1):
            cases.append(
                Case(
                    cell=cell,
                    rank=rank,
                    image=str(row.image),
                    patient_id=str(row.patient_id),
                    fold=int(row.fold),
                    prob=float(row.prob),
                    label=str(row.label),
                )
            )
    return cases


def with_binary_pred(
    oof: pd.DataFrame, classes: Sequence[str], fold_thresholds: Mapping[Any, Any]
) -> pd.DataFrame:
    """``oof`` with ``pred`` at each row's fold threshold (the report's rule: positive at >=)."""
    from medtl.evaluation.metrics import row_thresholds

    out = oof.copy()
    p = out[f"prob_{classes[1]}"].to_numpy(dtype=float)
    thr = row_thresholds(out, dict(fold_thresholds), len(classes), "binary")[:, 1]
    out["pred"] = np.where(p >= thr, classes[1], classes[0])
    return out


# ----------------------------------------------------------------------------- fold models
def fold_model_loader(
    cfg: PipelineConfig, num_classes: int, run_dir: str | Path
) -> Callable[[int], MedtlModel]:
    """``load(k)``: fold ``k``'s model with its best weights (``folds/fold_<k>/best.pt``).

    Raises WeightsError when the fold has no (readable) best.pt.
    """
    import torch

    from medtl.models import create_model

    root = Path(run_dir)

    def load(k: int) -> MedtlModel:
        # medtl.jobs.folds.fold_dir's layout; Engine.keep_best writes {"model": state_dict, ...}
        # (the feature-extraction strategy too, after fitting its head).
        path = root / "folds" / f"fold_{k}" / "best.pt"
        if not path.is_file():
            raise WeightsError(f"fold {k} has no weights file {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model = create_model(
                cfg.model, num_classes, spatial_dims=cfg.spatial_dims, pretrained=False
            )
            model.load_state_dict(state["model"])
        except (RuntimeError, KeyError, TypeError) as err:
            raise WeightsError(f"{path} does not fit this run's model: {str(err)[:300]}") from None
        return model.eval()

    return load


# ----------------------------------------------------------------------------- rendering
def _by_fold(cases: Iterable[Case]) -> dict[int, list[Case]]:
    out: dict[int, list[Case]] = {}
    for c in cases:
        out.setdefault(c.fold, []).append(c)
    return out


def render_gallery(
    cases: Sequence[Case],
    records_by_image: Mapping[str, Mapping[str, Any]],
    model_for_fold: Callable[[int], MedtlModel],
    eval_transforms: TransformPair,
    cache_dir: str | Path | None,
    out_dir: str | Path,
    *,
    cache: Literal["disk", "memory", "none"] = "disk",
    class_index: int = 1,
) -> list[GalleryItem]:
    """One PNG per case (its input | Grad-CAM for ``class_index``), from that fold's model.

    A fold whose model cannot be loaded, or a case without a record, is skipped with a warning.
    """
    from monai.visualize import GradCAM

    from medtl.data import build_dataset
    from medtl.explain import gradcam_maps, last_conv_layer, write_overlay_png

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items: list[GalleryItem] = []
    for k, fold_cases in sorted(_by_fold(cases).items()):
        try:
            model = model_for_fold(k).cpu().eval()
        except (MedtlError, OSError) as err:
            log.warning("gallery: fold %d's %d case(s) skipped: %s", k, len(fold_cases), err)
            continue
        found = [c for c in fold_cases if c.image in records_by_image]
        for c in fold_cases:
            if c.image not in records_by_image:
                log.warning("gallery: no record for a fold %d case; skipped", k)
        if not found:
            continue
        records = [dict(records_by_image[c.image]) for c in found]
        ds = build_dataset(records, eval_transforms, cache_dir, cache)
        cam_op = GradCAM(nn_module=model, target_layers=last_conv_layer(model))  # hooks: once
        for i, c in enumerate(found):
            x = ds[i]["image"][None]
            cam = gradcam_maps(model, x, class_index, cam=cam_op)[0]
            dst = out / f"{c.cell.lower()}_{c.rank:02d}.png"
            write_overlay_png(x[0].numpy(), cam, f"{_CELL_WORDS[c.cell]}, p={c.prob:.3f}", dst)
            items.append(
                GalleryItem(
                    cell=c.cell,
                    rank=c.rank,
                    image=c.image,
                    patient_id=c.patient_id,
                    fold=c.fold,
                    prob=c.prob,
                    png=dst,
                    image_shape=tuple(int(s) for s in x.shape[2:]),
                    overlay_shape=tuple(int(s) for s in cam.shape),
                )
            )
    return sorted(items, key=lambda it: (CELLS.index(it.cell), it.rank))


def _records_by_image(records: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Records keyed by the OOF table's ``image`` (manifest value); shared keys are left out."""
    out: dict[str, Mapping[str, Any]] = {}
    shared: set[str] = set()
    for r in records:
        key = str(r["image_rel"])
        if key in out:
            shared.add(key)  # 2.5D slices of one volume: the OOF row cannot tell them apart
        out[key] = r
    if shared:
        log.warning("gallery: %d image(s) have several records (slices); left out", len(shared))
    return {k: v for k, v in out.items() if k not in shared}


def write_gallery(
    run_dir: str | Path,
    cfg: PipelineConfig,
    data: TrainData,
    oof: pd.DataFrame,
    per_cell: int,
    fold_thresholds: Mapping[Any, Any] | None = None,
) -> list[dict[str, Any]]:
    """Select, render into ``run_dir/gallery/`` and return ``run_info["gallery"]`` (binary 2D).

    ``oof`` is the pooled out-of-fold table; without a ``pred`` column ``fold_thresholds``
    (``{fold: threshold}``) derives it. Never raises: a failure is logged and gives ``[]``.
    """
    if per_cell <= 0:
        return []
    if data.task != "binary" or cfg.spatial_dims != 2:
        log.info("gallery: binary 2D tasks only (this run: %s, %dD)", data.task, cfg.spatial_dims)
        return []
    try:
        if "pred" not in oof.columns:
            if fold_thresholds is None:
                raise MedtlError("the gallery needs oof['pred'] or the fold thresholds")
            oof = with_binary_pred(oof, data.classes, fold_thresholds)
        cases = select_cases(oof, data.classes[1], per_cell)
        out_dir = Path(run_dir) / GALLERY_DIR
        for old in out_dir.glob("*.png") if out_dir.is_dir() else ():
            old.unlink()  # a previous gallery in this folder (a rerun)
        items = render_gallery(
            cases,
            _records_by_image(data.train_pool),
            fold_model_loader(cfg, len(data.classes), run_dir),
            data.transforms.eval,
            data.cache_dir,
            out_dir,
            cache=cfg.data.cache,
        )
    except Exception as err:  # noqa: BLE001 - the gallery is an extra: never fail the job
        log.warning("gallery: not written (%s: %s)", type(err).__name__, err, exc_info=True)
        return []
    return [it.to_json(run_dir) for it in items]
