"""What a task kind means, in one place: outputs, labels, loss, activation, decision rule, metric set, and the
words the summary, the report and the service use about it.

- binary: one logit, BCE; probability of class 1 (the positive class); decision ``p >= threshold``.
- multiclass: K logits, cross-entropy; softmax; decision argmax.
- multilabel: K logits, BCE per label; sigmoid; decision ``p_k >= threshold`` per label; labels (N, K) 0/1.
- ordinal: K-1 cumulative logits (CORAL-style, P(y > k)); class probabilities from the cumulative ones;
  decision = argmax of the class probabilities (as metrics.py scores it); adds MAE and quadratic weighted kappa.

Each kind is one :class:`TaskKind` subclass registered in :data:`KINDS`; :class:`Task` (a kind and a class count)
delegates to it. Every other module asks the kind (its methods and capability flags), never compares a task name
with a string (``tests/test_architecture.py`` checks it). Adding a kind = one subclass here, registered in
:data:`KINDS`, plus the modules that are genuinely new for it (e.g. its metric primitives in their own module).

Torch is imported inside the methods that need it, so numpy-only consumers (metrics, report) stay light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import numpy as np

from medsight import scoring as S
from medsight.errors import ConfigError, DataError, choices_message

if TYPE_CHECKING:
    import torch


class TaskKind:
    """One task kind. Stateless: methods take the class count ``k`` where they need it."""

    name: ClassVar[str]
    #: decides by ``p >= threshold`` (chosen on validation) rather than by argmax
    uses_threshold: ClassVar[bool] = False
    #: each output logit is its own two-class problem (OOD energy, member spread)
    per_output_sigmoid: ClassVar[bool] = True
    #: labels are (N, K) 0/1 rows (a case may carry several labels) instead of (N,) class indices
    indicator_labels: ClassVar[bool] = False
    #: the output is one probability, of ``classes[1]`` (the positive class sensitivity and PPV are about)
    has_positive_class: ClassVar[bool] = False
    #: scalar metrics beyond :data:`medsight.scoring.BASE_METRICS`
    extra_metrics: ClassVar[tuple[str, ...]] = ()

    # --- classes and shapes -------------------------------------------------------------------------------
    def check_classes(self, k: int) -> None:
        if k < 2:
            raise ConfigError(f"task {self.name} needs at least 2 classes, got {k}")

    def num_outputs(self, k: int) -> int:
        return k

    def encode_labels(self, labels) -> np.ndarray:
        """Labels as stored in a dataset: (N,) int64 class indices (indicator kinds: (N, K) float32 0/1)."""
        return np.asarray(labels).reshape(-1).astype(np.int64)

    def check_labels(self, labels, k: int, where: str) -> None:
        y = np.asarray(labels).reshape(-1)
        if y.size and (y.min() < 0 or y.max() >= k):
            raise DataError(f"{where} outside 0..{k - 1}")

    def targets(self, labels) -> "torch.Tensor":
        """Labels as stored -> the tensor the loss wants."""
        import torch

        return torch.as_tensor(np.asarray(labels).reshape(-1), dtype=torch.long)

    def class_counts(self, labels, classes: Sequence[str]) -> dict[str, int]:
        """Cases per class (indicator kinds: cases carrying each label), in class order."""
        counts = np.bincount(np.asarray(labels).reshape(-1).astype(np.int64), minlength=len(classes))
        return {str(c): int(counts[i]) for i, c in enumerate(classes)}

    def class_weights(self, labels, k: int) -> "torch.Tensor":
        """'balanced' weights: n / (k * count_c)."""
        import torch

        labels = np.asarray(labels)
        counts = np.bincount(labels.reshape(-1).astype(np.int64), minlength=k).astype(np.float64)
        return torch.as_tensor(len(labels) / (k * counts.clip(min=1)), dtype=torch.float32)

    # --- training and inference ---------------------------------------------------------------------------
    def loss(self, logits, y, k: int, *, class_weights=None, label_smoothing: float = 0.0):
        raise NotImplementedError

    def probabilities(self, logits, k: int, temperature: float = 1.0):
        raise NotImplementedError

    def decide(self, probs, threshold=None) -> np.ndarray:
        return np.asarray(probs).argmax(axis=1).astype(np.int64)

    def as_threshold(self, value) -> float | list[float] | None:
        """A chosen threshold in the form the bundle stores (``None`` for argmax kinds)."""
        return None

    def check_threshold(self, threshold, k: int) -> None:
        """Refuse a stored threshold that does not fit this kind (ConfigError, one line)."""
        if threshold is not None:
            raise ConfigError(f"threshold must be null for a {self.name} task (it decides by argmax), got {threshold!r}")

    def class_table(self, probs) -> np.ndarray:
        """Probabilities as one column per class (N, K)."""
        return np.asarray(probs)

    def names(self, row, classes: Sequence[str]) -> str | list[str]:
        """One label or decision row -> the class name (indicator kinds: the list of positive labels)."""
        return classes[int(np.asarray(row).reshape(-1)[0])]

    def nll(self, probs: np.ndarray, labels, eps: float) -> float:
        """Mean negative log-likelihood of the labels under ``probs``."""
        y = np.asarray(labels).reshape(-1).astype(np.int64)
        return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], eps, 1.0))))

    # --- metrics (numpy; primitives in medsight.scoring) ---------------------------------------------------
    @property
    def metric_names(self) -> tuple[str, ...]:
        return S.BASE_METRICS + self.extra_metrics

    def prepare(self, y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """Validate the shapes of truth and probabilities; return (y, p, K)."""
        if p.ndim != 2:
            raise DataError(f"{self.name} probs must be (N, K), got shape {p.shape}")
        k = p.shape[1]
        y = y.reshape(-1)
        if y.shape[0] != p.shape[0] or (y.size and (y.min() < 0 or y.max() >= k)):
            raise DataError(f"{self.name} y_true must be ints in 0..{k - 1}, got values {np.unique(y)[:10].tolist()}")
        return y.astype(np.int64), p, k

    def metric_threshold(self, threshold, k: int):
        """The decision cut-off metrics use (0.5 by default), checked."""
        if threshold is None:
            return 0.5
        raise ConfigError(f"a threshold applies to binary and multilabel tasks, not {self.name} (argmax is used)")

    def batch_metrics(self, yb: np.ndarray, pb: np.ndarray, k: int, thr) -> dict[str, np.ndarray]:
        return S.multiclass_batch(yb, pb, k, ordinal=False)

    #: bootstrap resamples keep each class's count (impossible when a case carries several labels)
    stratified_bootstrap: ClassVar[bool] = True

    def per_class_counts(self, cm: np.ndarray, c: int) -> tuple[int, int, int, int]:
        """(tn, fp, fn, tp) of class ``c`` one-vs-rest from the confusion matrix."""
        tp = int(cm[c, c])
        fn = int(cm[c].sum() - tp)
        fp = int(cm[:, c].sum() - tp)
        return int(cm.sum() - tp - fn - fp), fp, fn, tp

    def calibration_pairs(self, y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(confidence, outcome) pairs a reliability diagram bins: top-label confidence vs whether it was right."""
        return p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)

    def one_vs_rest(self, y: np.ndarray, p: np.ndarray, classes: Sequence[str]) -> list[tuple[str, Any, Any]]:
        """[(name, y01, score)]: the ROC / PR curves to draw."""
        return [(classes[c], (y == c).astype(int), p[:, c]) for c in range(p.shape[1])]

    # --- words ----------------------------------------------------------------------------------------------
    counts_heading: ClassVar[str] = "class"
    #: what a reliability diagram bins, in words
    confidence_words: ClassVar[str] = "the top-class probability"

    def split_counts_line(self, name: str, n: int, parts: str) -> str:
        return f"{name}: {n} images ({parts})"

    def decision_words(self, threshold_sentence: str) -> str:
        return "the most probable class (argmax)"

    def gallery_confidence(self, probs: np.ndarray, threshold) -> np.ndarray:
        """How sure each decision is, for ranking the report's gallery (most confident first)."""
        return probs.max(axis=1)

    def gallery_correct(self, pred: np.ndarray, y: np.ndarray) -> np.ndarray:
        return pred == y.reshape(-1)

    def explained_class(self, pred_row) -> int | None:
        """The class a heatmap explains for this decision (``None``: the model's top output)."""
        return int(pred_row)

    def probability_caption(self, p, classes: Sequence[str], shown: str) -> str:
        return f"P({shown})={float(np.max(p)):.2f}"

    def shown_label(self, row, classes: Sequence[str]) -> str:
        return classes[int(np.asarray(row).reshape(-1)[0])]

    def review_reasons(self, probs: dict[str, float], threshold, classes: Sequence[str], margin: float) -> list[str]:
        """Too close to call: the two most likely classes within ``margin`` of each other."""
        (c1, p1), (c2, p2) = sorted(probs.items(), key=lambda kv: -kv[1])[:2]
        if p1 - p2 < margin:
            return [f"the two most likely classes are within {margin:g} ({c1} {p1:.3f}, {c2} {p2:.3f})"]
        return []


def _smooth(t, label_smoothing: float):
    return t * (1 - label_smoothing) + 0.5 * label_smoothing if label_smoothing else t


class BinaryKind(TaskKind):
    name = "binary"
    uses_threshold = True
    has_positive_class = True

    def check_classes(self, k: int) -> None:
        if k != 2:
            raise ConfigError(f"a binary task needs 2 classes, got {k}")

    def num_outputs(self, k: int) -> int:
        return 1

    def loss(self, logits, y, k, *, class_weights=None, label_smoothing=0.0):
        import torch.nn.functional as F

        w = None if class_weights is None else class_weights[y]
        return F.binary_cross_entropy_with_logits(logits.float().reshape(-1), _smooth(y.float(), label_smoothing),
                                                  weight=w)

    def probabilities(self, logits, k, temperature=1.0):
        import torch

        return torch.sigmoid((logits.float() / temperature).reshape(-1))

    def decide(self, probs, threshold=None):
        return (np.asarray(probs) >= (0.5 if threshold is None else threshold)).astype(np.int64)

    def as_threshold(self, value):
        return None if value is None else float(np.asarray(value).reshape(-1)[0])

    def check_threshold(self, threshold, k):
        if threshold is None:
            return
        if isinstance(threshold, list) or not 0 <= float(threshold) <= 1 + 1e-9:
            raise ConfigError(f"a binary threshold must be one number in [0, 1], got {threshold!r}")

    def class_table(self, probs):
        p = np.asarray(probs).reshape(-1)
        return np.stack([1 - p, p], axis=1)

    def nll(self, probs, labels, eps):
        y = np.asarray(labels).reshape(-1).astype(np.float64)
        p = np.clip(probs, eps, 1 - eps)
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))

    def prepare(self, y, p):
        p = S.binary_positive_probs(p)
        y = y.reshape(-1)
        if not np.isin(y, (0, 1)).all():
            raise DataError(f"binary y_true must be 0/1, got values {np.unique(y)[:10].tolist()}")
        return y.astype(np.int64), p, 2

    def metric_threshold(self, threshold, k):
        if threshold is None:
            return 0.5
        t = np.asarray(threshold, dtype=np.float64)
        if t.ndim != 0:
            raise ConfigError(f"binary threshold must be one number, got shape {t.shape}")
        return S.check_unit_threshold(t, threshold)

    def batch_metrics(self, yb, pb, k, thr):
        return S.binary_batch(yb, pb, thr)

    def calibration_pairs(self, y, p):
        return p, y.astype(np.float64)

    def one_vs_rest(self, y, p, classes):
        return [(classes[1] if len(classes) > 1 else "positive", y, S.binary_positive_probs(p))]

    def decision_words(self, threshold_sentence):
        return threshold_sentence

    def gallery_confidence(self, probs, threshold):
        thr = 0.5 if threshold is None else float(np.asarray(threshold))
        return np.abs(probs - thr)  # distance from the threshold

    def probability_caption(self, p, classes, shown):
        return f"P({classes[1]})={float(p):.2f}"

    def review_reasons(self, probs, threshold, classes, margin):
        p, t = probs[classes[1]], float(threshold)
        if abs(p - t) < margin:
            return [f"P({classes[1]}) = {p:.3f} is within {margin:g} of the threshold {t:.3f}"]
        return []


class MulticlassKind(TaskKind):
    name = "multiclass"
    per_output_sigmoid = False

    def loss(self, logits, y, k, *, class_weights=None, label_smoothing=0.0):
        import torch.nn.functional as F

        return F.cross_entropy(logits.float(), y, weight=class_weights, label_smoothing=label_smoothing)

    def probabilities(self, logits, k, temperature=1.0):
        import torch

        return torch.softmax(logits.float() / temperature, dim=1)


class MultilabelKind(TaskKind):
    name = "multilabel"
    uses_threshold = True
    indicator_labels = True
    extra_metrics = ("subset_accuracy",)
    stratified_bootstrap = False
    counts_heading = "cases with label"
    confidence_words = "each label's probability"

    def check_classes(self, k: int) -> None:
        return None  # any number of labels

    def encode_labels(self, labels):
        y = np.asarray(labels)
        return y.reshape(len(y), -1).astype(np.float32)

    def check_labels(self, labels, k, where):
        return None

    def targets(self, labels):
        import torch

        labels = np.asarray(labels)
        return torch.as_tensor(labels.reshape(len(labels), -1), dtype=torch.float32)

    def class_counts(self, labels, classes):
        y = np.asarray(labels)
        y = y.reshape(len(y), -1)
        return {str(c): int(y[:, i].sum()) for i, c in enumerate(classes)}

    def class_weights(self, labels, k):
        """pos_weight = neg/pos per label."""
        import torch

        labels = np.asarray(labels)
        y = labels.reshape(len(labels), -1).astype(np.float64)
        pos = y.sum(0).clip(min=1)
        return torch.as_tensor((len(y) - pos) / pos, dtype=torch.float32)

    def loss(self, logits, y, k, *, class_weights=None, label_smoothing=0.0):
        import torch.nn.functional as F

        return F.binary_cross_entropy_with_logits(logits.float(), _smooth(y, label_smoothing), pos_weight=class_weights)

    def probabilities(self, logits, k, temperature=1.0):
        import torch

        return torch.sigmoid(logits.float() / temperature)

    def decide(self, probs, threshold=None):
        thr = 0.5 if threshold is None else np.asarray(threshold)
        return (np.asarray(probs) >= thr).astype(np.int64)

    def as_threshold(self, value):
        return None if value is None else [float(v) for v in np.atleast_1d(value)]

    def check_threshold(self, threshold, k):
        if threshold is None:
            return
        t = np.atleast_1d(np.asarray(threshold, dtype=object))
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 + 1e-9 for v in t)
        if not ok or (t.size != 1 and t.size != k):
            raise ConfigError(f"a multilabel threshold must be one number or {k} numbers in [0, 1], got {threshold!r}")

    def names(self, row, classes):
        return [c for c, v in zip(classes, np.asarray(row).reshape(-1)) if v]

    def nll(self, probs, labels, eps):
        y = np.asarray(labels).reshape(probs.shape).astype(np.float64)
        p = np.clip(probs, eps, 1 - eps)
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))

    def prepare(self, y, p):
        if p.ndim != 2:
            raise DataError(f"multilabel probs must be (N, K), got shape {p.shape}")
        if y.shape != p.shape:
            raise DataError(f"multilabel y_true must have the shape of probs {p.shape}, got {y.shape}")
        if not np.isin(y, (0, 1)).all():
            raise DataError("multilabel y_true must be 0/1")
        return y.astype(np.int64), p, p.shape[1]

    def metric_threshold(self, threshold, k):
        if threshold is None:
            return 0.5
        t = np.asarray(threshold, dtype=np.float64)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != k):
            raise ConfigError(f"multilabel threshold must be one number or {k} numbers, got shape {t.shape}")
        return S.check_unit_threshold(t, threshold)

    def batch_metrics(self, yb, pb, k, thr):
        return S.multilabel_batch(yb, pb, thr)

    def per_class_counts(self, cm, c):
        (tn, fp), (fn, tp) = cm[c].tolist()
        return tn, fp, fn, tp

    def calibration_pairs(self, y, p):
        return p.ravel(), y.ravel().astype(np.float64)

    def one_vs_rest(self, y, p, classes):
        return [(classes[c], y[:, c], p[:, c]) for c in range(p.shape[1])]

    def split_counts_line(self, name, n, parts):
        return f"{name}: {n} images; cases per label: {parts}"

    def decision_words(self, threshold_sentence):
        return threshold_sentence

    def gallery_confidence(self, probs, threshold):
        return np.abs(probs - 0.5).mean(axis=1)

    def gallery_correct(self, pred, y):
        return (pred == y).all(axis=1)

    def explained_class(self, pred_row):
        return None

    def probability_caption(self, p, classes, shown):
        return f"max label p={float(np.max(p)):.2f}"

    def shown_label(self, row, classes):
        return str(np.asarray(row).astype(int).tolist())

    def review_reasons(self, probs, threshold, classes, margin):
        thr = threshold if isinstance(threshold, list) else [float(threshold)] * len(classes)
        return [f"P({c}) = {probs[c]:.3f} is within {margin:g} of its threshold {t:.3f}"
                for c, t in zip(classes, thr) if abs(probs[c] - t) < margin]


class OrdinalKind(TaskKind):
    name = "ordinal"
    extra_metrics = ("mae", "qwk")

    def num_outputs(self, k: int) -> int:
        return k - 1

    def loss(self, logits, y, k, *, class_weights=None, label_smoothing=0.0):
        import torch
        import torch.nn.functional as F

        # target k -> cumulative [1]*k + [0]*(K-1-k)
        ks = torch.arange(k - 1, device=y.device)
        t = _smooth((y[:, None] > ks[None, :]).float(), label_smoothing)
        w = None if class_weights is None else class_weights[y][:, None].expand_as(t)
        return F.binary_cross_entropy_with_logits(logits.float(), t, weight=w)

    def probabilities(self, logits, k, temperature=1.0):
        import torch

        cum = torch.sigmoid(logits.float() / temperature)  # P(y > k), k = 0..K-2
        cum = torch.cummin(cum, dim=1).values  # enforce monotone
        ones = torch.ones_like(cum[:, :1])
        zeros = torch.zeros_like(cum[:, :1])
        return (torch.cat([ones, cum], dim=1) - torch.cat([cum, zeros], dim=1)).clamp_min(0)

    def batch_metrics(self, yb, pb, k, thr):
        return S.multiclass_batch(yb, pb, k, ordinal=True)


#: every task kind, by name (the one registry; config.py and the bundle schema derive their choices from it)
KINDS: dict[str, TaskKind] = {k.name: k for k in (BinaryKind(), MulticlassKind(), MultilabelKind(), OrdinalKind())}
TASK_TYPES = tuple(KINDS)


def kind_of(name: str) -> TaskKind:
    """The kind called ``name``; one line listing the known ones otherwise."""
    kind = KINDS.get(name) if isinstance(name, str) else None
    if kind is None:
        raise ConfigError(choices_message("task", name, TASK_TYPES))
    return kind


def infer_task(indicator: bool, n_classes: int) -> str:
    """The task kind of labels with these facts: several labels per case -> multilabel; two classes -> binary;
    more -> multiclass (ordinal is never guessed)."""
    if indicator:
        return MultilabelKind.name
    return BinaryKind.name if n_classes <= 2 else MulticlassKind.name


def class_names_for(task: str, labels_k: int) -> list[str]:
    """Default class names ``"0".."K-1"`` (at least two for a single-probability kind)."""
    return [str(i) for i in range(max(labels_k, 2 if kind_of(task).has_positive_class else 1))]


@dataclass(frozen=True)
class Task:
    name: str
    num_classes: int

    def __post_init__(self):
        kind_of(self.name).check_classes(self.num_classes)

    @property
    def kind(self) -> TaskKind:
        return KINDS[self.name]

    # --- shapes -------------------------------------------------------------------------------------------
    @property
    def num_outputs(self) -> int:
        return self.kind.num_outputs(self.num_classes)

    @property
    def monitor_mode(self) -> str:
        return "max"

    def targets(self, labels: np.ndarray) -> "torch.Tensor":
        """Labels as stored ((N,) ints or (N,K) 0/1) -> the tensor the loss wants."""
        return self.kind.targets(labels)

    # --- loss ---------------------------------------------------------------------------------------------
    def loss(self, logits: "torch.Tensor", y: "torch.Tensor", *, class_weights: "torch.Tensor | None" = None,
             label_smoothing: float = 0.0) -> "torch.Tensor":
        return self.kind.loss(logits, y, self.num_classes, class_weights=class_weights,
                              label_smoothing=label_smoothing)

    # --- activation ---------------------------------------------------------------------------------------
    def probabilities(self, logits: "torch.Tensor", temperature: float = 1.0) -> "torch.Tensor":
        """binary -> (N,) P(class 1); multiclass/ordinal -> (N,K) class probabilities; multilabel -> (N,K)."""
        return self.kind.probabilities(logits, self.num_classes, temperature)

    # --- decision -----------------------------------------------------------------------------------------
    def decide(self, probs: np.ndarray, threshold: float | list[float] | None = None) -> np.ndarray:
        return self.kind.decide(probs, threshold)

    @property
    def uses_threshold(self) -> bool:
        """Binary and multilabel tasks decide by a threshold (chosen on validation); the others by argmax."""
        return self.kind.uses_threshold

    @property
    def per_output_sigmoid(self) -> bool:
        """True when each output logit is its own two-class problem (binary, multilabel, ordinal)."""
        return self.kind.per_output_sigmoid

    def as_threshold(self, value) -> float | list[float] | None:
        """A chosen threshold in the form the bundle stores: one number (binary), one per label (multilabel),
        ``None`` for argmax tasks."""
        if not self.uses_threshold or value is None:
            return None
        return self.kind.as_threshold(value)

    def check_threshold(self, threshold) -> None:
        """Refuse a stored threshold that does not fit this task (one line)."""
        self.kind.check_threshold(threshold, self.num_classes)

    def positive_class(self, classes: Sequence[str]) -> str | None:
        """The class the single output is the probability of (``classes[1]``); ``None`` for other kinds."""
        return str(classes[1]) if self.kind.has_positive_class and len(classes) == 2 else None

    def class_table(self, probs: np.ndarray) -> np.ndarray:
        """Probabilities as one column per class (N, K): binary ``P(class 1)`` becomes ``[1 - p, p]``."""
        return self.kind.class_table(probs)

    def names(self, row, classes: list[str]) -> str | list[str]:
        """One label or decision row -> the class name (or, for multilabel, the list of positive labels)."""
        return self.kind.names(row, classes)

    def class_weights(self, labels: np.ndarray) -> "torch.Tensor":
        """'balanced' weights: n / (k * count_c); for multilabel, pos_weight = neg/pos per label."""
        return self.kind.class_weights(labels, self.num_classes)
