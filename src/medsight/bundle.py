"""A trained model is a bundle folder, and inference rebuilds everything from it:

    config.yaml     the resolved run configuration
    model.pt        best weights (chosen on validation)
    bundle.json     model spec, task, classes, preprocessing recipe, input shape, threshold, temperature
    history.csv     one row per epoch
    metrics.json    per split, each metric's value (and CI where computed)
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from medsight import __version__
from medsight.errors import MedsightError
from medsight.models import create_model
from medsight.tasks import Task
from medsight.utils import atomic_torch_save, sha256_file, write_json

FORMAT = "medsight-bundle/1"


@dataclass
class Bundle:
    path: Path
    meta: dict
    model: nn.Module
    # logits per (dataset, split): calibration, metrics, the report and its gallery share one inference pass
    logits_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def task(self) -> Task:
        return Task(self.meta["task"], len(self.meta["classes"]))

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def threshold(self) -> float | list[float] | None:
        return self.meta.get("threshold")

    @property
    def temperature(self) -> float:
        return float(self.meta.get("temperature") or 1.0)

    @property
    def fusion(self) -> dict | None:
        return self.meta.get("fusion")

    @property
    def weights_sha256(self) -> str:
        """sha256 of ``model.pt``: the digest ``bundle.json`` records (checked when the bundle was loaded), so the
        weights are hashed once, not again by every consumer (model version, ONNX source check)."""
        digest = (self.meta.get("files") or {}).get("model.pt")
        if digest is None:  # a bundle written before artefacts were hashed
            digest = self.meta.setdefault("files", {})["model.pt"] = sha256_file(self.path / "model.pt")
        return digest

    @property
    def positive_class(self) -> str | None:
        """Binary tasks: the class the model's output is the probability of (always ``classes[1]``)."""
        return self.classes[1] if self.meta["task"] == "binary" else None

    @property
    def tta_flip(self) -> list[int]:
        """Spatial axes (1-based) whose flips test-time augmentation averages over (see medsight.inference)."""
        return list(self.meta.get("tta_flip") or [])

    @property
    def recipe(self) -> dict:
        return self.meta["preprocessing"]


def decision_text(meta: dict) -> str:
    """How this bundle decides, in words: the threshold and the rule that chose it, and the temperature."""
    from medsight.summary import threshold_rule_sentence

    temp = float(meta.get("temperature") or 1.0)
    if meta.get("threshold") is None:
        return f"decision by argmax, temperature {temp:.2f}"
    return f"{threshold_rule_sentence(meta.get('threshold_rule'), meta['threshold'])}; temperature {temp:.2f}"


def make_meta(*, model_spec: dict, task: str, classes: list[str], recipe: dict, data_name: str,
              best_epoch: int, monitor: str, threshold=None, temperature: float = 1.0, extra: dict | None = None) -> dict:
    return {
        "format": FORMAT,
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


#: artefacts whose sha256 is recorded in ``bundle.json`` (``files``) and checked when the bundle is loaded
HASHED = ("model.pt", "ood.npz", "config.yaml", "history.csv")


def save_weights(out_dir: str | Path, model: nn.Module) -> Path:
    m = model.module if hasattr(model, "module") else model
    return atomic_torch_save({k: v.detach().cpu() for k, v in m.state_dict().items()}, Path(out_dir) / "model.pt")


def write_meta(out_dir: str | Path, meta: dict) -> Path:
    """``bundle.json`` with the sha256 of every artefact in :data:`HASHED` that is present."""
    out = Path(out_dir)
    meta["files"] = {n: sha256_file(out / n) for n in HASHED if (out / n).is_file()}
    return write_json(out / "bundle.json", meta)


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
    back."""
    out = Path(out)
    old = _old_dir(out)
    if not out.exists() and old.is_dir():
        os.rename(old, out)


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


def build_from_spec(spec: dict) -> nn.Module:
    return create_model(spec["name"], spatial_dims=spec["spatial_dims"], in_channels=spec["in_channels"],
                        num_outputs=spec["num_outputs"], input_size=tuple(spec["input_size"]),
                        stem=spec.get("stem", "auto"), width=spec.get("width", 1.0), dropout=spec.get("dropout", 0.0))


def build_model_from_meta(meta: dict) -> nn.Module:
    """The (untrained) network a ``bundle.json`` describes: one model, or a seed ensemble of ``ensemble.members``
    models of the same spec."""
    ens = meta.get("ensemble")
    if ens:
        from medsight.models import Ensemble

        return Ensemble([build_from_spec(meta["model"]) for _ in range(int(ens["members"]))])
    return build_from_spec(meta["model"])


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> Bundle:
    p = Path(path)
    meta_path = p / "bundle.json"
    if not meta_path.is_file():
        raise MedsightError(f"{p} is not a medsight bundle: {meta_path.name} not found (train one with `medsight train`)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise MedsightError(f"{meta_path} is not valid JSON: {e}") from e
    if meta.get("format") != FORMAT:
        raise MedsightError(f"{meta_path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    weights = p / "model.pt"
    if not weights.is_file():
        raise MedsightError(f"{p} has no model.pt: the run did not finish; resume it with --resume")
    for name, digest in (meta.get("files") or {}).items():
        f = p / name
        if not f.is_file() or sha256_file(f) != digest:
            raise MedsightError(f"{f} does not match the sha256 recorded in {meta_path.name}: the bundle was "
                                "modified or mixed with another run's files; retrain or restore it")
    model = build_model_from_meta(meta)
    if meta.get("fusion"):
        from medsight.fusion import build_fusion

        model = build_fusion(meta["fusion"], None if meta["fusion"]["mode"] == "tabular" else model)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as e:
        raise MedsightError(f"cannot load weights {weights}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    model.to(device).eval()
    return Bundle(path=p, meta=meta, model=model)
