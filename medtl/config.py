"""Typed pipeline configuration: one pydantic schema that mirrors ``pipelines/*.yaml``.

Every stage receives these objects, never raw dicts. Unknown keys are errors that name
the key and list the valid ones; ``--set a.b=c`` overrides are parsed with YAML rules.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medtl.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Where the images come from and how labels are read."""

    manifest: str | None = None
    label_column: str = "label"
    patient_column: str = "patient_id"
    study_column: str = "study_id"  # study-level results when the manifest has it
    classes: list[str] | None = None  # explicit class order; default: sorted unique labels
    positive_class: str | None = None  # binary: the finding (moved last = "positive" in reports)
    task: Literal["auto", "binary", "multiclass", "multilabel"] = "auto"
    label_separator: str = "|"  # multi-label cells: "effusion|nodule"
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0)
    cache_dir: str | None = None  # default: <run>/../.cache or $MEDTL_CACHE_DIR
    cache: Literal["disk", "memory", "none"] = "disk"
    num_workers: int | Literal["auto"] = "auto"
    # decoding processes that fill the cache; auto = this process's cores (its share under
    # torchrun); 0 = decode in this process (no crash isolation)
    prepare_workers: int | Literal["auto"] = "auto"
    # cache=disk: packed = memory-mapped shards (fast reads), persistent = MONAI .pt files
    cache_store: Literal["packed", "persistent"] = "packed"
    decode_timeout_s: float = Field(300.0, gt=0)  # a file decoding longer is quarantined
    # A header implying more float32 pixel bytes than this is refused before decoding
    # (medtl.io.base.DEFAULT_MAX_IMAGE_BYTES, 2 GiB: a 2,000-slice 512x512 CT fits).
    max_image_bytes: int = Field(2 * 2**30, gt=0)
    # DICOM BurnedInAnnotation (0028,0301) = YES: names can be drawn into the pixels, where
    # no header whitelist sees them. quarantine: leave such images out (the default);
    # allow: use them (galleries, Grad-CAM and MLflow artifacts then show their pixels).
    burned_in_annotation: Literal["quarantine", "allow"] = "quarantine"
    # Random augmentation: per image in the loader workers (cpu) or as tensor ops on the batch
    # after the host->device copy (cuda, medtl/augment.py); auto = cuda when training on CUDA.
    augment_device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("prepare_workers")
    @classmethod
    def _workers(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError(f"must be 'auto', 0 (in this process) or a positive count, got {v}")
        return v


class WindowConfig(_Section):
    center: float
    width: float = Field(gt=0)


class TransformConfig(_Section):
    """MONAI preprocessing: the deterministic part is cached, the random part is not."""

    preset: Literal["cxr_2d", "ct_2p5d", "ct_3d"] = "cxr_2d"
    spatial_size: list[int] = Field(default_factory=lambda: [224, 224])
    window: str | WindowConfig | None = None  # preset name, "file", or {center, width}
    augment: Literal["none", "light", "standard"] = "light"
    slices: int = Field(3, ge=1)  # 2.5D: adjacent slices as channels
    pixdim: list[float] | None = None  # 3D: resample spacing in mm
    orientation: str | None = "RAS"  # 3D / NIfTI reorientation; null keeps file order
    percentile_clip: list[float] | None = Field(default_factory=lambda: [0.5, 99.5])

    @field_validator("spatial_size")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(s <= 0 for s in v):
            raise ValueError(f"spatial_size must be positive integers, got {v}")
        return v


class ModelConfig(_Section):
    """Backbone, its pretrained weights and the new head."""

    backbone: str = "tf_efficientnet_lite0"
    # "default" = the entry's own default tag (imagenet for timm nets, radimagenet for the
    # RadImageNet entries); or a tag of the entry, a file path, or null (needs allow_random_init)
    weights: str | None = "default"
    weights_path: str | None = None  # explicit local file; overrides the weights directory
    allow_random_init: bool = False  # must be set to train without weights; never silent
    in_channels: int = Field(1, ge=1)
    channel_adapt: Literal["fold_sum", "fold_mean", "repeat"] = "fold_sum"
    # cosine: L2-normalise the features, then the linear layer (the few_shot classifiers)
    head: Literal["linear", "mlp", "cosine"] = "linear"
    head_hidden: int = Field(256, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    inflate_3d: bool = False  # 3D: inflate a 2D ImageNet backbone (I3D) instead of a MONAI 3D net


class StrategyConfig(_Section):
    """Transfer strategy; each name is one registry entry in ``medtl.training.strategies``."""

    name: Literal["feature_extraction", "fine_tune", "gradual_unfreeze", "lp_ft", "few_shot"] = (
        "fine_tune"
    )
    # feature_extraction
    head_trainer: Literal["logistic", "torch"] = "logistic"
    logistic_c: float = Field(1.0, gt=0)
    # fine_tune
    freeze_stages: int = Field(0, ge=0)  # first K stages (stem counts as one) stay frozen
    bn: Literal["freeze_frozen", "train_all", "freeze_all"] = "freeze_frozen"
    # gradual_unfreeze
    head_only_epochs: int = Field(1, ge=0)
    unfreeze_every: int = Field(1, ge=1)  # epochs between unfreezing the next stage from the top
    layer_lr_decay: float = Field(0.5, gt=0, le=1.0)  # lr multiplier per stage going down
    # lp_ft
    probe_epochs: int = Field(2, ge=0)
    ft_lr_scale: float = Field(0.1, gt=0)
    # few_shot (`medtl fewshot`; a shot is one labelled patient, all of its images)
    fewshot_classifier: Literal["logistic", "prototype"] = "logistic"  # see BENCHMARKS.md
    fewshot_c: float = Field(0.01, gt=0)  # logistic: inverse L2 strength (small = strong)
    fewshot_scale: float = Field(10.0, gt=0)  # prototype: logits = scale * cosine similarity
    fewshot_shots: list[int] = Field(default_factory=lambda: [1, 5, 10])  # patients per class
    fewshot_episodes: int = Field(200, ge=1)
    fewshot_ways: int | None = Field(None, ge=2)  # classes per episode; null: every class
    fewshot_query: int | None = Field(None, ge=1)  # query patients per class; null: the rest


class TrainConfig(_Section):
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    scheduler: Literal["cosine", "onecycle", "none"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    grad_accum: int = Field(1, ge=1)
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    channels_last: bool = True
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    early_stopping_patience: int | None = 5
    monitor: Literal["val_auroc", "val_loss"] = "val_auroc"
    sampler: Literal["balanced", "random"] = "balanced"
    sampler_weighting: Literal["inverse", "sqrt", "effective"] = "inverse"
    effective_beta: float = Field(0.999, gt=0, lt=1)
    loss: Literal["ce", "weighted_ce", "focal"] = "ce"
    focal_gamma: float = Field(2.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    checkpoint_every: int = Field(1, ge=1)  # epochs between resumable checkpoints
    progress: bool = True


class CVConfig(_Section):
    folds: int = Field(5, ge=2)
    fold_column: str = "fold"  # honoured when present in the manifest
    test_fraction: float = Field(0.0, ge=0, lt=1)  # patient-level held-out test split
    split_column: str = "split"  # rows with split == "test" are held out
    threshold: Literal["youden", "sensitivity"] = "youden"
    target_sensitivity: float = Field(0.9, gt=0, le=1)
    only_folds: list[int] | None = None  # run a subset of folds (debugging)
    # How each fold's model (and the refit) picks its epoch, early-stops, is calibrated and gets
    # its threshold: "inner" on a patient-grouped inner validation split of its own training
    # patients; "fixed" trains train.epochs with no epoch choice (calibration and threshold
    # still on the inner split); "outer" on the reported fold itself (optimistic; comparison).
    selection: Literal["inner", "fixed", "outer"] = "inner"
    inner_fraction: float = Field(0.25, gt=0, lt=1)
    # Leave-one-group-out CV over this manifest column (typically "site"): one fold per value,
    # cv.folds is then ignored (the job sets it to the number of values).
    group_by: str | None = None


class EvaluationConfig(_Section):
    bootstrap: int = Field(1000, ge=0)
    ci: float = Field(0.95, gt=0, lt=1)
    subgroups: list[str] = Field(default_factory=lambda: ["site"])
    calibration_bins: int = Field(10, ge=2)
    gallery_per_cell: int = Field(4, ge=0)  # report gallery: cases per TP/FP/FN/TN cell; 0: off
    # Recalibration of the probabilities: auto = platt for binary/multi-label, temperature for
    # multiclass. Fitted where thresholds are chosen (see cv.selection), never on the fold it
    # is reported on.
    calibration: Literal["auto", "none", "temperature", "platt", "isotonic"] = "auto"
    # Study- and patient-level results aggregate their images' probabilities this way.
    aggregate: Literal["mean", "max"] = "mean"


class DomainAdaptationConfig(_Section):
    """Adapting to another site's images, from an unlabelled (or labelled) target manifest.

    ``adabn`` and ``tent`` adapt the trained model afterwards (BatchNorm statistics; BatchNorm
    affine parameters by entropy minimisation); ``coral`` and ``dann`` train jointly with target
    batches beside the source batches (fine-tune strategies only). Target labels, when the
    manifest has them, are used only to evaluate before/after; never to train.
    """

    method: Literal["none", "adabn", "coral", "dann", "tent"] = "none"
    target_manifest: str | None = None
    weight: float = Field(1.0, ge=0)  # coral: loss weight; dann: the ramp's final weight
    dann_hidden: int = Field(256, ge=1)  # width of DANN's domain classifier
    tent_epochs: int = Field(1, ge=1)  # passes over the target images
    tent_lr: float = Field(1e-3, gt=0)


class TrackingConfig(_Section):
    enabled: bool = True
    uri: str | None = None  # default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in cwd
    artifact_location: str | None = None  # default ./mlartifacts beside the SQLite file
    experiment: str = "medtl"
    register_name: str | None = None  # register the model under this name after training
    log_model: bool = True


class CardConfig(_Section):
    """What only people know about a model, for its card (TRIPOD+AI items); all optional.

    Whatever is left unset is printed in the card as "not yet known", never as boilerplate.
    Also read from ``medtl register --card card.yaml`` (same keys; the file's values win).
    """

    intended_use: str | None = None  # the clinical question and the decision it supports
    intended_users: str | None = None  # who acts on the output (e.g. "thoracic radiologists")
    target_population: str | None = None  # patients and setting it is meant for
    contraindications: list[str] = Field(default_factory=list)  # where it must not be used
    outcome_definition: str | None = None  # what a positive label means
    reference_standard: str | None = None  # how the labels were established
    data_sources: list[str] = Field(default_factory=list)  # institutions, registries, archives
    data_dates: str | None = None  # when the images were acquired (e.g. "2016-01 to 2021-12")
    eligibility: str | None = None  # inclusion and exclusion criteria for patients and images
    missing_data: str | None = None  # how missing labels or images were handled
    known_limitations: list[str] = Field(default_factory=list)
    contact: str | None = None  # who answers questions about the model


class PipelineConfig(_Section):
    """The whole job. YAML files in ``pipelines/`` hold only differences from these defaults."""

    name: str = "medtl"
    description: str = ""
    seed: int = 42
    data: DataConfig = Field(default_factory=DataConfig)
    transforms: TransformConfig = Field(default_factory=TransformConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    cv: CVConfig = Field(default_factory=CVConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    domain_adaptation: DomainAdaptationConfig = Field(default_factory=DomainAdaptationConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    card: CardConfig = Field(default_factory=CardConfig)

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        n = len(self.transforms.spatial_size)
        want = 3 if self.transforms.preset == "ct_3d" else 2
        if n != want:
            raise ValueError(
                f"transforms.spatial_size has {n} values but preset "
                f"'{self.transforms.preset}' needs {want}"
            )
        _check_adaptation(self.domain_adaptation, self.strategy.name)
        return self

    @property
    def spatial_dims(self) -> int:
        return 3 if self.transforms.preset == "ct_3d" else 2

    def flat(self) -> dict[str, Any]:
        """Flattened ``a.b.c -> value`` view, for MLflow params and reports."""
        return flatten_dict(self.model_dump(mode="json"))

    def identity_view(self) -> dict[str, Any]:
        """The flattened config keys that decide what is computed (``NOT_IDENTITY`` left out):
        what two fold jobs of one run must agree on, and what ``--collect`` diffs."""
        return {k: v for k, v in self.flat().items() if not _not_identity(k)}

    def identity(self) -> str:
        """Short sha256 of :meth:`identity_view`: an output's identity is its config's.

        Where and how fast a job runs (cache folder, workers, device, tracking, the manifest's
        path, ``cv.only_folds``) and the card's text are left out, so fold jobs of one run and
        a resumed job share it; the job checks the manifests' content hashes itself."""
        blob = json.dumps(self.identity_view(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def full_identity(self) -> str:
        """Short sha256 of the whole resolved config, paths and workers included."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# Flattened config keys (a name ending in '.' is a whole section) that say where, how fast or under which label a job runs,
# never what it computes: left out of ``PipelineConfig.identity``. The manifests' paths are
# replaced by their content hashes, which the train job records beside the identity.
NOT_IDENTITY = (
    "card.",
    "description",
    "cv.only_folds",
    "data.manifest",
    "data.cache_dir",
    "data.cache",
    "data.num_workers",
    "data.prepare_workers",
    "data.cache_store",
    "domain_adaptation.target_manifest",
    "train.device",
    "train.progress",
    "tracking.",
)


def _not_identity(key: str) -> bool:
    """Whether a flattened key is in ``NOT_IDENTITY`` (a key, or a section ending in '.')."""
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in NOT_IDENTITY)


# Strategies that train the backbone in an epoch loop: where a joint adaptation loss can act.
JOINT_ADAPTATION_STRATEGIES = ("fine_tune", "gradual_unfreeze", "lp_ft")


def _check_adaptation(da: DomainAdaptationConfig, strategy: str) -> None:
    """coral/dann need a strategy that trains the backbone (the target is checked by the job)."""
    if da.method in ("coral", "dann") and strategy not in JOINT_ADAPTATION_STRATEGIES:
        raise ValueError(
            f"domain_adaptation.method '{da.method}' trains jointly with the backbone and does "
            f"not work with strategy.name '{strategy}'; use one of "
            f"{', '.join(JOINT_ADAPTATION_STRATEGIES)}, or method adabn/tent"
        )


def flatten_dict(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (config views for MLflow params and reports)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_dict(v, key + "."))
        else:
            out[key] = v
    return out


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_valid_keys(ann, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _explain(err: ValidationError, schema: type[BaseModel] | None = None) -> str:
    lines = []
    all_keys = _valid_keys(schema or PipelineConfig)
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
        if e["type"] == "extra_forbidden":
            parent = loc.rsplit(".", 1)[0] if "." in loc else ""
            siblings = (
                [k for k in all_keys if k.startswith(parent + ".")]
                if parent
                else [k.split(".")[0] for k in all_keys]
            )
            siblings = sorted(set(siblings))
            close = difflib.get_close_matches(loc, siblings, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            lines.append(
                f"unknown config key '{loc}'.{hint} Valid keys here: {', '.join(siblings)}"
            )
        else:
            got = e.get("input")
            msg = e["msg"]
            ctx = e.get("ctx") or {}
            if "expected" in ctx:
                msg = f"expected {ctx['expected']}"
            if loc:
                lines.append(f"config key '{loc}': {msg} (got {got!r})")
            else:
                lines.append(msg.removeprefix("Value error, "))
    return "; ".join(lines)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ``["train.epochs=2", "cv.folds=3"]`` into a nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override '{pair}' is not key=value (example: --set train.epochs=2)")
        key, raw = pair.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        node = nested
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{key}' conflicts with another override")
        node[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def build_config(
    raw: dict[str, Any] | None = None, overrides: list[str] | None = None
) -> PipelineConfig:
    """Validate a raw mapping plus ``key=value`` overrides into a :class:`PipelineConfig`."""
    data = _merge(raw or {}, parse_overrides(overrides or []))
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_explain(err)) from None


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> PipelineConfig:
    """Read a pipeline YAML (or only defaults when ``path`` is None) and apply overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"pipeline config '{p}' does not exist (see pipelines/ for examples)")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"pipeline config '{p}' is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(
                f"pipeline config '{p}' must be a mapping of sections, got {type(raw).__name__}"
            )
    return build_config(raw, overrides)


def load_card(path: str | Path) -> CardConfig:
    """Read a model card file (the keys of a pipeline's ``card:`` section, optionally under
    ``card:``), validated by the same schema: an unknown key is an error that names it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"card file '{p}' does not exist (example: pipelines/cards/cxr_nodule_card.yaml)"
        )
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"card file '{p}' is not valid YAML: {err}") from None
    if isinstance(raw, dict) and set(raw) == {"card"}:
        raw = raw["card"] or {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"card file '{p}' must be a mapping of card keys, got {type(raw).__name__}"
        )
    try:
        return CardConfig.model_validate(raw)
    except ValidationError as err:
        msg = _explain(err, CardConfig)
        raise ConfigError(f"card file '{p}': {msg}") from None
