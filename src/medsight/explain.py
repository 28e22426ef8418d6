"""Heatmap explanations (Grad-CAM, occlusion) and their overlays, for 2D and 3D classifiers.

Works on any ``torch.nn.Module`` that maps (N, C, H, W) or (N, C, D, H, W) input to logits
(N, K) or a single binary logit (N,) / (N, 1). For a single-logit binary model ``class_idx=1``
(the default) explains the positive logit and ``class_idx=0`` the negated logit.

Grad-CAM is our own hook-based implementation of MONAI's ``monai.visualize.GradCAM`` recipe
(channel weights = spatially averaged gradients, ReLU of the weighted activation sum, upsampled
to the input size, min-max normalised per sample). MONAI's class leaves its hooks registered on
the model and turns in-place activations off for good; here the model comes back exactly as it
went in: same train/eval mode, no hooks, same ``requires_grad`` flags, same ``inplace`` flags.
"""

from __future__ import annotations

import io
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError, DataError

_POOL_TYPES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
_CONV_TYPES = (nn.Conv2d, nn.Conv3d)


#: opacity of the heatmap over the image in every overlay (CLI, report, service)
OVERLAY_ALPHA = 0.45
EXPLAIN_METHODS = ("gradcam", "occlusion")


def _check_input(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    if x.ndim not in (4, 5):
        raise DataError(f"explain needs a batch (N, C, H, W) or (N, C, D, H, W), got shape {tuple(x.shape)}")
    return x


@contextmanager
def _preserved(model: nn.Module) -> Iterator[None]:
    """Run in eval mode with in-place ops disabled; restore mode and flags afterwards."""
    was_training = model.training
    inplace = [(m, m.inplace) for m in model.modules() if isinstance(getattr(m, "inplace", None), bool)]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for m, _ in inplace:
            m.inplace = False
        model.eval()
        yield
    finally:
        for m, flag in inplace:
            m.inplace = flag
        for p, flag in grads:
            p.requires_grad_(flag)
        model.train(was_training)
        model.zero_grad(set_to_none=True)


def _get_module(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        convs = [n for n, m in modules.items() if isinstance(m, _CONV_TYPES)]
        raise ConfigError(f"no layer {name!r} in the model; convolution layers are: {', '.join(convs[-8:]) or 'none'}")
    return modules[name]


def find_target_layer(model: nn.Module, x: torch.Tensor | None = None) -> str:
    """Name of the layer whose output Grad-CAM should use.

    With an example input ``x``, a dry forward pass records every module's output and the last
    one to finish with a spatial output (same number of spatial dims as ``x``, more than one
    position) is chosen, skipping pooling layers and containers that merely return a pooling
    layer's output. That is the activation after the last convolution for the baseline CNN
    (Conv-ReLU-Pool-Conv-ReLU-Pool-...: the second ReLU, finer than the pooled map), ``layer4``
    for ResNets, ``class_layers.relu`` for MONAI DenseNets and the head activation for
    EfficientNets. Without ``x``, the last ``Conv2d``/``Conv3d`` is used, or the activation that
    directly follows it inside the same container.
    """
    if x is None:
        names = [n for n, m in model.named_modules() if isinstance(m, _CONV_TYPES)]
        if not names:
            raise ConfigError("the model has no Conv2d/Conv3d layer to explain; pass target_layer=")
        name = names[-1]
        parent_name, _, child = name.rpartition(".")
        parent = _get_module(model, parent_name) if parent_name else model
        kids = list(parent.named_children())
        keys = [k for k, _ in kids]
        if child in keys:
            i = keys.index(child)
            if i + 1 < len(kids) and _is_activation(kids[i + 1][1]):
                return f"{parent_name}.{keys[i + 1]}" if parent_name else keys[i + 1]
        return name
    x = _check_input(x)
    n_spatial = x.ndim - 2
    finished: list[tuple[str, torch.Tensor, nn.Module]] = []
    handles = []
    for name, mod in model.named_modules():
        if not name:
            continue

        def hook(m, _inp, out, _name=name):
            if isinstance(out, torch.Tensor):
                finished.append((_name, out, m))

        handles.append(mod.register_forward_hook(hook))
    try:
        with _preserved(model), torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    pooled_ids = {id(out) for _, out, m in finished if isinstance(m, _POOL_TYPES)}
    best = None
    for name, out, m in finished:
        if out.ndim != n_spatial + 2 or isinstance(m, _POOL_TYPES) or id(out) in pooled_ids:
            continue
        if int(np.prod(out.shape[2:])) > 1:
            best = name
    if best is None:
        return find_target_layer(model, None)
    return best


def _is_activation(m: nn.Module) -> bool:
    return isinstance(m, (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.PReLU, nn.ReLU6, nn.Mish)) or (
        type(m).__module__.startswith("monai") and "act" in type(m).__name__.lower()
    )


def _class_scores(logits: torch.Tensor, class_idx) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample score to differentiate, and the class index used for each sample."""
    n = logits.shape[0]
    if logits.ndim == 1 or (logits.ndim == 2 and logits.shape[1] == 1):
        z = logits.reshape(n)
        idx = torch.ones(n, dtype=torch.long) if class_idx is None else _as_index(class_idx, n)
        if ((idx != 0) & (idx != 1)).any():
            raise ConfigError(f"a single-logit binary model has classes 0 and 1, got class_idx={class_idx!r}")
        return torch.where(idx.to(z.device) == 1, z, -z), idx
    if logits.ndim != 2:
        raise DataError(f"the model must return logits (N, K) or (N,), got shape {tuple(logits.shape)}")
    k = logits.shape[1]
    idx = logits.argmax(1).cpu() if class_idx is None else _as_index(class_idx, n)
    if (idx < 0).any() or (idx >= k).any():
        raise ConfigError(f"class_idx must be in 0..{k - 1}, got {class_idx!r}")
    return logits.gather(1, idx.to(logits.device)[:, None])[:, 0], idx


def _as_index(class_idx, n: int) -> torch.Tensor:
    idx = torch.as_tensor(class_idx, dtype=torch.long).reshape(-1)
    if idx.numel() == 1:
        idx = idx.expand(n)
    if idx.numel() != n:
        raise ConfigError(f"class_idx must be one int or one per sample ({n}), got {idx.numel()}")
    return idx.clone()


def _normalise(maps: torch.Tensor) -> np.ndarray:
    """Per-sample min-max to [0, 1]; a flat map becomes all zeros."""
    flat = maps.reshape(maps.shape[0], -1)
    lo = flat.min(1, keepdim=True).values
    hi = flat.max(1, keepdim=True).values
    span = hi - lo
    out = torch.where(span > 0, (flat - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(flat))
    return out.reshape(maps.shape).detach().cpu().numpy().astype(np.float32)


def _upsample(maps: torch.Tensor, size: Sequence[int], geometry=None) -> torch.Tensor:
    """Resize (N, 1, *feat) maps to the input ``size``.

    With a ``geometry`` (per axis ``(a, b)``: feature index ``i`` is centred on input coordinate
    ``a * i + b``) every input position samples the map where its receptive field is centred,
    clamping at the borders; otherwise plain (bi/tri)linear interpolation as MONAI does.
    """
    size = tuple(int(s) for s in size)
    if geometry is None:
        mode = "bilinear" if len(size) == 2 else "trilinear"
        return F.interpolate(maps, size=size, mode=mode, align_corners=False)
    feat = maps.shape[2:]
    axes = []
    for (a, b), n_in, n_f in zip(geometry, size, feat):
        f = (torch.arange(n_in, dtype=maps.dtype, device=maps.device) - b) / a
        axes.append(2 * f / (n_f - 1) - 1 if n_f > 1 else torch.zeros_like(f))
    mesh = torch.meshgrid(*axes, indexing="ij")
    grid = torch.stack(mesh[::-1], dim=-1)[None].expand(maps.shape[0], *size, len(size))
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _chain_geometry(model: nn.Module, x: torch.Tensor, layer: nn.Module):
    """Receptive-field centres of ``layer``'s output grid, when the layers up to it form a plain
    chain of convolutions / pools and shape-preserving layers (the baseline CNN); else ``None``.

    Valid (unpadded) convolutions shift and shrink the grid, so plain interpolation misplaces a
    heatmap by up to a few pixels; aligning by receptive-field centre removes that error.
    """
    records: list[tuple[nn.Module, tuple, tuple]] = []
    done = {}

    def hook(m, inp, out):
        if "stop" in done or not inp or not isinstance(inp[0], torch.Tensor) or not isinstance(out, torch.Tensor):
            return
        records.append((m, tuple(inp[0].shape[2:]), tuple(out.shape[2:])))

    def stop_hook(m, inp, out):
        done["stop"] = tuple(out.shape[2:])

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    handles.append(layer.register_forward_hook(stop_hook))
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    if "stop" not in done:
        return None
    nd = x.ndim - 2
    geo = [(1.0, 0.0)] * nd  # input coordinate = a * index + b, for the current grid
    cur = tuple(x.shape[2:])
    for m, in_size, out_size in records:
        if in_size == out_size and not isinstance(m, _CONV_TYPES + _POOL_TYPES):
            continue  # elementwise: ReLU, BatchNorm, Dropout...
        if not isinstance(m, _CONV_TYPES + (nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool2d, nn.AvgPool3d)) or in_size != cur:
            return None  # branching or an unknown resampling layer: give up, interpolate
        if isinstance(getattr(m, "padding", 0), str):
            return None
        k, s, p, d = (_ints(getattr(m, a, 1), nd) for a in ("kernel_size", "stride", "padding", "dilation"))
        geo = [(ga * si, ga * (dd * (kk - 1) / 2 - pp) + gb) for (ga, gb), kk, si, pp, dd in zip(geo, k, s, p, d)]
        cur = out_size
    if cur != done["stop"]:
        return None
    return geo


def gradcam(
    model: nn.Module,
    x,
    *,
    target_layer: str | None = None,
    class_idx=None,
    align: bool = True,
    return_logits: bool = False,
):
    """Grad-CAM heatmaps (N, H, W) or (N, D, H, W) in [0, 1], upsampled to the input size.

    ``target_layer`` is a module name (``dict(model.named_modules())``); by default
    :func:`find_target_layer` picks it. ``class_idx``: one int, one per sample, or ``None`` (the
    predicted class; the positive class for a single-logit binary model). ``align`` maps the
    coarse map back by receptive-field centres when the layers up to ``target_layer`` form a plain
    conv/pool chain (see :func:`_chain_geometry`), else plain interpolation is used. With
    ``return_logits=True`` returns ``(heatmaps, logits ndarray)``.
    """
    x = _check_input(x)
    name = target_layer or find_target_layer(model, x)
    layer = _get_module(model, name)
    store: dict[str, torch.Tensor] = {}

    def hook(_m, _inp, out):
        if not isinstance(out, torch.Tensor):
            raise DataError(f"layer {name!r} does not return a tensor; pick another target_layer")
        store["act"] = out

    handle = layer.register_forward_hook(hook)
    try:
        with _preserved(model), torch.enable_grad():
            xin = x.detach().clone().requires_grad_(True)  # keeps a graph even for frozen models
            logits = model(xin)
            if "act" not in store:
                raise DataError(f"layer {name!r} was not used in the forward pass")
            act = store["act"]
            if act.ndim != x.ndim:
                raise ConfigError(f"layer {name!r} has no spatial output (shape {tuple(act.shape)}); pick a conv layer")
            score, _ = _class_scores(logits, class_idx)
            (grad,) = torch.autograd.grad(score.sum(), act)
            weights = grad.mean(dim=tuple(range(2, grad.ndim)), keepdim=True)
            cam = F.relu((weights * act).sum(1, keepdim=True))
            geometry = _chain_geometry(model, x, layer) if align else None
            cam = _upsample(cam.detach(), x.shape[2:], geometry)[:, 0]
    finally:
        handle.remove()
    heat = _normalise(cam)
    if return_logits:
        return heat, logits.detach().cpu().numpy()
    return heat


def occlusion(
    model: nn.Module,
    x,
    *,
    class_idx=None,
    patch: int | Sequence[int] = 8,
    stride: int | Sequence[int] | None = None,
    fill: float | None = None,
    batch_size: int = 64,
) -> np.ndarray:
    """Occlusion sensitivity heatmaps in [0, 1], same spatial size as ``x``.

    Each patch position is replaced by ``fill`` (default: the image's mean) and the drop of the
    class score (softmax / sigmoid probability) is credited to the occluded pixels, averaged over
    overlapping patches; negative drops count as 0. Occluded copies are run in batches of
    ``batch_size``. ``stride`` defaults to ``patch // 2``.
    """
    x = _check_input(x)
    spatial = tuple(x.shape[2:])
    nd = len(spatial)
    patch_t = _tuple(patch, nd, "patch")
    stride_t = _tuple(stride if stride is not None else [max(1, p // 2) for p in patch_t], nd, "stride")
    if any(p > s for p, s in zip(patch_t, spatial)):
        raise ConfigError(f"occlusion patch {patch_t} is larger than the image {spatial}")
    starts = [sorted(set(list(range(0, s - p + 1, st)) + [s - p])) for s, p, st in zip(spatial, patch_t, stride_t)]
    grid = np.stack(np.meshgrid(*starts, indexing="ij"), -1).reshape(-1, nd)
    out = []
    with _preserved(model), torch.inference_mode():
        for i in range(x.shape[0]):
            xi = x[i : i + 1]
            base_logits = model(xi)
            base, idx = _class_scores(base_logits, class_idx if class_idx is None or np.ndim(class_idx) == 0 else np.asarray(class_idx)[i])
            base_p = _prob(base_logits, base)
            fv = float(xi.mean()) if fill is None else float(fill)
            heat = torch.zeros(spatial)
            hits = torch.zeros(spatial)
            for s in range(0, len(grid), batch_size):
                g = grid[s : s + batch_size]
                batch = xi.repeat(len(g), *([1] * (xi.ndim - 1)))
                for j, st in enumerate(g):
                    sl = tuple(slice(int(a), int(a) + p) for a, p in zip(st, patch_t))
                    batch[(j, slice(None)) + sl] = fv
                lg = model(batch)
                sc, _ = _class_scores(lg, idx.expand(len(g)))
                drop = (base_p - _prob(lg, sc)).clamp(min=0).cpu()
                for j, st in enumerate(g):
                    sl = tuple(slice(int(a), int(a) + p) for a, p in zip(st, patch_t))
                    heat[sl] += drop[j]
                    hits[sl] += 1
            out.append(heat / hits.clamp(min=1))
    return _normalise(torch.stack(out)[:, None])[:, 0]


def _prob(logits: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Probability of the explained class: sigmoid of a single logit, else softmax."""
    if logits.ndim == 1 or logits.shape[1] == 1:
        return torch.sigmoid(score)
    m = logits.max(1).values
    return torch.exp(score - m) / torch.exp(logits - m[:, None]).sum(1)


def _ints(v, nd: int) -> tuple[int, ...]:
    return (int(v),) * nd if np.ndim(v) == 0 else tuple(int(a) for a in v)


def _tuple(v, nd: int, what: str) -> tuple[int, ...]:
    t = (int(v),) * nd if np.ndim(v) == 0 else tuple(int(a) for a in v)
    if len(t) != nd or any(a < 1 for a in t):
        raise ConfigError(f"occlusion {what} must be a positive int or {nd} positive ints, got {v!r}")
    return t


# --------------------------------------------------------------------------------------------
# overlays
# --------------------------------------------------------------------------------------------


def heatmap_peak(heatmap, rtol: float = 1e-4) -> tuple[int, ...]:
    """Index of a heatmap's maximum; when the maximum is a plateau (e.g. a border region that
    the coarse map covers with one value) the plateau's centre, not its first element."""
    h = np.asarray(heatmap, dtype=np.float64)
    top = np.argwhere(h >= h.max() - rtol * max(abs(h.max()), 1e-12))
    centre = top.mean(axis=0)
    nearest = top[np.argmin(((top - centre) ** 2).sum(axis=1))]
    return tuple(int(v) for v in nearest)


def _to_rgb(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 3:  # (C, H, W)
        if img.shape[0] == 1:
            img = img[0]
        elif img.shape[0] >= 3:
            img = np.moveaxis(img[:3], 0, -1)
        else:
            img = img.mean(0)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise DataError(f"overlay image must be (H, W) or (C, H, W), got shape {np.shape(image)}")
    lo, hi = float(img.min()), float(img.max())
    if lo < 0 or hi > 1:  # not in [0, 1]: rescale for display only
        img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    return img


def _blend(image: np.ndarray, heatmap: np.ndarray, alpha: float, cmap: str) -> np.ndarray:
    from matplotlib import colormaps

    rgb = _to_rgb(image)
    h = np.asarray(heatmap, dtype=np.float32)
    if h.shape != rgb.shape[:2]:
        raise DataError(f"heatmap shape {h.shape} does not match the image {rgb.shape[:2]}")
    if not 0 <= alpha <= 1:
        raise ConfigError(f"alpha must be in [0,1], got {alpha!r}")
    try:
        cm = colormaps[cmap]
    except KeyError:
        raise ConfigError(f"unknown colormap {cmap!r}") from None
    colour = cm(np.clip(h, 0, 1))[..., :3].astype(np.float32)
    return np.clip((1 - alpha) * rgb + alpha * colour, 0, 1)


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def overlay_png(image, heatmap, alpha: float = OVERLAY_ALPHA, cmap: str = "jet") -> bytes:
    """PNG bytes of ``image`` ((H, W) or (C, H, W), values in [0, 1]) with ``heatmap`` (H, W)
    blended on top through a matplotlib colormap. No pyplot figure is created."""
    return _png(_blend(image, heatmap, alpha, cmap))


def orthogonal_slices(volume, heatmap, alpha: float = OVERLAY_ALPHA, cmap: str = "jet", gap: int = 4) -> bytes:
    """PNG bytes with axial / coronal / sagittal overlays side by side, through the heatmap's
    maximum. ``volume`` (D, H, W) or (C, D, H, W) in [0, 1]; ``heatmap`` (D, H, W)."""
    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim == 4:
        vol = vol.mean(0)
    h = np.asarray(heatmap, dtype=np.float32)
    if vol.ndim != 3 or h.shape != vol.shape:
        raise DataError(f"orthogonal_slices needs (D, H, W) volume and heatmap, got {vol.shape} and {h.shape}")
    lo, hi = float(vol.min()), float(vol.max())
    if lo < 0 or hi > 1:
        vol = (vol - lo) / (hi - lo) if hi > lo else np.zeros_like(vol)
    d, r, c = heatmap_peak(h)
    views = [
        _blend(vol[d], h[d], alpha, cmap),  # axial (H, W)
        _blend(vol[:, r, :], h[:, r, :], alpha, cmap),  # coronal (D, W)
        _blend(vol[:, :, c], h[:, :, c], alpha, cmap),  # sagittal (D, H)
    ]
    height = max(v.shape[0] for v in views)
    width = sum(v.shape[1] for v in views) + gap * (len(views) - 1)
    canvas = np.ones((height, width, 3), dtype=np.float32)
    x0 = 0
    for v in views:
        canvas[: v.shape[0], x0 : x0 + v.shape[1]] = v
        x0 += v.shape[1] + gap
    return _png(canvas)


def save_explanations(
    out_dir: str | os.PathLike,
    names: Sequence[str],
    images,
    heatmaps,
    *,
    alpha: float = OVERLAY_ALPHA,
    cmap: str = "jet",
) -> list[dict[str, Path]]:
    """Write ``<name>_heatmap.npy`` and ``<name>_overlay.png`` for each sample.

    ``images``: (N, C, H, W) / (N, C, D, H, W) or a list of per-sample arrays; ``heatmaps``:
    (N, H, W) / (N, D, H, W). 3D samples get an orthogonal-slices overlay. Returns the paths.
    """
    from medsight.utils import atomic_write_bytes, private_dir

    out = private_dir(out_dir)  # heatmaps of patient images, named after their files: 0700 / 0600
    if len(names) != len(images) or len(names) != len(heatmaps):
        raise DataError(f"got {len(names)} names, {len(images)} images and {len(heatmaps)} heatmaps")
    written = []
    for name, img, heat in zip(names, images, heatmaps):
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name)) or "sample"
        img = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
        heat = np.asarray(heat, dtype=np.float32)
        npy = out / f"{safe}_heatmap.npy"
        png = out / f"{safe}_overlay.png"
        buf = io.BytesIO()
        np.save(buf, heat)
        atomic_write_bytes(npy, buf.getvalue(), private=True)
        data = orthogonal_slices(img, heat, alpha, cmap) if heat.ndim == 3 else overlay_png(img, heat, alpha, cmap)
        atomic_write_bytes(png, data, private=True)
        written.append({"heatmap": npy, "overlay": png})
    return written


def explain_batch(model: nn.Module, x, *, tab=None, class_idx=None, method: str = "gradcam") -> np.ndarray:
    """Heatmaps in [0, 1] at input size for a float batch of model inputs (Grad-CAM or occlusion), for the
    predicted class unless ``class_idx``. An image + clinical model is explained through its image branch with
    each case's encoded clinical row held fixed (``tab``, one row per image)."""
    if method not in EXPLAIN_METHODS:
        raise ConfigError(f"unknown explanation method {method!r}; allowed: {', '.join(EXPLAIN_METHODS)}")
    x = torch.as_tensor(np.asarray(x, dtype=np.float32)) if not isinstance(x, torch.Tensor) else x.float()
    if tab is not None:  # one case at a time, each with its own clinical row bound
        tab = torch.as_tensor(np.asarray(tab, dtype=np.float32))
        idx = [class_idx] * len(x) if class_idx is None or np.ndim(class_idx) == 0 else list(class_idx)
        return np.concatenate([explain_batch(model.model_with_tab(tab[i:i + 1]), x[i:i + 1], class_idx=idx[i],
                                             method=method) for i in range(len(x))])
    if method == "gradcam":
        return gradcam(model, x, class_idx=class_idx)
    return occlusion(model, x, class_idx=class_idx, patch=max(2, min(x.shape[2:]) // 4))


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = OVERLAY_ALPHA) -> bytes:
    """PNG of a model input (C, *size) with its heatmap: a 2D overlay, or three orthogonal slices for 3D."""
    if np.ndim(heatmap) == 3:
        return orthogonal_slices(image, heatmap, alpha)
    return overlay_png(image, heatmap, alpha)


__all__ = ["explain_batch", "overlay", "find_target_layer", "gradcam", "heatmap_peak", "occlusion", "orthogonal_slices", "overlay_png", "save_explanations"]
