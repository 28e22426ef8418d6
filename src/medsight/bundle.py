"""A trained model is a bundle folder, and inference rebuilds everything from it:

    config.yaml     the resolved run configuration
    model.pt        best weights (chosen on validation)
    bundle.json     the typed contract (:class:`BundleMeta`): model spec, task, classes, preprocessing recipe,
                    input shape, threshold and its rule, temperature, TTA, OOD reference, training summary, and
                    the integrity manifest (sha256 of every artefact and of every field of bundle.json itself,
                    optionally HMAC-signed)
    history.csv     one row per epoch
    metrics.json    per split, each metric's value (and CI where computed)

``load_bundle`` validates ``bundle.json`` once (one line naming the field when a value is invalid), checks every
byte against the manifest written at publish (one line naming the artefact or field that changed), and returns an
immutable :class:`Bundle`. Bundles of the previous format (``medsight-bundle/1``) load with a one-line note.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import nn

from medsight import __version__
from medsight.errors import ConfigError, MedsightError, choices_message
from medsight.models import create_model
from medsight.tasks import KINDS, TASK_TYPES, Task
from medsight.utils import atomic_torch_save, json_safe, sha256_file, write_json

log = logging.getLogger("medsight.bundle")

FORMAT: Final = "medsight-bundle/2"
SCHEMA_VERSION: Final = 2
#: formats written by earlier releases that still load (migrated in memory, with a one-line note)
LEGACY_FORMATS = ("medsight-bundle/1",)
#: the environment variable holding the key that signs bundles at publish and is checked at load
KEY_ENV = "MEDSIGHT_BUNDLE_KEY"
#: keys of bundle.json that hold the manifest itself (everything else is covered by it)
_SEAL_KEYS = ("integrity",)

_SHA256 = r"^[0-9a-f]{64}$"


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Part):
    """The network ``models.create_model`` builds (one member of an ensemble)."""
    name: str
    spatial_dims: Literal[2, 3]
    in_channels: int = Field(ge=1)
    num_outputs: int = Field(ge=1)
    input_size: list[int]
    stem: str = "auto"
    width: float = Field(1.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)


class InputSpec(_Part):
    spatial_dims: Literal[2, 3]
    channels: int = Field(ge=1)
    size: list[int]


class Recipe(_Part):
    """The preprocessing recipe (``data/preprocess.make``), replayed on every input."""
    version: int
    spatial_dims: Literal[2, 3]
    size: list[int]
    channels: Literal[1, 3]
    intensity: str
    window: Optional[Union[str, list[float]]] = None
    percentiles: list[float] = [0.5, 99.5]
    range: Optional[list[float]] = None
    resize: str
    source: Optional[dict[str, Any]] = Field(None, description="where the data came from ({'medmnist': name, "
                                                               "'size': px} or {'kind': 'folder'|'manifest'})")


class CalibrationSummary(_Part):
    split: str = "val"
    temperature: float = Field(gt=0)
    ece_before: Optional[float] = None
    ece_after: Optional[float] = None


class OODRef(_Part):
    """The OOD detector: its file in the bundle (hashed in ``files``), score, quantile and flagging threshold."""
    file: str
    score: str
    quantile: float
    threshold: float


class DataFacts(_Part):
    positive_class: Optional[str] = None
    positive_class_source: Optional[str] = None
    split_origin: Optional[str] = None
    native_size: Optional[dict[str, Any]] = Field(None, description="median/min/max of the files' own size and the "
                                                                    "resize factor (data/folders)")
    leakage: Optional[dict[str, Any]] = Field(None, description="the leakage check's findings (data/splits)")


class EnsembleMember(_Part):
    auc: Optional[float] = None
    accuracy: Optional[float] = None


class EnsembleSplit(_Part):
    members: list[EnsembleMember]
    mean_spread: Optional[float] = None
    max_spread: Optional[float] = None


class EnsembleInfo(_Part):
    members: int = Field(ge=1)
    seeds: list[int] = []
    best_epochs: list[int] = []
    epochs_run: list[int] = []
    stopped_early: list[bool] = []
    best_values: list[Optional[float]] = []
    workers: Optional[int] = None
    splits: Optional[dict[str, EnsembleSplit]] = None


class PretrainedInfo(_Part):
    source: str
    origin: str
    file: Optional[str] = Field(None, description="the weights file's name (a package's or the download cache's)")
    sha256: Optional[str] = None
    head: Optional[str] = None
    loaded: Optional[int] = None
    adapted: Any = Field(None, description="first-conv tensors adapted to the model's channels (pretrained.load_into)")
    skipped: Optional[int] = None
    weight_tensors: Optional[int] = None
    filled: Optional[int] = None


class AutoRecipeInfo(_Part):
    rule: str
    applied: dict[str, Any] = Field(default_factory=dict, description="setting -> value the rule filled in")
    given: dict[str, str] = Field(default_factory=dict, description="settings the user gave -> where from (kept)")
    reasons: list[str] = []


class FusionSpec(_Part):
    """An image + clinical model (``fusion.fusion_meta``)."""
    mode: str
    n_tab: int = Field(ge=0)
    num_outputs: int = Field(ge=1)
    hidden: int = 32
    dropout: float = 0.0
    columns: list[str] = []
    tabular: dict[str, Any] = Field(default_factory=dict, description="the fitted TabularEncoder (to_dict)")


class ReviewRule(_Part):
    """When a result is flagged for review (written by the review-rule calibration)."""
    rule: str
    margin: float = Field(ge=0)
    target_share: float = Field(ge=0, le=1)
    val_share: float = Field(ge=0, le=1)


class Integrity(_Part):
    """The manifest: sha256 of every other field of bundle.json (canonical JSON), ``digest`` over those, and an
    optional HMAC-SHA256 of ``digest`` with the publisher's key (:data:`KEY_ENV`)."""
    fields: dict[str, str]
    digest: str = Field(pattern=_SHA256)
    signature: Optional[str] = None


class BundleCard(BaseModel):
    """The fields of ``bundle.json`` that the service's model card shows as they are (``serve.schemas.ModelInfo``
    inherits them: one definition, one description)."""
    model_config = ConfigDict(frozen=True)

    task: str = Field(description=f"the task kind: {', '.join(TASK_TYPES)}")
    classes: list[str] = Field(min_length=1, description="class names in output order (binary: the positive class "
                                                         "is classes[1])")
    threshold: Optional[Union[float, list[float]]] = Field(None, description="operating threshold used for decisions "
                                                           "(binary: one number; multilabel: one per label; argmax "
                                                           "tasks: null)")
    threshold_rule: Optional[str] = Field(None, description="the rule that chose the threshold on the validation "
                                                            "split (youden, f1, sens=0.95, ...) or a fixed number")
    temperature: float = Field(1.0, gt=0, description="calibration temperature applied to the logits")
    data: Optional[str] = Field(None, description="the data the model was trained on")
    created: Optional[str] = Field(None, description="when the bundle was published (UTC, ISO 8601)")
    medsight_version: Optional[str] = Field(None, description="the medsight release that published it")

    @field_validator("temperature", mode="before")
    @classmethod
    def _temperature_default(cls, v):
        return 1.0 if v is None else v

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        if v not in KINDS:
            raise ValueError(choices_message("task", v, KINDS))
        return v

    @field_validator("threshold_rule")
    @classmethod
    def _known_rule(cls, v):
        if v is not None:
            from medsight.metrics import parse_operating_point

            parse_operating_point(v)
        return v


class BundleMeta(BundleCard):
    """``bundle.json``, typed. Validated once by :func:`load_bundle`; immutable."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["medsight-bundle/2"] = FORMAT
    schema_version: Literal[2] = SCHEMA_VERSION
    model: ModelSpec
    input: InputSpec
    preprocessing: Recipe
    threshold_detail: Optional[dict[str, Any]] = Field(None, description="how the threshold was placed and how sure "
                                                       "it is: metrics.operating_point_detail (rule, placement, "
                                                       "optimal_range, ci, n_boot, warnings)")
    best_epoch: Optional[int] = None
    monitor: Optional[str] = None
    train_seconds: Optional[float] = None
    tta_flip: list[int] = []
    data_facts: Optional[DataFacts] = None
    training_summary: list[str] = []
    calibration: Optional[CalibrationSummary] = None
    ood: Optional[OODRef] = None
    warnings: list[str] = []
    fusion: Optional[FusionSpec] = None
    auto_recipe: Optional[AutoRecipeInfo] = None
    ensemble: Optional[EnsembleInfo] = None
    pretrained: Optional[PretrainedInfo] = None
    review: Optional[ReviewRule] = None
    files: dict[str, str] = Field(default_factory=dict, description="artefact -> sha256, checked at load")
    integrity: Optional[Integrity] = None

    @field_validator("files")
    @classmethod
    def _hex_digests(cls, v: dict[str, str]) -> dict[str, str]:
        import re

        for name, digest in v.items():
            if not re.fullmatch(_SHA256, str(digest)) or "/" in name or name.startswith("."):
                raise ValueError(f"entry {name!r} must be a file name with a sha256 hex digest")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        task = Task(self.task, len(self.classes))  # ConfigError (a ValueError-like refusal) on a bad class count
        task.check_threshold(self.threshold)
        if self.model.num_outputs != task.num_outputs and self.fusion is None:
            raise ValueError(f"model.num_outputs {self.model.num_outputs} does not fit a {self.task} task with "
                             f"{len(self.classes)} classes ({task.num_outputs} outputs)")
        bad = [a for a in self.tta_flip if not 1 <= a <= self.model.spatial_dims]
        if bad:
            raise ValueError(f"tta_flip axes {bad} are not spatial axes 1..{self.model.spatial_dims}")
        return self

    # ------------------------------------------------------------------------------------------ derived
    @property
    def task_spec(self) -> Task:
        return Task(self.task, len(self.classes))

    @property
    def positive_class(self) -> str | None:
        return self.task_spec.positive_class(self.classes)


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def field_digests(raw: dict) -> dict[str, str]:
    """sha256 of each field of a ``bundle.json`` (canonical JSON), the manifest itself left out."""
    return {k: _sha(_canonical(v)) for k, v in sorted(raw.items()) if k not in _SEAL_KEYS}


def _digest_of(fields: dict[str, str]) -> str:
    return _sha(_canonical(fields))


def _bundle_key() -> bytes | None:
    key = os.environ.get(KEY_ENV)
    return key.encode() if key else None


def seal(raw: dict) -> dict:
    """The integrity manifest of ``raw`` (a JSON-able bundle.json without one), HMAC-signed when :data:`KEY_ENV`
    is set."""
    fields = field_digests(raw)
    digest = _digest_of(fields)
    key = _bundle_key()
    sig = hmac.new(key, digest.encode(), hashlib.sha256).hexdigest() if key else None
    return {"fields": fields, "digest": digest, "signature": sig}


def _check_seal(raw: dict, meta_path: Path) -> str:
    """Refuse a bundle.json whose fields differ from the manifest written at publish (one line naming them), or
    whose signature does not verify with :data:`KEY_ENV`; returns the digest."""
    integ = raw.get("integrity")
    if not isinstance(integ, dict) or not isinstance(integ.get("fields"), dict):
        raise MedsightError(f"{meta_path}: field 'integrity' is missing or malformed: the manifest written at "
                            "publish is gone, so its decision fields cannot be trusted; retrain or restore it")
    want, got = integ["fields"], field_digests(raw)
    changed = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    if changed:
        what = ", ".join(f"'{k}'" + (" (added)" if k not in want else " (removed)" if k not in got else "")
                         for k in changed)
        raise MedsightError(f"{meta_path}: field{'s' if len(changed) > 1 else ''} {what} changed after the bundle "
                            "was published (sha256 does not match its manifest); restore the bundle or retrain")
    digest = _digest_of(want)
    if integ.get("digest") != digest:
        raise MedsightError(f"{meta_path}: field 'integrity.digest' does not match the manifest's field digests: "
                            "the manifest was edited; restore the bundle or retrain")
    key = _bundle_key()
    if key is not None:
        sig = integ.get("signature")
        if not sig:
            raise MedsightError(f"{meta_path}: the bundle is not signed, and {KEY_ENV} is set: publish it with the "
                                "key (retrain), or unset the key to load unsigned bundles")
        if not hmac.compare_digest(str(sig), hmac.new(key, digest.encode(), hashlib.sha256).hexdigest()):
            raise MedsightError(f"{meta_path}: field 'integrity.signature' does not verify with {KEY_ENV}: the bundle "
                                "was published with another key or altered")
    return digest


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle: its folder, the validated ``bundle.json`` and the network. Immutable.

    ``weights_sha256`` (of ``model.pt``, checked at load) and ``digest`` (over every field of bundle.json, the
    artefacts' sha256 included) are computed once by :func:`load_bundle`; ``None`` for a bundle being built."""
    path: Path
    meta: BundleMeta
    model: nn.Module
    weights_sha256: Optional[str] = field(default=None, compare=False)
    digest: Optional[str] = field(default=None, compare=False)

    @classmethod
    def draft(cls, path: str | Path, meta: dict, model: nn.Module) -> "Bundle":
        """A bundle being built (by the pipeline, in its staging folder): ``meta`` validated, no digests yet."""
        return cls(path=Path(path), meta=validate_meta(meta), model=model)

    @property
    def task(self) -> Task:
        return self.meta.task_spec

    @property
    def classes(self) -> list[str]:
        return list(self.meta.classes)

    @property
    def threshold(self) -> float | list[float] | None:
        return self.meta.threshold

    @property
    def temperature(self) -> float:
        return float(self.meta.temperature)

    @property
    def fusion(self) -> dict | None:
        return None if self.meta.fusion is None else self.meta.fusion.model_dump()

    @property
    def positive_class(self) -> str | None:
        """Binary tasks: the class the model's output is the probability of (always ``classes[1]``)."""
        return self.meta.positive_class

    @property
    def tta_flip(self) -> list[int]:
        """Spatial axes (1-based) whose flips test-time augmentation averages over (see medsight.inference)."""
        return list(self.meta.tta_flip)

    @property
    def recipe(self) -> dict:
        return self.meta.preprocessing.model_dump(exclude_unset=True)

    @property
    def version(self) -> str:
        """``<model name>-<12 hex>``: changes with any byte of the weights, the other artefacts or bundle.json."""
        return f"{self.meta.model.name}-{(self.digest or self.weights_sha256 or '0' * 12)[:12]}"


def decision_text(meta: BundleMeta | dict) -> str:
    """How this bundle decides, in words: the threshold and the rule that chose it, and the temperature."""
    from medsight.summary import threshold_rule_sentence

    if isinstance(meta, dict):
        meta = validate_meta(meta)

    temp = float(meta.temperature)
    if meta.threshold is None:
        return f"decision by argmax, temperature {temp:.2f}"
    return f"{threshold_rule_sentence(meta.threshold_rule, meta.threshold)}; temperature {temp:.2f}"


def make_meta(*, model_spec: dict, task: str, classes: list[str], recipe: dict, data_name: str,
              best_epoch: int, monitor: str, threshold=None, temperature: float = 1.0, extra: dict | None = None) -> dict:
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "medsight_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model_spec,
        "task": task,
        "classes": list(classes),
        "input": {"spatial_dims": model_spec["spatial_dims"], "channels": model_spec["in_channels"],
                  "size": model_spec["input_size"]},
        "preprocessing": recipe,
        "threshold": threshold,
        "threshold_rule": None,
        "temperature": temperature,
        "data": data_name,
        "best_epoch": best_epoch,
        "monitor": monitor,
        **(extra or {}),
    }


def _one_line(err: ValidationError, where: str) -> MedsightError:
    e = err.errors()[0]
    loc = ".".join(str(x) for x in e.get("loc", ())) or "(top level)"
    msg = str(e.get("msg", "invalid")).replace("Value error, ", "").splitlines()[0]
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return ConfigError(f"{where}: field '{loc}': {msg}{more}")


def validate_meta(raw: dict, where: str = "bundle.json") -> BundleMeta:
    """``raw`` as a :class:`BundleMeta`, or one line naming the first invalid field."""
    try:
        return BundleMeta.model_validate(json_safe(raw))
    except ValidationError as e:
        raise _one_line(e, where) from None
    except MedsightError as e:
        raise ConfigError(f"{where}: {e}") from None


#: artefacts whose sha256 is recorded in ``bundle.json`` (``files``) and checked when the bundle is loaded
HASHED = ("model.pt", "ood.npz", "config.yaml", "history.csv")


def save_weights(out_dir: str | Path, model: nn.Module) -> Path:
    m: nn.Module = getattr(model, "module", model)  # DDP's wrapped module
    return atomic_torch_save({k: v.detach().cpu() for k, v in m.state_dict().items()}, Path(out_dir) / "model.pt")


def write_meta(out_dir: str | Path, meta: dict) -> Path:
    """``bundle.json``: ``meta`` validated as a :class:`BundleMeta`, with the sha256 of every artefact in
    :data:`HASHED` that is present and the integrity manifest over all of it (signed when :data:`KEY_ENV` is set)."""
    out = Path(out_dir)
    raw = json_safe({k: v for k, v in meta.items() if k not in _SEAL_KEYS})
    raw["format"], raw["schema_version"] = FORMAT, SCHEMA_VERSION
    raw["files"] = {n: sha256_file(out / n) for n in HASHED if (out / n).is_file()}
    validate_meta(raw, str(out / "bundle.json"))  # never write what load_bundle would refuse
    raw["integrity"] = seal(raw)
    return write_json(out / "bundle.json", raw)


def save_bundle(out_dir: str | Path, model: nn.Module, meta: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(out, model)
    write_meta(out, meta)
    return out


# --------------------------------------------------------------------------------------------- staging
def staging_dir(out: str | Path) -> Path:
    """Where a run builds its bundle before it replaces ``out`` (a hidden sibling, same filesystem)."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def _old_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.old"


def recover(out: str | Path) -> None:
    """Finish an interrupted :func:`publish`: if ``out`` is gone but its previous version is beside it, put it
    back. Called by the next run and by the next read (:func:`load_bundle`)."""
    out = Path(out)
    old = _old_dir(out)
    if not out.exists() and old.is_dir():
        try:
            os.rename(old, out)
        except FileNotFoundError:  # another reader put it back first
            pass


def publish(stage: str | Path, out: str | Path) -> Path:
    """Replace ``out`` by the finished ``stage`` folder with two renames; the old bundle is kept until the new one
    is in place, and :func:`recover` undoes a crash between the renames."""
    stage, out = Path(stage), Path(out)
    old = _old_dir(out)
    try:
        if old.exists():
            shutil.rmtree(old)
        if out.exists():
            os.rename(out, old)
        os.rename(stage, out)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        recover(out)
        raise MedsightError(f"cannot write bundle {out}: {e.strerror or e}") from e
    return out


def is_nonempty_dir(p: str | Path) -> bool:
    p = Path(p)
    return p.is_dir() and any(p.iterdir())


def build_from_spec(spec: dict | ModelSpec) -> nn.Module:
    if isinstance(spec, ModelSpec):
        spec = spec.model_dump()
    return create_model(spec["name"], spatial_dims=spec["spatial_dims"], in_channels=spec["in_channels"],
                        num_outputs=spec["num_outputs"], input_size=tuple(spec["input_size"]),
                        stem=spec.get("stem", "auto"), width=spec.get("width", 1.0), dropout=spec.get("dropout", 0.0))


def build_model_from_meta(meta: BundleMeta) -> nn.Module:
    """The (untrained) network a ``bundle.json`` describes: one model, or a seed ensemble of ``ensemble.members``
    models of the same spec, inside the fusion model when there is one."""
    if meta.ensemble:
        from medsight.models import Ensemble

        model: nn.Module = Ensemble([build_from_spec(meta.model) for _ in range(int(meta.ensemble.members))])
    else:
        model = build_from_spec(meta.model)
    if meta.fusion is not None:
        from medsight.fusion import build_fusion

        model = build_fusion(meta.fusion.model_dump(), None if meta.fusion.mode == "tabular" else model)
    return model


def _migrate(raw: dict, p: Path) -> dict:
    """A bundle.json of an earlier release, in the current schema (in memory; the folder is not rewritten)."""
    fmt = raw.get("format")
    if fmt == FORMAT:
        return raw
    if fmt not in LEGACY_FORMATS:
        raise MedsightError(f"{p / 'bundle.json'}: field 'format' is {fmt!r}; this release reads {FORMAT!r} "
                            f"and {', '.join(map(repr, LEGACY_FORMATS))}")
    log.warning("%s: written by an earlier release (%s); read as %s, its bundle.json fields unsealed (retrain to "
                "cover them by the integrity manifest)", p, fmt, FORMAT)
    return {**raw, "format": FORMAT, "schema_version": SCHEMA_VERSION}


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Validate, check and load a bundle: one line naming the file or field when anything is wrong."""
    p = Path(path)
    recover(p)  # a crash between publish's two renames: put the previous bundle back
    meta_path = p / "bundle.json"
    if not meta_path.is_file():
        raise MedsightError(f"{p} is not a medsight bundle: {meta_path.name} not found (train one with `medsight train`)")
    try:
        raw = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MedsightError(f"{meta_path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise MedsightError(f"{meta_path} is not a JSON object")
    legacy = raw.get("format") != FORMAT
    raw = _migrate(raw, p)
    meta = validate_meta(raw, str(meta_path))
    weights = p / "model.pt"
    if not weights.is_file():
        raise MedsightError(f"{p} has no model.pt: the run did not finish; resume it with --resume")
    for name, digest in meta.files.items():
        f = p / name
        if not f.is_file() or sha256_file(f) != digest:
            raise MedsightError(f"{f} does not match the sha256 recorded in {meta_path.name}: the bundle was "
                                "modified or mixed with another run's files; retrain or restore it")
    if legacy:
        files = dict(meta.files)
        if "model.pt" not in files:  # written before artefacts were hashed
            files["model.pt"] = sha256_file(weights)
        digest = _digest_of(field_digests({**raw, "files": files}))
        if _bundle_key() is not None:
            raise MedsightError(f"{meta_path}: the bundle is not signed (written by an earlier release), and "
                                f"{KEY_ENV} is set: retrain it with the key, or unset the key")
    else:
        files = meta.files
        digest = _check_seal(raw, meta_path)
    if "model.pt" not in files:
        raise MedsightError(f"{meta_path}: field 'files' does not list model.pt: the manifest is incomplete; retrain")
    try:
        model = build_model_from_meta(meta)
    except MedsightError as e:
        raise MedsightError(f"{meta_path}: {e}") from None
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as e:
        raise MedsightError(f"cannot load weights {weights}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    model.to(device).eval()
    return Bundle(path=p, meta=meta, model=model, weights_sha256=files["model.pt"], digest=digest)
