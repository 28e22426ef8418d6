"""Decode budgets: limits fixed before a file is decoded, checked from its own headers."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from medsight.data.readers.base import fail

#: Largest number of array elements a single image may decode to (decompression-bomb guard): 2**27 is a
#: 512x512x512 volume (512 MiB as float32). Training on user files and 3D models share it.
MAX_ELEMENTS = 2**27

#: A 2D model accepts sources up to this many pixels per channel (larger scans are downsampled anyway).
MAX_2D_SOURCE_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class DecodeBudget:
    """Limits fixed before a file is decoded.

    max_elements  decoded array elements (samples x rows x columns x frames)
    max_bytes     bytes any stream may inflate to (deflated DICOM, .nii.gz); default 8 per element + 1 MiB
    max_frames    frames / slices along the third spatial axis (1: the model takes 2D images only)
    isolate       decode compressed DICOM pixel data in a memory-limited worker process
    """

    max_elements: int = MAX_ELEMENTS
    max_bytes: int | None = None
    max_frames: int = 4096
    isolate: bool = True

    @property
    def byte_cap(self) -> int:
        return int(self.max_bytes) if self.max_bytes is not None else int(self.max_elements) * 8 + (1 << 20)

    def check(self, name: object, elements: int, frames: int = 1) -> None:
        """Refuse (DataError) a decode of ``elements`` elements in ``frames`` frames before it starts."""
        if frames > self.max_frames:
            what = "a 3D volume or multi-frame image" if self.max_frames == 1 else "an image"
            raise fail(name, f"{what} with {frames} frames/slices; the model takes at most {self.max_frames}")
        if elements <= 0:
            raise fail(name, "image is empty (0 pixels)")
        if elements > self.max_elements:
            raise fail(name, f"image has {elements} elements, above the limit of {self.max_elements} "
                             "(decompression bomb guard)")


#: The budget when none is given (training on user files, library calls).
DEFAULT_BUDGET = DecodeBudget()

#: The budget of the tools that read files without a model (``qc``, ``deid``): the element cap of a 2D
#: model's budget (an RGB 4096x4096 photo, or a 512x512x192 volume, fits), volumes allowed. Inflation is
#: capped at 8 bytes per element, so a deflated bomb costs these tools what it costs ``predict``.
TOOL_BUDGET = DecodeBudget(max_elements=3 * MAX_2D_SOURCE_PIXELS)


def budget_for(input_spec: dict | tuple | list) -> DecodeBudget:
    """The budget for a model's inputs: a bundle's ``meta['input']`` / a preprocessing recipe
    (``size``, ``channels``) or a shape ``(C, *size)``.

    2D models: at most one frame, and ``max(3 x 4096^2, 64 x model input elements)`` elements (an RGB
    4096x4096 photo fits; a 60000^2 codestream does not); 3D models: :data:`DEFAULT_BUDGET`.
    Never more than :data:`MAX_ELEMENTS`.
    """
    if isinstance(input_spec, dict):
        size = [int(v) for v in input_spec["size"]]
        channels = int(input_spec.get("channels") or 1)
    else:
        channels, *size = (int(v) for v in input_spec)
    if len(size) == 3:
        return DEFAULT_BUDGET
    model_elements = channels * int(np.prod(size))
    cap = min(MAX_ELEMENTS, max(3 * MAX_2D_SOURCE_PIXELS, 64 * model_elements))
    return DecodeBudget(max_elements=cap, max_frames=1)


def resolve_budget(budget: DecodeBudget | None, max_elements: int | None = None) -> DecodeBudget:
    """``budget`` (default :data:`DEFAULT_BUDGET`) with ``max_elements`` overriding its element cap."""
    b = DEFAULT_BUDGET if budget is None else budget
    if not isinstance(b, DecodeBudget):
        raise TypeError(f"budget must be a DecodeBudget, got {type(b).__name__}")
    if max_elements is not None:
        b = replace(b, max_elements=int(max_elements))
    return b
