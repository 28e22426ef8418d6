"""The dataset every source produces: images (N, C, *spatial), labels and per-split facts (what the rest of
medsight sees after the readers)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from medsight.errors import DataError, choices_message

@dataclass
class Split:
    images: np.ndarray
    labels: np.ndarray
    ids: list[str] | None = None
    clinical: list[dict] | None = None
    patients: list[str | None] | None = None  # hashed patient ids, never the raw ones

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class Dataset:
    """In-memory splits plus the facts a report must state about them.

    Binary tasks: ``classes[1]`` is always the **positive class** (the finding; what "sensitivity" is about), so the
    model's single output is P(positive). :meth:`set_positive_class` puts the chosen class there once, at load time;
    ``positive_class_source`` says how it was chosen. ``split_origin`` says how the splits were made, ``native_size``
    the files' own size before resizing (user data), and ``leakage`` the leakage finding (counts only) when
    ``data.allow_leakage`` let training proceed despite it; the bundle and the report copy these.
    """

    name: str
    task: str
    classes: list[str]
    spatial_dims: int
    splits: dict[str, Split]
    recipe: dict = field(default_factory=dict)
    positive_class_source: str | None = None
    split_origin: str = "official MedMNIST split"
    native_size: dict | None = None
    leakage: dict | None = None

    @property
    def positive_class(self) -> str | None:
        """The positive class of a binary task (always ``classes[1]``); ``None`` for other tasks."""
        from medsight.tasks import kind_of

        return self.classes[1] if kind_of(self.task).has_positive_class and len(self.classes) == 2 else None

    def set_positive_class(self, choice: int | str, source: str) -> None:
        """Make ``choice`` (a class name, or an index in the current class order) the positive class: it moves to
        index 1 and every split's labels are remapped (``y -> 1 - y``) when it was at index 0."""
        from medsight.errors import ConfigError
        from medsight.tasks import kind_of

        if not kind_of(self.task).has_positive_class:
            raise ConfigError(f"data.positive_class applies to binary tasks; {self.name} is a {self.task} task "
                              f"with classes {', '.join(self.classes)}")
        index = resolve_class(self.classes, choice)
        if index == 0:
            self.classes = [self.classes[1], self.classes[0]]
            for s in self.splits.values():
                s.labels = (1 - s.labels).astype(s.labels.dtype)
        self.positive_class_source = source

    def align_to(self, classes: list[str]) -> None:
        """Put a binary task's classes in the order a trained model uses (``bundle.classes``), e.g. a bundle made
        before the positive class moved to index 1; raises when the names differ."""
        from medsight.errors import DataError as _DataError

        if list(self.classes) == list(classes):
            return
        from medsight.tasks import kind_of

        if kind_of(self.task).has_positive_class and list(self.classes) == list(classes)[::-1]:
            self.set_positive_class(classes[1], "as the model was trained")
            return
        raise _DataError(f"data {self.name} has classes {self.classes}, the model expects {list(classes)}")

    @property
    def in_channels(self) -> int:
        return int(self.splits["train"].images.shape[1])

    @property
    def input_size(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.splits["train"].images.shape[2:])

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise DataError(choices_message(f"split of {self.name}", name, self.splits))
        return self.splits[name]


def resolve_class(classes: list[str], choice: int | str) -> int:
    """Index of ``choice`` in ``classes``: an exact name, a case-insensitive name, or an integer index."""
    from medsight.errors import ConfigError

    names = [str(c) for c in classes]
    if isinstance(choice, str):
        if choice in names:
            return names.index(choice)
        low = [n.lower() for n in names]
        if choice.strip().lower() in low:
            return low.index(choice.strip().lower())
    if not isinstance(choice, bool):
        try:
            i = int(str(choice).strip())
        except ValueError:
            i = None
        if i is not None and 0 <= i < len(names):
            return i
    raise ConfigError(f"data.positive_class {choice!r} is not a class of this data; allowed: "
                      + ", ".join(f"{n!r} (or {i})" for i, n in enumerate(names)))


