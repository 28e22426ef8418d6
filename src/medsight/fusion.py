"""Image + clinical data fusion.

Two parts:

1. :class:`TabularEncoder` — the clinical columns -> a fixed-length float vector, fitted on the TRAINING split
   and saved as a JSON-able dict in the bundle (``encoder.to_dict()`` / ``TabularEncoder.from_dict``):

   - numeric column: missing values (``None``, NaN, ``""``, ``"NA"``, ``"nan"``) are imputed with the training
     median, then standardised with the training mean / std; plus one 0/1 missing-indicator column;
   - categorical column: one-hot over the training categories plus an ``unknown`` bucket (unseen or missing).

   Input is either a list of row dicts (``[{"age": 63, "sex": "F"}, ...]``) or a dict of columns
   (``{"age": [63, 71], "sex": ["F", "M"]}``); no pandas needed. Errors name the column (and row), e.g.
   ``column 'age': expected a number, got 'abc' (row 3)``.

2. :class:`FusionClassifier` — an image backbone from the model registry (its last ``nn.Linear`` replaced by
   ``nn.Identity``, so it yields penultimate features) plus a small MLP on the tabular vector, combined by

   - ``"concat"``: late fusion, ``head([f_img, mlp(tab)])``;
   - ``"film"``: the tabular branch produces a per-feature scale and shift, ``head(f_img * (1 + g) + b)``;
   - ``"gated"``: a gated multimodal unit, ``z = sigmoid(W [f_img, h_tab])``,
     ``head(z * tanh(W_i f_img) + (1 - z) * tanh(W_t h_tab))``;
   - ``"image"`` / ``"tabular"``: single-modality ablations with the same head, for honest baselines.

   ``forward(x, tab)``. The backbone stays a normal submodule (``model.image``), so Grad-CAM can hook its conv
   layers; ``model.model_with_tab(tab)`` returns an image-only ``nn.Module`` (``bound(x)``) for Grad-CAM and
   other image-only tools.

:func:`fit_fusion` trains it with the task losses of :mod:`medsight.tasks` and the optimiser / schedule /
augmentation of :mod:`medsight.train`, choosing the epoch on the validation split.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from medsight.errors import ConfigError, DataError, choices_message

FORMAT = "medsight-tabular/1"
MISSING_STRINGS = frozenset({"", "na", "nan", "null", "none"})
UNKNOWN = "unknown"


# --------------------------------------------------------------------------------------------- tabular encoding
def _is_missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, (float, np.floating)) and math.isnan(v):
        return True
    return isinstance(v, str) and v.strip().lower() in MISSING_STRINGS


def _columns(data, required: Sequence[str]) -> tuple[int, dict[str, list]]:
    """Rows (list of dicts) or a dict of columns -> (n, {column: values}) for the ``required`` columns."""
    if isinstance(data, dict):
        cols: dict[str, list] = {}
        n = None
        for c in required:
            if c not in data:
                raise DataError(f"column {c!r} is missing (required: {', '.join(required)})")
            v = data[c]
            if isinstance(v, (str, bytes)) or not hasattr(v, "__len__"):
                raise DataError(f"column {c!r}: expected a list of values, got {type(v).__name__}")
            v = list(v)
            if n is not None and len(v) != n:
                raise DataError(f"column {c!r} has {len(v)} values, but column {required[0]!r} has {n}")
            n = len(v)
            cols[c] = v
        if n is None:
            lens = {len(v) for v in data.values() if hasattr(v, "__len__") and not isinstance(v, str)}
            n = lens.pop() if len(lens) == 1 else 0
        return n, cols
    if isinstance(data, (list, tuple)):
        cols = {c: [] for c in required}
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise DataError(f"row {i}: expected a dict of column values, got {type(row).__name__}")
            for c in required:
                if c not in row:
                    raise DataError(f"column {c!r} is missing in row {i} (required: {', '.join(required)})")
                cols[c].append(row[c])
        return len(data), cols
    raise DataError(f"tabular data must be a list of row dicts or a dict of columns, got {type(data).__name__}")


def _number(v: Any, col: str, row: int) -> float:
    if _is_missing(v):
        return math.nan
    if isinstance(v, (bool, np.bool_)):
        raise DataError(f"column {col!r}: expected a number, got {v!r} (row {row})")
    if isinstance(v, (int, float, np.integer, np.floating)):
        x = float(v)
    elif isinstance(v, str):
        try:
            x = float(v.strip())
        except ValueError:
            raise DataError(f"column {col!r}: expected a number, got {v!r} (row {row})") from None
    else:
        raise DataError(f"column {col!r}: expected a number, got {type(v).__name__} {v!r} (row {row})")
    if math.isinf(x):
        raise DataError(f"column {col!r}: expected a finite number, got {v!r} (row {row})")
    return x


def _category(v: Any, col: str, row: int) -> str | None:
    if _is_missing(v):
        return None
    if isinstance(v, (str, int, np.integer, bool, np.bool_)):
        return str(v).strip()
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    raise DataError(f"column {col!r}: expected a category (text or integer), got {type(v).__name__} {v!r} (row {row})")


@dataclass
class TabularEncoder:
    """Fitted clinical-column encoder; ``to_dict()`` is what goes into the bundle."""

    numeric: list[dict] = field(default_factory=list)      # [{"name", "mean", "std", "median"}]
    categorical: list[dict] = field(default_factory=list)  # [{"name", "categories": [...]}]

    @classmethod
    def fit(cls, data, *, numeric: Sequence[str] = (), categorical: Sequence[str] = ()) -> "TabularEncoder":
        """Fit on the TRAINING split: medians, means, stds and the category lists."""
        numeric, categorical = list(numeric), list(categorical)
        if not numeric and not categorical:
            raise ConfigError("TabularEncoder.fit needs at least one numeric or categorical column")
        dup = set(numeric) & set(categorical)
        if dup or len(set(numeric)) != len(numeric) or len(set(categorical)) != len(categorical):
            raise ConfigError(f"column(s) listed twice: {', '.join(sorted(dup) or ['(duplicate names)'])}")
        n, cols = _columns(data, numeric + categorical)
        if n == 0:
            raise DataError("TabularEncoder.fit: no training rows")
        num_spec = []
        for c in numeric:
            vals = np.array([_number(v, c, i) for i, v in enumerate(cols[c])], dtype=np.float64)
            ok = vals[~np.isnan(vals)]
            if ok.size == 0:
                raise DataError(f"column {c!r} has no numeric values in the training data")
            std = float(ok.std())
            num_spec.append({"name": c, "median": float(np.median(ok)), "mean": float(ok.mean()),
                             "std": std if std > 1e-12 else 1.0})
        cat_spec = []
        for c in categorical:
            seen = {v for i, x in enumerate(cols[c]) if (v := _category(x, c, i)) is not None}
            cat_spec.append({"name": c, "categories": sorted(seen)})
        return cls(num_spec, cat_spec)

    @property
    def columns(self) -> list[str]:
        """Input columns, in order: numeric then categorical."""
        return [s["name"] for s in self.numeric] + [s["name"] for s in self.categorical]

    @property
    def feature_names(self) -> list[str]:
        names = []
        for s in self.numeric:
            names += [s["name"], f"{s['name']}__missing"]
        for s in self.categorical:
            names += [f"{s['name']}={v}" for v in s["categories"]] + [f"{s['name']}={UNKNOWN}"]
        return names

    @property
    def n_features(self) -> int:
        return 2 * len(self.numeric) + sum(len(s["categories"]) + 1 for s in self.categorical)

    def transform(self, data) -> np.ndarray:
        """Rows or columns -> float32 array (N, n_features)."""
        n, cols = _columns(data, self.columns)
        out = np.zeros((n, self.n_features), dtype=np.float32)
        j = 0
        for s in self.numeric:
            vals = np.array([_number(v, s["name"], i) for i, v in enumerate(cols[s["name"]])], dtype=np.float64)
            miss = np.isnan(vals)
            vals[miss] = s["median"]
            out[:, j] = (vals - s["mean"]) / s["std"]
            out[:, j + 1] = miss
            j += 2
        for s in self.categorical:
            index = {v: k for k, v in enumerate(s["categories"])}
            unk = len(s["categories"])
            for i, v in enumerate(cols[s["name"]]):
                out[i, j + index.get(_category(v, s["name"], i), unk)] = 1.0
            j += unk + 1
        return out

    def to_dict(self) -> dict:
        return {"format": FORMAT, "numeric": copy.deepcopy(self.numeric),
                "categorical": copy.deepcopy(self.categorical), "feature_names": self.feature_names}

    @classmethod
    def from_dict(cls, spec: dict) -> "TabularEncoder":
        if not isinstance(spec, dict) or spec.get("format") != FORMAT:
            raise DataError(f"not a tabular encoder spec: expected a dict with format {FORMAT!r}")
        try:
            num = [{"name": str(s["name"]), "median": float(s["median"]), "mean": float(s["mean"]),
                    "std": float(s["std"])} for s in spec.get("numeric", [])]
            cat = [{"name": str(s["name"]), "categories": [str(v) for v in s["categories"]]}
                   for s in spec.get("categorical", [])]
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"tabular encoder spec is malformed: {type(e).__name__}: {e}") from e
        return cls(num, cat)


def encode_tabular(data, spec: dict | TabularEncoder) -> np.ndarray:
    """Rows (list of dicts) or columns (dict of lists) -> float32 (N, n_features) with the fitted ``spec``."""
    enc = spec if isinstance(spec, TabularEncoder) else TabularEncoder.from_dict(spec)
    return enc.transform(data)


# --------------------------------------------------------------------------------------------- model
FUSION_MODES = ("concat", "film", "gated", "image", "tabular")


def _strip_last_linear(model: nn.Module) -> int:
    """Replace the model's last nn.Linear by nn.Identity (in place); returns its in_features."""
    from medsight.inference import last_linear

    name, lin = last_linear(model)
    parent = model
    *path, leaf = name.split(".")
    for p in path:
        parent = getattr(parent, p)
    setattr(parent, leaf, nn.Identity())
    return lin.in_features


class FusionClassifier(nn.Module):
    """Image backbone features + tabular MLP -> logits; ``forward(x, tab)``.

    ``image_model``: a model from :func:`medsight.models.create_model` (deep-copied; its last linear layer becomes
    ``nn.Identity``), or ``None`` for ``mode='tabular'``. ``n_tab``: tabular vector length
    (``encoder.n_features``). ``num_outputs``: ``Task.num_outputs``."""

    def __init__(self, image_model: nn.Module | None, n_tab: int, num_outputs: int, mode: str = "concat", *,
                 hidden: int = 32, dropout: float = 0.0):
        super().__init__()
        if mode not in FUSION_MODES:
            raise ConfigError(choices_message("fusion mode", mode, FUSION_MODES))
        if num_outputs < 1 or hidden < 1:
            raise ConfigError(f"num_outputs and hidden must be >= 1, got {num_outputs}, {hidden}")
        if mode != "image" and n_tab < 1:
            raise ConfigError(f"fusion mode {mode!r} needs n_tab >= 1 tabular features, got {n_tab}")
        if mode != "tabular" and image_model is None:
            raise ConfigError(f"fusion mode {mode!r} needs an image model")
        self.mode, self.n_tab, self.num_outputs = mode, int(n_tab), int(num_outputs)
        self.hidden, self.dropout = int(hidden), float(dropout)
        self.image: nn.Module | None = None
        d = 0
        if mode != "tabular":
            assert image_model is not None  # refused above
            self.image = copy.deepcopy(image_model)
            d = _strip_last_linear(self.image)
        self.image_features = d
        h = hidden
        self.tab: nn.Module | None = None
        if mode != "image":
            self.tab = nn.Sequential(nn.Linear(n_tab, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU())
        if mode == "concat":
            fused = d + h
        elif mode == "film":
            self.film = nn.Linear(h, 2 * d)
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)  # starts as the identity modulation
            fused = d
        elif mode == "gated":
            self.proj_img, self.proj_tab, self.gate = nn.Linear(d, h), nn.Linear(h, h), nn.Linear(d + h, h)
            fused = h
        elif mode == "image":
            fused = d
        else:
            fused = h
        layers: list[nn.Module] = [nn.Linear(fused, hidden), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(hidden, num_outputs))
        self.head = nn.Sequential(*layers)

    def set_input_stats(self, mean, std) -> None:
        set_stats = getattr(self.image, "set_input_stats", None)
        if callable(set_stats):
            set_stats(mean, std)

    def forward(self, x: torch.Tensor | None, tab: torch.Tensor | None) -> torch.Tensor:
        if self.mode == "tabular":
            assert self.tab is not None  # every mode but "image" has the tabular encoder
            return self.head(self.tab(tab))
        assert self.image is not None  # every mode but "tabular" has the image backbone
        f = self.image(x).flatten(1)
        if self.mode == "image":
            return self.head(f)
        assert self.tab is not None
        if tab is None or tab.dim() != 2 or tab.shape[1] != self.n_tab:
            raise DataError(f"tabular input must have shape (N, {self.n_tab}), got "
                            f"{None if tab is None else tuple(tab.shape)}")
        t = self.tab(tab.to(f.dtype))
        if self.mode == "concat":
            return self.head(torch.cat([f, t], dim=1))
        if self.mode == "film":
            g, b = self.film(t).chunk(2, dim=1)
            return self.head(f * (1 + g) + b)
        z = torch.sigmoid(self.gate(torch.cat([f, t], dim=1)))
        return self.head(z * torch.tanh(self.proj_img(f)) + (1 - z) * torch.tanh(self.proj_tab(t)))

    def model_with_tab(self, tab) -> "TabBound":
        """An image-only module ``bound(x)`` with this patient's tabular vector fixed (for Grad-CAM)."""
        return TabBound(self, tab)


class TabBound(nn.Module):
    """``FusionClassifier`` with a fixed tabular vector: ``forward(x)``; the backbone is ``self.fusion.image``."""

    tab: torch.Tensor  # a registered buffer

    def __init__(self, fusion: FusionClassifier, tab):
        super().__init__()
        t = torch.as_tensor(np.asarray(tab, dtype=np.float32))
        if t.dim() == 1:
            t = t[None]
        if t.dim() != 2 or t.shape[1] != fusion.n_tab:
            raise DataError(f"tabular vector must have {fusion.n_tab} features, got shape {tuple(t.shape)}")
        self.fusion = fusion
        self.register_buffer("tab", t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.tab) == len(x):
            tab = self.tab
        elif len(self.tab) == 1:
            tab = self.tab.expand(len(x), -1)
        else:
            raise DataError(f"bound tabular input has {len(self.tab)} rows; the image batch has {len(x)} "
                            "(bind one row to use it for any batch)")
        return self.fusion(x, tab.to(x.device))


def fusion_meta(model: FusionClassifier, encoder: TabularEncoder | dict) -> dict:
    """What a bundle needs to rebuild ``model`` (next to ``bundle.json``'s image ``model`` spec): JSON-able."""
    enc = encoder if isinstance(encoder, TabularEncoder) else TabularEncoder.from_dict(encoder)
    if enc.n_features != model.n_tab and model.mode != "image":
        raise ConfigError(f"encoder yields {enc.n_features} features, the fusion model expects {model.n_tab}")
    return {"mode": model.mode, "n_tab": model.n_tab, "num_outputs": model.num_outputs, "hidden": model.hidden,
            "dropout": model.dropout, "columns": enc.columns, "tabular": enc.to_dict()}


def build_fusion(meta: dict, image_model: nn.Module | None) -> FusionClassifier:
    """Rebuild an (untrained) :class:`FusionClassifier` from :func:`fusion_meta`; then ``load_state_dict``.
    ``image_model``: ``medsight.bundle.build_from_spec(bundle_meta["model"])`` (``None`` for 'tabular')."""
    try:
        return FusionClassifier(image_model, int(meta["n_tab"]), int(meta["num_outputs"]), meta["mode"],
                                hidden=int(meta.get("hidden", 32)), dropout=float(meta.get("dropout", 0.0)))
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"fusion metadata is malformed: {type(e).__name__}: {e}") from e


def model_with_tab(model: FusionClassifier, tab) -> TabBound:
    """Function form of :meth:`FusionClassifier.model_with_tab`."""
    return model.model_with_tab(tab)


def read_clinical_csv(path) -> dict[str, dict]:
    """A CSV with a ``path`` column (file path or file name) and clinical columns -> ``{path: {column: value}}``,
    for predicting or explaining files with an image + clinical model."""
    import csv
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise DataError(f"clinical CSV {p}: file not found")
    try:
        with open(p, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"clinical CSV {p}: cannot read it ({type(e).__name__}: {e})") from e
    if not rows or "path" not in rows[0]:
        raise DataError(f"clinical CSV {p}: needs a header with a 'path' column and one row per file")
    return {r["path"]: {k: v for k, v in r.items() if k != "path"} for r in rows}


def split_clinical_rows(bundle, data, split: str):
    """Encoded clinical rows of a dataset split for an image + clinical bundle (``None`` for image-only
    bundles); the encoder stored in the bundle, fitted on the training split."""
    if not bundle.fusion:
        return None
    s = data.split(split)
    if s.clinical is None:
        raise DataError(f"the model in {bundle.path} needs clinical columns "
                        f"{', '.join(bundle.fusion['columns'])}; {data.name} has none")
    return encode_tabular(s.clinical, bundle.fusion["tabular"])
