"""What a task type means, in one place: outputs, loss, activation, decision rule, metric set.

- binary: one logit, BCE; probability of class 1; decision ``p >= threshold``.
- multiclass: K logits, cross-entropy; softmax; decision argmax.
- multilabel: K logits, BCE per label; sigmoid; decision ``p_k >= threshold`` per label.
- ordinal: K-1 cumulative logits (CORAL-style, P(y > k)); class probabilities from the cumulative ones;
  decision = argmax of the class probabilities (as metrics.py scores it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medsight.errors import ConfigError, choices_message

TASK_TYPES = ("binary", "multiclass", "multilabel", "ordinal")


@dataclass(frozen=True)
class Task:
    name: str
    num_classes: int

    def __post_init__(self):
        if self.name not in TASK_TYPES:
            raise ConfigError(choices_message("task", self.name, TASK_TYPES))
        if self.name in ("binary",) and self.num_classes != 2:
            raise ConfigError(f"a binary task needs 2 classes, got {self.num_classes}")
        if self.num_classes < 2 and self.name != "multilabel":
            raise ConfigError(f"task {self.name} needs at least 2 classes, got {self.num_classes}")

    # --- shapes -------------------------------------------------------------------------------------------
    @property
    def num_outputs(self) -> int:
        return {"binary": 1, "multiclass": self.num_classes, "multilabel": self.num_classes,
                "ordinal": self.num_classes - 1}[self.name]

    @property
    def monitor_mode(self) -> str:
        return "max"

    def targets(self, labels: np.ndarray) -> torch.Tensor:
        """Labels as stored ((N,) ints or (N,K) 0/1) -> the tensor the loss wants."""
        labels = np.asarray(labels)
        if self.name == "multilabel":
            return torch.as_tensor(labels.reshape(len(labels), -1), dtype=torch.float32)
        return torch.as_tensor(labels.reshape(-1), dtype=torch.long)

    # --- loss ---------------------------------------------------------------------------------------------
    def loss(self, logits: torch.Tensor, y: torch.Tensor, *, class_weights: torch.Tensor | None = None,
             label_smoothing: float = 0.0) -> torch.Tensor:
        logits = logits.float()
        if self.name == "binary":
            t = y.float()
            if label_smoothing:
                t = t * (1 - label_smoothing) + 0.5 * label_smoothing
            w = None if class_weights is None else class_weights[y]
            return F.binary_cross_entropy_with_logits(logits.reshape(-1), t, weight=w)
        if self.name == "multiclass":
            return F.cross_entropy(logits, y, weight=class_weights, label_smoothing=label_smoothing)
        if self.name == "multilabel":
            t = y
            if label_smoothing:
                t = t * (1 - label_smoothing) + 0.5 * label_smoothing
            pos_weight = None if class_weights is None else class_weights
            return F.binary_cross_entropy_with_logits(logits, t, pos_weight=pos_weight)
        # ordinal: target k -> cumulative [1]*k + [0]*(K-1-k)
        ks = torch.arange(self.num_classes - 1, device=y.device)
        t = (y[:, None] > ks[None, :]).float()
        if label_smoothing:
            t = t * (1 - label_smoothing) + 0.5 * label_smoothing
        w = None if class_weights is None else class_weights[y][:, None].expand_as(t)
        return F.binary_cross_entropy_with_logits(logits, t, weight=w)

    # --- activation ---------------------------------------------------------------------------------------
    def probabilities(self, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """binary -> (N,) P(class 1); multiclass/ordinal -> (N,K) class probabilities; multilabel -> (N,K)."""
        z = logits.float() / temperature
        if self.name == "binary":
            return torch.sigmoid(z.reshape(-1))
        if self.name == "multiclass":
            return torch.softmax(z, dim=1)
        if self.name == "multilabel":
            return torch.sigmoid(z)
        cum = torch.sigmoid(z)  # P(y > k), k = 0..K-2
        cum = torch.cummin(cum, dim=1).values  # enforce monotone
        ones = torch.ones_like(cum[:, :1])
        zeros = torch.zeros_like(cum[:, :1])
        upper = torch.cat([ones, cum], dim=1)
        lower = torch.cat([cum, zeros], dim=1)
        return (upper - lower).clamp_min(0)

    # --- decision -----------------------------------------------------------------------------------------
    def decide(self, probs: np.ndarray, threshold: float | list[float] | None = None) -> np.ndarray:
        probs = np.asarray(probs)
        if self.name == "binary":
            return (probs >= (0.5 if threshold is None else threshold)).astype(np.int64)
        if self.name == "multilabel":
            thr = 0.5 if threshold is None else np.asarray(threshold)
            return (probs >= thr).astype(np.int64)
        return probs.argmax(axis=1).astype(np.int64)  # multiclass and ordinal (class probabilities)

    @property
    def uses_threshold(self) -> bool:
        """Binary and multilabel tasks decide by a threshold (chosen on validation); the others by argmax."""
        return self.name in ("binary", "multilabel")

    @property
    def per_output_sigmoid(self) -> bool:
        """True when each output logit is its own two-class problem (binary, multilabel, ordinal)."""
        return self.name != "multiclass"

    def as_threshold(self, value) -> float | list[float] | None:
        """A chosen threshold in the form the bundle stores: one number (binary), one per label (multilabel),
        ``None`` for argmax tasks."""
        if not self.uses_threshold or value is None:
            return None
        if self.name == "multilabel":
            return [float(v) for v in np.atleast_1d(value)]
        return float(np.asarray(value).reshape(-1)[0])

    def class_table(self, probs: np.ndarray) -> np.ndarray:
        """Probabilities as one column per class (N, K): binary ``P(class 1)`` becomes ``[1 - p, p]``."""
        probs = np.asarray(probs)
        if self.name == "binary":
            p = probs.reshape(-1)
            return np.stack([1 - p, p], axis=1)
        return probs

    def names(self, row, classes: list[str]) -> str | list[str]:
        """One label or decision row -> the class name (or, for multilabel, the list of positive labels)."""
        if self.name == "multilabel":
            return [c for c, v in zip(classes, np.asarray(row).reshape(-1)) if v]
        return classes[int(np.asarray(row).reshape(-1)[0])]

    def class_weights(self, labels: np.ndarray) -> torch.Tensor:
        """'balanced' weights: n / (k * count_c); for multilabel, pos_weight = neg/pos per label."""
        labels = np.asarray(labels)
        if self.name == "multilabel":
            y = labels.reshape(len(labels), -1).astype(np.float64)
            pos = y.sum(0).clip(min=1)
            return torch.as_tensor((len(y) - pos) / pos, dtype=torch.float32)
        counts = np.bincount(labels.reshape(-1).astype(np.int64), minlength=self.num_classes).astype(np.float64)
        w = len(labels) / (self.num_classes * counts.clip(min=1))
        return torch.as_tensor(w, dtype=torch.float32)