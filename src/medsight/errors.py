"""User-facing errors.

Anything a user can cause (a missing file, a bad config value, an unknown model name) raises
:class:`MedsightError` with a one-line message that names the thing and what is allowed.
The CLI prints that line and exits non-zero without a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MedsightError(Exception):
    """An error caused by user input; its message is shown as-is, on one line."""


class DataError(MedsightError):
    """A data file or dataset is missing, corrupt or of the wrong shape."""


class ConfigError(MedsightError):
    """A configuration value or command-line option is invalid."""


def optional_import(module: str, extra: str | None = None) -> ModuleType:
    """Import a heavy optional dependency, saying what to install when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on the environment
        pkg = extra or module.split(".")[0]
        raise MedsightError(f"{module} is needed for this step but is not installed: pip install {pkg}") from e


def choices_message(kind: str, got: object, allowed) -> str:
    allowed = sorted(allowed)
    return f"unknown {kind} {got!r}; allowed: {', '.join(map(str, allowed))}"
