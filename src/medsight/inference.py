"""The one place a model is run over images.

Training-time validation, calibration, metrics, the report and its gallery, the shift battery, OOD fitting and
scoring, ``explain`` and :class:`medsight.predict.Predictor` (PyTorch backend) all call :func:`run_model`; the
ONNX backend applies the same test-time-augmentation rule through :func:`tta_views` and :func:`combine_views`, so
every backend gives the same numbers for the same bundle.

Rules, in one place:
- stored images are uint8 (divided by 255), uint16 (divided by 65535: the dataset cache's finer dtype) or float
  already in [0, 1] (``to_float``); they may be a :class:`medsight.data.cache.DiskArray` (rows read from disk per
  batch), so a pass never holds more than a batch of them;
- test-time augmentation (``tta_flip``: spatial axes, 1-based, as stored in ``bundle.json``) averages the
  **logits** (and penultimate features) of the image and of its flip along each listed axis, one flip at a time;
  for a 2D image axis 1 is up-down and axis 2 left-right;
- an image + clinical model is called as ``model(x, tab)`` with the encoded clinical rows;
- penultimate features are the input of the model's last ``nn.Linear`` (``features=True``).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from medsight.errors import ConfigError, DataError
from medsight.config import EVAL_BATCH_SIZE



@dataclass
class Outputs:
    logits: torch.Tensor  # (N, outputs) float32 on the CPU
    features: torch.Tensor | None = None  # (N, D) penultimate features when asked
    members: torch.Tensor | None = None  # (N, members, outputs) member logits of an ensemble, when asked


def to_float(x: torch.Tensor) -> torch.Tensor:
    """Stored images -> float32 in [0, 1]: uint8 is divided by 255, uint16 by 65535, float is taken as already
    normalised."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    if x.dtype == torch.uint16:
        return x.float().div_(65535.0)
    return x.float()


def rows_tensor(images, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of stored images (tensor, array or DiskArray) as a tensor: only those rows are read."""
    part = images[start:stop]
    return part if isinstance(part, torch.Tensor) else torch.as_tensor(np.ascontiguousarray(part))


def check_flips(tta_flip: Sequence[int] | None, spatial_dims: int) -> tuple[int, ...]:
    """Validate TTA axes (1-based spatial axes) for images of ``spatial_dims`` dimensions."""
    axes = tuple(int(a) for a in (tta_flip or ()))
    for a in axes:
        if not 1 <= a <= spatial_dims:
            raise ConfigError(f"tta_flip axis {a} is not a spatial axis of a {spatial_dims}D image "
                              f"(allowed: 1..{spatial_dims})")
    return axes


def tta_views(x, tta_flip: Sequence[int] | None) -> Iterator:
    """The views TTA averages over: the batch itself, then its flip along each axis (torch or numpy batch)."""
    yield x
    for a in tta_flip or ():
        dim = 1 + int(a)  # (N, C, *spatial)
        yield x.flip(dim) if isinstance(x, torch.Tensor) else np.ascontiguousarray(np.flip(x, axis=dim))


def combine_views(views: list):
    """Mean over TTA views (logits or features), for torch tensors or numpy arrays alike."""
    out = views[0]
    for v in views[1:]:
        out = out + v
    return out / len(views) if len(views) > 1 else out


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The model's last ``nn.Linear`` (in registration order): its input is the penultimate feature vector."""
    found = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            found = (name, m)
    if found is None:
        raise ConfigError(f"{type(model).__name__} has no final nn.Linear layer to take features from "
                          "(the OOD detector needs one)")
    return found


@contextlib.contextmanager
def _feature_tap(model: nn.Module, box: list, layer: str | None = None):
    """Record the input of ``layer`` (default: the last Linear) for forwards run by *this* thread only, so
    concurrent predictions on one shared model never see each other's features."""
    if layer is None:
        _, module = last_linear(model)
    else:
        modules = dict(model.named_modules())
        if layer not in modules:
            raise ConfigError(f"model has no layer {layer!r} for features")
        module = modules[layer]
    me = threading.get_ident()

    def hook(_m, inp, _out):
        if threading.get_ident() == me:
            box.append(inp[0].detach().flatten(1).float())

    h = module.register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


def member_layer(model: nn.Module) -> str | None:
    """Name of an ensemble's :class:`medsight.models.MemberMean` (its input: the stacked member logits), or
    None for a single model."""
    from medsight.models import MemberMean

    return next((n for n, m in model.named_modules() if isinstance(m, MemberMean)), None)


@contextlib.contextmanager
def _members_tap(model: nn.Module, box: list):
    """Record the stacked member logits of an ensemble for forwards run by this thread only."""
    name = member_layer(model)
    if name is None:
        raise ConfigError(f"{type(model).__name__} is not an ensemble: it has no member logits")
    me = threading.get_ident()

    def hook(_m, inp, _out):
        if threading.get_ident() == me:
            box.append(inp[0].detach().float())

    h = dict(model.named_modules())[name].register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


def autocast_ctx(device: torch.device, amp: str):
    on = amp == "on" or (amp == "auto" and device.type == "cuda")
    if not on:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.inference_mode()
def run_model(model: nn.Module, images, *, tab=None, tta_flip: Sequence[int] | None = (),
              batch_size: int = EVAL_BATCH_SIZE, device: str | torch.device | None = None, amp: str = "off",
              channels_last: bool = False, features: bool = False, layer: str | None = None,
              members: bool = False,
              transform: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> Outputs:
    """Logits (and penultimate features) of ``model`` over stored images ``(N, C, *spatial)``.

    ``tab``: encoded clinical rows (N, n_tab) for an image + clinical model. ``tta_flip``: see the module doc.
    ``transform(x, batch_index)``: applied to each float batch before the model (e.g. a corruption of the shift
    battery). ``members``: also the member logits of an ensemble (``Outputs.members``, averaged over the TTA views
    like the logits). Returns float32 CPU tensors."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    x_all = images if hasattr(images, "shape") and hasattr(images, "__getitem__") else np.asarray(images)
    if len(x_all.shape) not in (4, 5):
        raise DataError(f"images must have shape (N, C, H, W) or (N, C, D, H, W), got {tuple(x_all.shape)}")
    flips = check_flips(tta_flip, len(x_all.shape) - 2)
    tab_all = None if tab is None else torch.as_tensor(np.asarray(tab, dtype=np.float32))
    if tab_all is not None and len(tab_all) != len(x_all):
        raise DataError(f"{len(x_all)} images but {len(tab_all)} clinical rows")
    dev = torch.device(device) if device is not None else _device_of(model)
    was_training = model.training
    model.eval()
    logits_out: list[torch.Tensor] = []
    feats_out: list[torch.Tensor] = []
    box: list[torch.Tensor] = []
    mbox: list[torch.Tensor] = []
    members_out: list[torch.Tensor] = []
    tap = _feature_tap(model, box, layer) if features else contextlib.nullcontext()
    mtap = _members_tap(model, mbox) if members else contextlib.nullcontext()
    try:
        with tap, mtap:
            for bi, i in enumerate(range(0, len(x_all), batch_size)):
                x = to_float(rows_tensor(x_all, i, i + batch_size).to(dev, non_blocking=True))
                if transform is not None:
                    x = transform(x, bi)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
                extra = () if tab_all is None else (tab_all[i:i + batch_size].to(dev),)
                zs, fs, ms = [], [], []
                for v in tta_views(x, flips):
                    box.clear()
                    mbox.clear()
                    with autocast_ctx(dev, amp):
                        zs.append(model(v, *extra).float())
                    if features:
                        fs.append(box[-1])
                    if members:
                        ms.append(mbox[-1])
                logits_out.append(combine_views(zs).cpu())
                if features:
                    feats_out.append(combine_views(fs).cpu())
                if members:
                    members_out.append(combine_views(ms).cpu())
    finally:
        model.train(was_training)
    if not logits_out:
        return Outputs(torch.empty(0), torch.empty(0) if features else None, torch.empty(0) if members else None)
    return Outputs(torch.cat(logits_out), torch.cat(feats_out) if features else None,
                   torch.cat(members_out) if members else None)


def run_logits(model: nn.Module, images, **kw) -> torch.Tensor:
    """Just the logits of :func:`run_model`."""
    return run_model(model, images, **kw).logits
