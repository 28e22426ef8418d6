"""Robustness to distribution shift: a fixed, seeded battery of realistic corruptions at severities 1..5.

Every corruption takes a batched float tensor ``x`` of shape ``(B, C, *spatial)`` (2D or 3D) with values in
[0, 1] and returns one of the same shape, clamped to [0, 1]. Severity ``s`` in 1..5 picks a fixed parameter
from the corruption's table (see ``CORRUPTIONS[name].levels``); the randomness (noise, bias-field coefficients,
offset signs) comes from ``torch.Generator().manual_seed(seed)``, so ``corrupt(x, name, s, seed)`` is
reproducible.

==================  ===============================================  ======================
name                what it models                                   severity parameter
==================  ===============================================  ======================
gaussian_noise      sensor / quantum noise                           noise std
gaussian_blur       defocus, motion, thick slices                    kernel sigma (px)
contrast            low-contrast acquisition (reduce contrast)       contrast factor
gamma               different display / detector response            gamma exponent
resolution_loss     low-resolution scanner (down- then up-sample)    downsampling factor
jpeg                lossy PACS / export compression (2D only)        JPEG quality
bias_field          MR coil inhomogeneity (smooth multiplicative)    polynomial coefficient range
intensity_shift     CT calibration drift (additive offset)           offset magnitude
==================  ===============================================  ======================

:func:`evaluate_shift` runs a model on clean and corrupted copies of a split and reports each metric per
corruption and severity and its drop from clean; :func:`plot_shift` and :func:`shift_table_html` render that
result for the HTML report.
"""

from __future__ import annotations

import html
import io
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medsight.config import EVAL_BATCH_SIZE
from medsight import progress
from medsight.errors import ConfigError, DataError, choices_message
from medsight.inference import run_logits

SEVERITIES = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class Corruption:
    name: str
    fn: Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]
    levels: tuple[float, ...]  # parameter at severity 1..5
    description: str
    dims: tuple[int, ...] = (2, 3)


def _check_batch(x: torch.Tensor) -> int:
    if not isinstance(x, torch.Tensor):
        raise DataError(f"corruptions need a torch.Tensor batch, got {type(x).__name__}")
    if x.dim() not in (4, 5):
        raise DataError(f"corruptions need a (B, C, H, W) or (B, C, D, H, W) batch, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise DataError(f"corruptions need float images in [0, 1], got dtype {x.dtype} (use medsight.augment.to_float)")
    return x.dim() - 2


def _rand(shape, gen: torch.Generator, x: torch.Tensor, normal: bool = False) -> torch.Tensor:
    r = torch.randn(shape, generator=gen) if normal else torch.rand(shape, generator=gen)
    return r.to(device=x.device, dtype=x.dtype)


def _gaussian_noise(x, sigma, gen):
    return x + _rand(x.shape, gen, x, normal=True) * sigma


def _gaussian_kernel(sigma: float, x: torch.Tensor) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _gaussian_blur(x, sigma, gen):
    dims = x.dim() - 2
    k = _gaussian_kernel(sigma, x)
    r = (len(k) - 1) // 2
    B, C = x.shape[:2]
    y = x.reshape(B * C, 1, *x.shape[2:])
    conv = F.conv2d if dims == 2 else F.conv3d
    for axis in range(dims):  # separable: one 1D kernel per spatial axis, reflect padding
        shape = [1, 1] + [1] * dims
        shape[2 + axis] = len(k)
        pad = [0, 0] * dims
        pad[2 * (dims - 1 - axis)] = pad[2 * (dims - 1 - axis) + 1] = r
        mode = "reflect" if min(x.shape[2:]) > r else "replicate"
        y = conv(F.pad(y, pad, mode=mode), k.reshape(shape))
    return y.reshape(x.shape)


def _mean_per_image(x):
    return x.mean(dim=tuple(range(1, x.dim())), keepdim=True)


def _contrast(x, factor, gen):
    m = _mean_per_image(x)
    return (x - m) * factor + m


def _gamma(x, g, gen):
    return x.clamp(0, 1).pow(g)


def _resolution_loss(x, factor, gen):
    dims = x.dim() - 2
    size = tuple(int(s) for s in x.shape[2:])
    small = tuple(max(2, int(round(s / factor))) for s in size)
    down = F.interpolate(x, size=small, mode="area")
    return F.interpolate(down, size=size, mode="bilinear" if dims == 2 else "trilinear", align_corners=False)


def _jpeg(x, quality, gen):
    from PIL import Image

    if x.dim() != 4:
        raise DataError(f"jpeg is a 2D corruption; got a {x.dim() - 2}D batch of shape {tuple(x.shape)}")
    arr = (x.detach().clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    out = np.empty_like(arr)
    q = int(quality)
    for i in range(arr.shape[0]):
        planes = [arr[i]] if arr.shape[1] == 3 else [arr[i, c:c + 1] for c in range(arr.shape[1])]
        decoded = []
        for p in planes:
            img = Image.fromarray(np.moveaxis(p, 0, -1)) if p.shape[0] == 3 else Image.fromarray(p[0], mode="L")
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=q)
            buf.seek(0)
            d = np.asarray(Image.open(buf))
            decoded.append(np.moveaxis(d, -1, 0) if d.ndim == 3 else d[None])
        out[i] = np.concatenate(decoded, axis=0)
    return torch.from_numpy(out).to(device=x.device, dtype=x.dtype) / 255.0


def _poly_terms(shape: Sequence[int], order: int, x: torch.Tensor) -> torch.Tensor:
    """All monomials of the normalised coordinates up to ``order``, except the constant: (T, *shape)."""
    dims = len(shape)
    axes = [torch.linspace(-1, 1, s, device=x.device, dtype=x.dtype) for s in shape]
    grids = torch.meshgrid(*axes, indexing="ij")
    terms = []

    def rec(axis, remaining, powers):
        if axis == dims:
            if sum(powers) > 0:
                t = torch.ones(tuple(shape), device=x.device, dtype=x.dtype)
                for g, p in zip(grids, powers):
                    t = t * g ** p
                terms.append(t)
            return
        for p in range(remaining + 1):
            rec(axis + 1, remaining - p, powers + [p])

    rec(0, order, [])
    return torch.stack(terms)


def _bias_field(x, alpha, gen):
    """TorchIO-style: field = exp(sum_k c_k * monomial_k), c_k ~ U(-alpha, alpha), polynomial order 3."""
    terms = _poly_terms(x.shape[2:], 3, x)  # (T, *S)
    coef = (_rand((x.shape[0], terms.shape[0]), gen, x) * 2 - 1) * alpha  # (B, T)
    log_field = torch.einsum("bt,t...->b...", coef, terms).unsqueeze(1)
    return x * torch.exp(log_field)


def _intensity_shift(x, offset, gen):
    sign = torch.where(_rand((x.shape[0],), gen, x) < 0.5, -1.0, 1.0).to(x.dtype)
    return x + (sign * offset).view((-1,) + (1,) * (x.dim() - 1))


CORRUPTIONS: dict[str, Corruption] = {c.name: c for c in (
    Corruption("gaussian_noise", _gaussian_noise, (0.02, 0.04, 0.07, 0.10, 0.15), "additive Gaussian noise, std"),
    Corruption("gaussian_blur", _gaussian_blur, (0.5, 0.75, 1.0, 1.5, 2.0), "Gaussian blur, sigma in pixels"),
    Corruption("contrast", _contrast, (0.75, 0.6, 0.45, 0.3, 0.2), "contrast reduced to this factor"),
    Corruption("gamma", _gamma, (1.25, 1.5, 1.75, 2.0, 2.5), "gamma exponent (darker mid-tones)"),
    Corruption("resolution_loss", _resolution_loss, (1.5, 2.0, 2.5, 3.0, 4.0), "down-sample by this factor, then up"),
    Corruption("jpeg", _jpeg, (80, 60, 40, 25, 10), "JPEG quality (2D only)", dims=(2,)),
    Corruption("bias_field", _bias_field, (0.1, 0.2, 0.3, 0.4, 0.5), "MR bias field, polynomial coefficient range"),
    Corruption("intensity_shift", _intensity_shift, (0.04, 0.08, 0.12, 0.16, 0.2), "additive offset, random sign"),
)}


def corruptions_for(spatial_dims: int) -> list[str]:
    """The corruption names that apply to ``spatial_dims`` (2 or 3)."""
    return [n for n, c in CORRUPTIONS.items() if spatial_dims in c.dims]


def _check_name_severity(name: str, severity: int) -> Corruption:
    if name not in CORRUPTIONS:
        raise ConfigError(choices_message("corruption", name, CORRUPTIONS))
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= severity <= 5:
        raise ConfigError(f"corruption severity must be an integer 1..5, got {severity!r}")
    return CORRUPTIONS[name]


def corrupt(x: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """Apply corruption ``name`` at ``severity`` (1..5) to a float batch in [0, 1]; returns a new tensor in [0, 1]."""
    c = _check_name_severity(name, severity)
    dims = _check_batch(x)
    if dims not in c.dims:
        raise ConfigError(f"corruption {name!r} applies to {'/'.join(f'{d}D' for d in c.dims)} images, "
                          f"not {dims}D")
    gen = torch.Generator().manual_seed(int(seed))
    return c.fn(x, c.levels[severity - 1], gen).clamp(0, 1)


# --------------------------------------------------------------------------------------------- inference
def _as_task(task, labels):
    from medsight.tasks import Task, kind_of

    if isinstance(task, Task):
        return task
    if not isinstance(task, str):
        raise ConfigError(f"task must be a medsight.tasks.Task or a task name, got {type(task).__name__}")
    labels = np.asarray(labels)
    if kind_of(task).indicator_labels:
        k = labels.reshape(len(labels), -1).shape[1]
    else:
        k = max(2, int(labels.max()) + 1) if len(labels) else 2
    return Task(task, k)


def _shift_logits(model, images, *, name, severity, seed, batch_size, device, tta_flip, tab):
    def corrupt_batch(x, bi):  # a different, fixed seed per batch, so batches do not share noise
        return x if name is None else corrupt(x, name, severity, seed=seed * 1_000_003 + bi)

    return run_logits(model, images, batch_size=batch_size, device=device, tta_flip=tta_flip, tab=tab,
                      transform=corrupt_batch)


def evaluate_shift(model: nn.Module, task, images, labels, *, corruptions: Sequence[str] | None = None,
                   severities: Sequence[int] = (1, 3, 5), seed: int = 0, batch_size: int = EVAL_BATCH_SIZE,
                   device: str | torch.device | None = None, temperature: float = 1.0, threshold=None,
                   tta_flip: Sequence[int] | None = None, tab=None) -> dict:
    """Metrics of ``model`` on clean and corrupted copies of ``images`` (uint8 or float in [0, 1], (N, C, *S)).

    ``task`` is a :class:`medsight.tasks.Task` or a task name. ``tta_flip`` (spatial axes, 1-based) and ``tab``
    (encoded clinical rows) are passed to :func:`medsight.inference.run_model` as for any evaluation. ``corruptions`` defaults to every corruption that
    applies to the images' dimensionality. Returns a JSON-able dict::

        {"task": "binary", "n": 624, "seed": 0, "severities": [1, 3, 5], "primary": "auc",
         "clean": {"accuracy": .., "auc": ..},
         "corruptions": {"gaussian_noise": [{"severity": 1, "param": 0.02, "metrics": {...},
                                             "drop": {"auc": clean - corrupted, ...}}, ...], ...},
         "summary": {"gaussian_noise": {"mean": .., "worst": .., "mean_drop": ..}, ...},
         "mean_corrupted": .., "mean_drop": ..}

    ``primary`` is the metric the summary, plot and table use (AUC where defined, else accuracy).
    """
    from medsight.metrics import compute_metrics

    from medsight.data.cache import DiskArray

    # rows on disk (a streamed split) stay there: run_model reads them one batch at a time
    x = images if isinstance(images, (torch.Tensor, DiskArray)) else torch.as_tensor(images)
    labels = np.asarray(labels)
    if len(x.shape) not in (4, 5):
        raise DataError(f"evaluate_shift needs images of shape (N, C, H, W) or (N, C, D, H, W), got {tuple(x.shape)}")
    if len(x) != len(labels):
        raise DataError(f"evaluate_shift: {len(x)} images but {len(labels)} labels")
    if len(x) == 0:
        raise DataError("evaluate_shift: no images")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    dims = len(x.shape) - 2
    names = list(corruptions) if corruptions is not None else corruptions_for(dims)
    if not names:
        raise ConfigError("evaluate_shift: no corruptions given")
    sevs = [int(s) for s in severities]
    if not sevs:
        raise ConfigError("evaluate_shift: no severities given")
    for n in names:
        c = _check_name_severity(n, 1)
        if dims not in c.dims:
            raise ConfigError(f"corruption {n!r} applies to {'/'.join(f'{d}D' for d in c.dims)} images, not {dims}D")
    for s in sevs:
        _check_name_severity(names[0], s)
    t = _as_task(task, labels)
    dev = torch.device(device) if device is not None else next(model.parameters()).device

    def metrics_for(name, severity):
        logits = _shift_logits(model, x, name=name, severity=severity, seed=seed, batch_size=batch_size,
                               device=dev, tta_flip=tta_flip, tab=tab)
        probs = t.probabilities(logits, temperature).numpy()
        return {k: float(v) for k, v in compute_metrics(t.name, labels, probs, threshold=threshold).items()
                if isinstance(v, (int, float, np.floating))}

    clean = metrics_for(None, 0)
    primary = "auc" if math.isfinite(clean.get("auc", float("nan"))) else "accuracy"
    result = {"task": t.name, "n": int(len(x)), "seed": int(seed), "severities": sevs, "primary": primary,
              "tta_flip": list(tta_flip) if tta_flip else None, "clean": clean, "corruptions": {},
              "summary": {}}
    all_vals = []
    for n in progress.track(names, "shift battery (corruptions)"):
        rows = []
        for s in sevs:
            m = metrics_for(n, s)
            rows.append({"severity": s, "param": CORRUPTIONS[n].levels[s - 1], "metrics": m,
                         "drop": {k: clean[k] - v for k, v in m.items() if k in clean}})
        vals = [r["metrics"].get(primary, float("nan")) for r in rows]
        all_vals += vals
        result["corruptions"][n] = rows
        result["summary"][n] = {"mean": float(np.mean(vals)), "worst": float(np.min(vals)),
                                "mean_drop": float(clean.get(primary, float("nan")) - np.mean(vals))}
    result["mean_corrupted"] = float(np.mean(all_vals))
    result["mean_drop"] = float(clean.get(primary, float("nan")) - np.mean(all_vals))
    return result


# --------------------------------------------------------------------------------------------- rendering
def _check_result(result: dict) -> None:
    if not isinstance(result, dict) or not {"clean", "corruptions", "primary"} <= set(result):
        raise DataError("not a shift result: expected the dict returned by medsight.shift.evaluate_shift")


def plot_shift(result: dict, *, title: str | None = None) -> bytes:
    """PNG bytes: the primary metric (AUC) against severity, one line per corruption, severity 0 = clean."""
    _check_result(result)
    from matplotlib.figure import Figure  # no pyplot: the global backend is left alone

    primary = result["primary"]
    clean = result["clean"].get(primary, float("nan"))
    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for name, rows in result["corruptions"].items():
        xs = [0] + [r["severity"] for r in rows]
        ys = [clean] + [r["metrics"].get(primary, float("nan")) for r in rows]
        ax.plot(xs, ys, marker="o", label=name)
    ax.axhline(clean, color="black", linestyle="--", linewidth=0.8)
    ax.set_xlabel("severity (0 = clean)")
    ax.set_ylabel("AUC" if primary == "auc" else primary)
    ax.set_xticks([0] + list(result["severities"]))
    label = "AUC" if primary == "auc" else primary
    ax.set_title(title or f"{label} under distribution shift (n={result.get('n')})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def shift_table_html(result: dict, *, digits: int = 3) -> str:
    """A self-contained ``<table class="medsight-shift">``: rows = corruptions, columns = clean + severities,
    cells = primary metric with its drop from clean."""
    _check_result(result)
    primary = result["primary"]
    clean = result["clean"].get(primary, float("nan"))

    def fmt(v):
        return "-" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"

    sevs = result["severities"]
    head = "".join(f"<th>severity {int(s)}</th>" for s in sevs)
    lines = [f'<table class="medsight-shift"><caption>{html.escape(primary)} under distribution shift '
             f'(drop from clean in parentheses)</caption>',
             f"<thead><tr><th>corruption</th><th>clean</th>{head}<th>mean</th></tr></thead><tbody>"]
    for name, rows in result["corruptions"].items():
        by = {r["severity"]: r for r in rows}
        cells = []
        for s in sevs:
            r = by.get(s)
            if r is None:
                cells.append("<td>-</td>")
                continue
            v = r["metrics"].get(primary, float("nan"))
            cells.append(f"<td>{fmt(v)} ({fmt(r['drop'].get(primary, float('nan')))})</td>")
        mean = result.get("summary", {}).get(name, {}).get("mean", float("nan"))
        lines.append(f"<tr><th>{html.escape(name)}</th><td>{fmt(clean)}</td>{''.join(cells)}<td>{fmt(mean)}</td></tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)
