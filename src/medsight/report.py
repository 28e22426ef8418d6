"""One self-contained HTML evaluation report.

Every image is a base64 ``data:image/png`` URI drawn with matplotlib's Agg canvas (no pyplot
state, no display needed); there is no external JS, CSS or font, so the file opens offline and
can be mailed or archived as it is. All text passes through :func:`html.escape`.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from . import metrics as M
from .errors import DataError
from .tasks import kind_of

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f2f2f2}
td.l,th.l{text-align:left}.ci{color:#666;font-size:.85em}
.figs{display:flex;flex-wrap:wrap;gap:12px}.figs img{max-width:100%;border:1px solid #eee}
.gallery{display:flex;flex-wrap:wrap;gap:10px}
.card{border:2px solid #ccc;padding:4px;width:340px;font-size:.8em}
.card img{width:100%}.ok{border-color:#3a3}.bad{border-color:#c33}
.note{color:#555;font-size:.9em}
.warn{background:#fff4e5;border-left:4px solid #e69500;padding:6px 10px;margin:8px 0}
ul.facts{margin:4px 0;padding-left:20px}ul.facts li{margin:2px 0}
dl.glossary{font-size:.85em;columns:2 420px}dl.glossary dt{margin-top:4px}dl.glossary dd{margin:0 0 4px 12px;color:#444}
"""


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _figure(w: float = 4.2, h: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _fig_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def png_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` URI for PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(png: bytes, alt: str) -> str:
    return f'<img src="{png_data_uri(png)}" alt="{_esc(alt)}">'


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return f"{float(v):.{digits}f}"


def _value_ci(entry: Mapping | None) -> str:
    if not entry:
        return "–"
    v = entry.get("value")
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        why = entry.get("reason")
        return f'undefined <span class="ci">({_esc(why)})</span>' if why else "undefined"
    ci = entry.get("ci")
    s = _esc(_fmt(entry.get("value")))
    if ci and len(ci) == 2 and all(c is not None and math.isfinite(c) for c in ci):
        s += f' <span class="ci">({_fmt(ci[0])}–{_fmt(ci[1])})</span>'
    return s


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------


def _binary_curves(y: np.ndarray, p: np.ndarray):
    from sklearn.metrics import precision_recall_curve, roc_curve

    if y.min() == y.max():
        return None
    fpr, tpr, _ = roc_curve(y, p)
    prec, rec, _ = precision_recall_curve(y, p)
    return fpr, tpr, prec, rec


def _one_vs_rest(task: str, y: np.ndarray, p: np.ndarray, class_names: Sequence[str]):
    """[(name, y01, score)] curves to draw for the task."""
    return kind_of(task).one_vs_rest(y, p, class_names)


def plot_roc_pr(task, y_true, probs, class_names, threshold=None, title: str = "") -> bytes:
    """ROC and precision-recall curves side by side; the binary operating point is marked."""
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    fig = _figure(7.2, 3.7)
    ax_roc, ax_pr = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name, yc, sc in _one_vs_rest(task, y, p, class_names):
        curves = _binary_curves(np.asarray(yc).astype(int), sc)
        if curves is None:
            continue
        fpr, tpr, prec, rec = curves
        ax_roc.plot(fpr, tpr, lw=1.5, label=str(name))
        ax_pr.plot(rec, prec, lw=1.5, label=str(name))
    if kind_of(task).has_positive_class and threshold is not None:
        m = M.compute_metrics(task, y, p, threshold=threshold)
        if math.isfinite(m["sensitivity"]) and math.isfinite(m["specificity"]):
            ax_roc.plot([1 - m["specificity"]], [m["sensitivity"]], "o", color="k", label=f"threshold {threshold:.3g}")
        if math.isfinite(m["sensitivity"]) and math.isfinite(m["ppv"]):
            ax_pr.plot([m["sensitivity"]], [m["ppv"]], "o", color="k", label=f"threshold {threshold:.3g}")
    ax_roc.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    ax_roc.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC {title}".strip(), xlim=(0, 1), ylim=(0, 1.01))
    ax_pr.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title=f"PR {title}".strip(), xlim=(0, 1), ylim=(0, 1.01))
    for ax in (ax_roc, ax_pr):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right" if ax is ax_roc else "lower left")
    return _fig_png(fig)


def plot_confusion(cm, class_names: Sequence[str], title: str = "") -> bytes:
    """Confusion matrix (rows = truth): each cell shows its count and its share of the true class (row %), and
    is shaded by that share, so a rare class reads as clearly as a common one. A multilabel (K, 2, 2) stack is
    drawn as one 2x2 panel per class."""
    cm = np.asarray(cm)
    if cm.ndim == 3:
        k = cm.shape[0]
        fig = _figure(min(2.6 * k, 13), 2.9)
        for c in range(k):
            ax = fig.add_subplot(1, k, c + 1)
            _draw_cm(ax, cm[c], ["neg", "pos"], str(class_names[c]))
        return _fig_png(fig)
    k = cm.shape[0]
    fig = _figure(max(4.0, 0.8 * k + 2.2), max(3.6, 0.7 * k + 1.8))
    _draw_cm(fig.add_subplot(1, 1, 1), cm, class_names, title or "confusion matrix")
    return _fig_png(fig)


def row_percentages(cm) -> np.ndarray:
    """Each row of a confusion matrix as percentages of its true class (nan for an empty row)."""
    cm = np.asarray(cm, dtype=np.float64)
    rows = cm.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rows > 0, 100.0 * cm / np.where(rows > 0, rows, 1), np.nan)


def _draw_cm(ax, cm, names, title):
    pct = row_percentages(cm)
    ax.imshow(np.nan_to_num(pct), cmap="Blues", vmin=0, vmax=100)
    k = cm.shape[0]
    for i in range(k):
        for j in range(k):
            share = "–" if np.isnan(pct[i, j]) else f"{pct[i, j]:.1f}%"
            dark = not np.isnan(pct[i, j]) and pct[i, j] > 55
            ax.text(j, i, f"{int(cm[i, j])}\n{share}", ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
    names = [_wrap(str(n)) for n in names][:k]
    ax.set_xticks(range(k), names, rotation=45 if k > 3 else 0, fontsize=7)
    ax.set_yticks(range(k), names, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true (row % of the true class)", title=title)


def _wrap(name: str, width: int = 14) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(name, width)) or name


def plot_reliability(curves: Mapping[str, Mapping], title: str = "reliability") -> bytes:
    """Reliability diagram: one line per named curve (e.g. before / after temperature scaling), each a
    :func:`medsight.metrics.reliability_curve` dict; below it, the number of cases in each bin per curve
    (a point made of three cases deserves less trust than one made of three hundred)."""
    merged: dict[str, Mapping] = {}
    for name, rc in curves.items():  # identical curves (e.g. T = 1 kept) are drawn once, under both names
        same = next((k for k, v in merged.items() if _same_curve(v, rc)), None)
        if same is None:
            merged[str(name)] = rc
        else:
            merged[f"{same} = {name}"] = merged.pop(same)
    curves = merged
    fig = _figure(4.6, 5.0)
    gs = fig.add_gridspec(2, 1, height_ratios=(3, 1.2))
    ax = fig.add_subplot(gs[0])
    axc = fig.add_subplot(gs[1], sharex=ax)
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1, label="perfect")
    n = max(len(curves), 1)
    for i, (name, rc) in enumerate(curves.items()):
        conf = np.asarray(rc["confidence"], dtype=np.float64)
        acc = np.asarray(rc["accuracy"], dtype=np.float64)
        ok = ~(np.isnan(conf) | np.isnan(acc))
        count = np.asarray(rc.get("count") or [], dtype=np.float64)
        line = ax.plot(conf[ok], acc[ok], "o-", ms=3, label=str(name))[0]
        if count.size == conf.size:  # the binomial standard error of each point: wide where a bin is small
            se = np.sqrt(np.clip(acc * (1 - acc), 0, None) / np.maximum(count, 1))
            ax.errorbar(conf[ok], acc[ok], yerr=se[ok], fmt="none", ecolor=line.get_color(), alpha=0.5, lw=1)
            if rc.get("binning") == "equal-count":
                for x, yv, c in zip(conf[ok], acc[ok], count[ok]):
                    ax.annotate(f"{int(c)}", (x, yv), textcoords="offset points", xytext=(3, -9), fontsize=6,
                                color=line.get_color())
        edges = np.asarray(rc.get("edges") or np.linspace(0, 1, len(conf) + 1), dtype=np.float64)
        if count.size == len(edges) - 1:
            width = np.diff(edges) / n
            axc.bar(edges[:-1] + i * width, count, width=width, align="edge", color=line.get_color(), alpha=0.8)
    ax.set(ylabel="observed frequency", title=title, xlim=(0, 1), ylim=(0, 1))
    ax.tick_params(labelbottom=False)
    ax.legend(fontsize=7, loc="upper left")
    axc.set(xlabel="mean predicted probability", ylabel="cases per bin", xlim=(0, 1))
    return _fig_png(fig)


def _same_curve(a: Mapping, b: Mapping) -> bool:
    try:
        return all(np.allclose(np.asarray(a[k], dtype=np.float64), np.asarray(b[k], dtype=np.float64), equal_nan=True)
                   for k in ("confidence", "accuracy"))
    except (KeyError, ValueError, TypeError):
        return False


#: history series that are not metrics in [0, 1]
_NOT_METRICS = ("epoch", "lr", "seconds")
_PREFERRED = ("auc", "balanced_accuracy", "sensitivity", "specificity", "accuracy", "f1", "pr_auc", "ppv", "npv")


def history_panels(history: Sequence[Mapping[str, Any]]) -> list[tuple[list[str], str, tuple | None]]:
    """Which history series go on which panel: ``[(keys, y label, y limits)]``. Losses together; series whose
    values all lie in [0, 1] (at most six, AUC and balanced accuracy first) on a [0, 1] axis; seconds per epoch
    alone; the learning rate and anything else on no common scale are left out."""
    keys = sorted({k for row in history for k, v in row.items() if k not in _NOT_METRICS and _is_num(v)})
    losses = [k for k in keys if "loss" in k]
    unit = [k for k in keys if k not in losses and all(0 <= float(r[k]) <= 1 for r in history if _is_num(r.get(k)))]
    unit.sort(key=lambda k: next((i for i, p in enumerate(_PREFERRED) if k.endswith(p)), len(_PREFERRED)))
    panels: list[tuple[list[str], str, tuple | None]] = [(losses, "loss", None),
                                                         (unit[:6], "metric (validation)", (0, 1.02))]
    if any(_is_num(r.get("seconds")) for r in history):
        panels.append((["seconds"], "seconds per epoch", None))
    return panels


def plot_history(history: Sequence[Mapping[str, Any]], positive_class: str | None = None) -> bytes:
    """Training curves on axes that fit them: losses on one panel; metrics in [0, 1] on a second, fixed to
    [0, 1]; seconds per epoch on a third (when recorded). The learning rate is not drawn."""
    epochs = [row.get("epoch", i) for i, row in enumerate(history)]
    panels = history_panels(history)
    fig = _figure(4.0 * len(panels), 3.4)

    def label(k: str) -> str:
        from medsight.summary import POSITIVE_DEPENDENT

        base = k.replace("_", " ")
        if positive_class and any(k.endswith(m) for m in POSITIVE_DEPENDENT):
            return f"{base} ({positive_class})"
        return base

    for pos, (group, ylabel, ylim) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, len(panels), pos)
        for k in group:
            xs = [e for e, row in zip(epochs, history) if _is_num(row.get(k))]
            ys = [float(row[k]) for row in history if _is_num(row.get(k))]
            ax.plot(xs, ys, "o-", ms=3, label=label(k))
        ax.set(xlabel="epoch", ylabel=ylabel)
        if ylim:
            ax.set_ylim(*ylim)
        if group and ylabel != "seconds per epoch":
            ax.legend(fontsize=7)
    return _fig_png(fig)


def plot_case(image, heatmap, title: str = "") -> bytes:
    """One case: the plain image, the same image with the heatmap over it, and a colour bar for the heatmap.

    ``image``: (H, W), (1, H, W) or (3, H, W) in [0, 1]; ``heatmap``: (H, W) in [0, 1] (Grad-CAM relevance,
    relative to this image's maximum)."""
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3:
        img = img[0] if img.shape[0] == 1 else np.moveaxis(img[:3], 0, -1)
    h = np.asarray(heatmap, dtype=np.float64)
    fig = _figure(3.6, 1.9)
    gs = fig.add_gridspec(1, 3, width_ratios=(1, 1, 0.07))
    a0, a1, cax = fig.add_subplot(gs[0]), fig.add_subplot(gs[1]), fig.add_subplot(gs[2])
    kw = {"cmap": "gray", "vmin": 0, "vmax": 1} if img.ndim == 2 else {}
    a0.imshow(np.clip(img, 0, 1), interpolation="nearest", **kw)
    a1.imshow(np.clip(img, 0, 1), interpolation="nearest", **kw)
    a1.imshow(h, cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    im = ScalarMappable(norm=Normalize(0, 1), cmap="jet")  # the bar shows the map's colours, not the blend
    for ax, t in ((a0, "image"), (a1, "Grad-CAM")):
        ax.set_title(t, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    cb = fig.colorbar(im, cax=cax)
    cb.set_ticks([0, 0.5, 1])
    cb.ax.tick_params(labelsize=6)
    cb.set_label("relevance (0-1)", fontsize=6)
    if title:
        fig.suptitle(title, fontsize=8)
    return _fig_png(fig)


def _is_num(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(float(v))


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------


_LABELS = {
    "accuracy": "Accuracy", "auc": "ROC AUC", "pr_auc": "PR AUC (AP)", "sensitivity": "Sensitivity",
    "specificity": "Specificity", "ppv": "PPV", "npv": "NPV", "f1": "F1", "balanced_accuracy": "Balanced accuracy",
    "mae": "MAE", "qwk": "Quadratic weighted kappa", "subset_accuracy": "Subset accuracy",
    "sens": "Sens", "spec": "Spec",
}  # fmt: skip


def metrics_table(split_metrics: Mapping[str, Mapping[str, Any]], positive_class: str | None = None) -> str:
    """Summary table: rows = metrics, columns = splits, cells = value (95% CI), or "undefined" with the reason.
    Binary metrics that depend on the positive class are labelled with it ("Sensitivity (malignant)")."""
    from medsight.summary import metric_label

    splits = list(split_metrics)
    names: list[str] = []
    for m in split_metrics.values():
        for k, v in m.items():
            if isinstance(v, Mapping) and "value" in v and k != "confusion_matrix" and k not in names:
                names.append(k)
    head = "".join(f"<th>{_esc(s)}</th>" for s in splits)
    rows = [f'<tr><th class="l">metric</th>{head}</tr>']
    for k in names:
        cells = "".join(f"<td>{_value_ci(split_metrics[s].get(k))}</td>" for s in splits)
        rows.append(f'<tr><td class="l">{_esc(metric_label(k, positive_class))}</td>{cells}</tr>')
    return "<table>" + "".join(rows) + "</table>"


def counts_table(task: str, splits: Mapping[str, Any], class_names: Sequence[str],
                 positive_class: str | None = None) -> str:
    """Cases per class (rows) and split (columns), with the prevalence of the positive class."""
    from medsight.summary import class_counts

    counts = {s: class_counts(task, np.asarray(d["y_true"]), class_names) for s, d in splits.items()}
    sizes = {s: len(d["y_true"]) for s, d in splits.items()}
    head = "".join(f"<th>{_esc(s)}</th>" for s in splits)
    rows = [f'<tr><th class="l">{kind_of(task).counts_heading}</th>{head}</tr>']
    for c in class_names:
        cells = "".join(f"<td>{counts[s][str(c)]}</td>" for s in splits)
        mark = " (positive)" if positive_class is not None and str(c) == positive_class else ""
        rows.append(f'<tr><td class="l">{_esc(c)}{mark}</td>{cells}</tr>')
    rows.append('<tr><td class="l">total</td>' + "".join(f"<td>{sizes[s]}</td>" for s in splits) + "</tr>")
    if positive_class is not None:
        cells = "".join(f"<td>{_fmt(100.0 * counts[s][positive_class] / sizes[s], 1)}%</td>" if sizes[s] else "<td>–</td>"
                        for s in splits)
        rows.append(f'<tr><td class="l">prevalence of {_esc(positive_class)}</td>{cells}</tr>')
    return "<table>" + "".join(rows) + "</table>"


def per_class_table(metrics: Mapping[str, Any], class_names: Sequence[str]) -> str:
    """Per-class table (value and CI) from an evaluate_predictions ``per_class`` entry."""
    pc = metrics.get("per_class") or {}
    if not pc:
        return ""
    cols = list(M.PER_CLASS_METRICS)
    head = "".join(f"<th>{_esc(_LABELS.get(c, c))}</th>" for c in cols)
    rows = [f'<tr><th class="l">class</th>{head}</tr>']
    for key, vals in pc.items():
        i = int(key)
        name = class_names[i] if i < len(class_names) else key
        cells = "".join(f"<td>{_value_ci(vals.get(c))}</td>" for c in cols)
        rows.append(f'<tr><td class="l">{_esc(name)}</td>{cells}</tr>')
    return "<table>" + "".join(rows) + "</table>"


def _gallery(items: Sequence[Mapping[str, Any]]) -> str:
    parts = []
    for title, want in (("Correct", True), ("Wrong", False)):
        cards = [
            f'<div class="card {"ok" if want else "bad"}">{_img(_case_png(it), it.get("caption", ""))}'
            f"<div>{_esc(it.get('caption', ''))}</div></div>"
            for it in items
            if bool(it.get("correct")) == want
        ]
        parts.append(f"<h3>{title} ({len(cards)})</h3>")
        parts.append(f'<div class="gallery">{"".join(cards)}</div>' if cards else '<p class="note">none</p>')
    return "".join(parts)


def _case_png(item: Mapping[str, Any]) -> bytes:
    if item.get("image") is not None and item.get("heatmap") is not None:
        return plot_case(item["image"], item["heatmap"])
    return item["png"]


def _facts(lines: Sequence[str]) -> str:
    items = []
    for line in lines:
        cls = ' class="warn"' if str(line).startswith("WARNING") else ""
        items.append(f"<li{cls}>{_esc(line)}</li>")
    return f'<ul class="facts">{"".join(items)}</ul>'


def _placement(detail: Mapping[str, Any] | None) -> str:
    """`` (placed at ...; 95% interval over N resamples of the validation cases: a to b)``, escaped."""
    if not detail or not detail.get("placement"):
        return ""
    text = f" (placed at {detail['placement']}"
    ci = detail.get("ci")
    if ci:
        pairs = ci if isinstance(ci[0], (list, tuple)) else [ci]
        shown = ", ".join(f"{lo:.3g} to {hi:.3g}" for lo, hi in pairs if lo is not None)
        if shown:
            text += f"; 95% interval over {detail.get('n_boot')} resamples of the validation cases: {shown}"
    return _esc(text + ")")


def _ood_section(ood_flags: Mapping[str, Any] | str | None) -> str:
    """The flagged cases per split; ``None``: no detector results; a string: why they are not available."""
    if ood_flags is None:
        return ('<p class="note">Not available: this report was given no out-of-distribution results.</p>')
    if isinstance(ood_flags, str):
        return f'<p class="note">Not available: {_esc(ood_flags)}.</p>'
    parts = ['<p class="note">A case is flagged out-of-distribution (OOD) when it does not look like the training '
             "images (its detector score is above a threshold set so that about 3% of validation cases are "
             "flagged); its class verdict should not be trusted.</p>"]
    for split, info in ood_flags.items():
        flagged = list(info.get("flagged") or [])
        n = info.get("n")
        thr = info.get("threshold")
        head = f"{split}: {len(flagged)} case(s) flagged" + (f" of {n}" if n is not None else "")
        if thr is not None:
            head += f" (score above {_fmt(thr, 3)})"
        parts.append(f"<h3>{_esc(head)}</h3>")
        if flagged:
            rows = ['<tr><th class="l">case</th><th>OOD score</th></tr>']
            for f in flagged[:50]:
                rows.append(f'<tr><td class="l">{_esc(f.get("case"))}</td><td>{_esc(_fmt(f.get("score"), 3))}</td></tr>')
            more = f'<p class="note">and {len(flagged) - 50} more</p>' if len(flagged) > 50 else ""
            parts.append("<table>" + "".join(rows) + "</table>" + more)
    return "".join(parts)


#: the technical terms the report uses, in plain words (shown beside the figures)
GLOSSARY: tuple[tuple[str, str], ...] = (
    ("ROC AUC", "area under the ROC curve: the chance that a random positive case gets a higher score than a "
                "random negative one (0.5 = guessing, 1 = perfect ranking); it does not depend on the threshold"),
    ("PR AUC", "area under the precision-recall curve: how well the positive class is found among the cases "
               "called positive, averaged over thresholds; compare it with the prevalence, not with 0.5"),
    ("Sensitivity / specificity", "the share of positive cases called positive / of negative cases called "
                                  "negative, at the decision threshold"),
    ("PPV / NPV", "positive / negative predictive value: of the cases called positive (negative), the share "
                  "that truly are; they depend on how common the positive class is"),
    ("F1", "the harmonic mean of PPV and sensitivity"),
    ("Balanced accuracy", "the mean of the per-class sensitivities (not flattered by a common class)"),
    ("Threshold", "a case is called positive when its probability is at least this value"),
    ("Youden's J", "sensitivity + specificity - 1; the rule 'youden' picks the threshold that maximises it on the "
                   "validation split. Many thresholds often tie on a small split: medsight takes the midpoint, on "
                   "the log-odds scale, of the range that ties, never its edge"),
    ("95% CI (bootstrap)", "the range the metric would likely take on another sample like this one: the metric "
                           "recomputed on many resamples (1000 by default, drawn with replacement) of the cases, "
                           "middle 95%"),
    ("Calibration, ECE", "whether a predicted probability of 0.8 comes true about 80% of the time; the expected "
                         "calibration error is the average gap between predicted and observed frequency (0 = "
                         "perfect)"),
    ("Temperature", "a single number T that all logits are divided by before the probability is computed, fitted "
                    "on the validation split to make probabilities honest; it never changes the ranking or AUC"),
    ("Reliability diagram", "cases grouped by predicted probability (each group of about the same size, at least "
                            f"{M.MIN_BIN_CASES} cases where the split allows), the observed frequency of each group "
                            "against its mean prediction; bars give the standard error, the number of cases is "
                            "printed beside each point; points on the diagonal are well calibrated"),
    ("OOD (out-of-distribution)", "a scan that does not look like the training images (another body part, "
                                  "modality or device); its class verdict should not be trusted"),
    ("Grad-CAM", "a heatmap of the image regions that raised the predicted class's score most; it shows where the "
                 "model looked, not why, and is not a segmentation"),
    ("Early stopping, patience", "training stops when the validation metric has not improved for 'patience' "
                                 "epochs in a row; the weights of the best validation epoch are kept"),
    ("CPU budget", "the automatic recipe caps training at a number of image passes (images x epochs) so that a run "
                   "takes a few minutes on one CPU; more images mean fewer epochs"),
    ("Validation / test split", "validation cases choose the epoch, the temperature and the threshold; test cases "
                                "are used only to measure, so their metrics are not tuned to them"),
)


#: beside each split's figures: how to read them, in a sentence (the terms are in the glossary)
_FIGURE_NOTE = ('<p class="note">ROC curve: sensitivity against 1 - specificity as the threshold moves (the area under '
                "it is the ROC AUC; for a binary task the dot is the decision threshold). Precision-recall curve: PPV "
                "against sensitivity. Confusion matrix: cases by true (rows) and predicted (columns) class, with row "
                'percentages. <a href="#glossary">Terms</a></p>')


def glossary_html() -> str:
    """The glossary as a definition list."""
    items = "".join(f"<dt><b>{_esc(t)}</b></dt><dd>{_esc(d)}</dd>" for t, d in GLOSSARY)
    return f'<dl class="glossary">{items}</dl>'


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------


def build_report(
    *,
    title: str,
    task: str,
    class_names: Sequence[str],
    splits: Mapping[str, Mapping[str, Any]],
    threshold=None,
    threshold_rule: str | None = None,
    positive_class: str | None = None,
    history: Sequence[Mapping[str, Any]] | None = None,
    calibration: Mapping[str, Any] | None = None,
    gallery: Sequence[Mapping[str, Any]] | None = None,
    facts: Sequence[str] | None = None,
    warnings: Sequence[str] | None = None,
    ood_flags: Mapping[str, Any] | str | None = None,
    extra_sections: Sequence[tuple[str, str]] | None = None,
    threshold_detail: Mapping[str, Any] | None = None,
) -> str:
    """Self-contained HTML report.

    ``splits``: ``{split_name: {"y_true", "probs", "metrics"}}`` where ``metrics`` is the output
    of :func:`medsight.metrics.evaluate_predictions` (computed here when missing).
    ``threshold`` / ``threshold_rule``: the binary / multilabel operating point and the rule that set it
    (``youden``, ``sens=0.95``, ``0.5`` ...); the report says which, truthfully.
    ``positive_class``: binary tasks; defaults to ``class_names[1]`` (the probability the model outputs).
    ``history``: list of per-epoch dicts (``epoch``, ``train_loss``, ``val_loss``, ``val_auc``, ``seconds``...).
    ``calibration``: ``{"temperature", "ece_before", "ece_after", "curves": {label:
    reliability_curve dict}}`` (``"reliability_before"`` / ``"reliability_after"`` also accepted).
    ``gallery``: list of ``{"image", "heatmap", "caption", "correct"}`` (or ``"png"`` bytes instead of the arrays).
    ``facts``: sentences about the data and the run (:func:`medsight.summary.describe_training`).
    ``warnings``: default :func:`medsight.summary.warn_degenerate` of the metrics.
    ``ood_flags``: ``{split: {"flagged": [{"case", "score"}], "n", "threshold"}}``; ``None`` = not available; a
    string: why not (e.g. the bundle has no detector).
    ``extra_sections``: ``(title, html)`` pairs appended verbatim; the html must be trusted.
    ``threshold_detail``: :func:`medsight.metrics.operating_point_detail` as stored in ``bundle.json``: how the
    threshold was placed and its 95% interval over validation resamples, stated beside the decision.
    """
    from medsight.summary import quoted, split_line, threshold_rule_sentence, warn_degenerate

    kind_of(task)  # one line naming the known task kinds
    if not splits:
        raise DataError("build_report needs at least one split of predictions")
    class_names = [str(c) for c in class_names]
    kind = kind_of(task)
    if kind.has_positive_class and positive_class is None and len(class_names) == 2:
        positive_class = class_names[1]
    if not kind.has_positive_class:
        positive_class = None
    body: list[str] = [f"<h1>{_esc(title)}</h1>"]
    parts = [f"task: {_esc(task)}", f"classes: {_esc(quoted(class_names))}"]
    if positive_class is not None:
        parts.append(f"positive class: <b>{_esc(positive_class)}</b> (sensitivity, PPV and the threshold are about "
                     f"{_esc(positive_class)})")
    parts.append("decision: " + _esc(kind.decision_words(threshold_rule_sentence(threshold_rule, threshold)
                                                         + _placement(threshold_detail))))
    parts.append("intervals are 95% percentile bootstrap CIs")
    parts.append('technical terms are explained under <a href="#glossary">Terms used in this report</a>')
    body.append(f'<p class="note">{" · ".join(parts)}</p>')

    computed: dict[str, Mapping[str, Any]] = {}
    for name, s in splits.items():
        if "y_true" not in s or "probs" not in s:
            raise DataError(f"split {name!r} needs 'y_true' and 'probs'")
        computed[name] = s.get("metrics") or M.evaluate_predictions(task, s["y_true"], s["probs"], threshold=threshold,
                                                                    n_boot=200, positive_class=positive_class)
    if warnings is None:
        warnings = warn_degenerate(computed, class_names, positive_class)
    if warnings:
        body.append("".join(f'<div class="warn">{_esc(w)}</div>' for w in warnings))

    body.append("<h2>Summary</h2>")
    body.append(metrics_table(computed, positive_class))
    body.append("<h3>Cases per class</h3>")
    body.append(counts_table(task, splits, class_names, positive_class))

    if facts:
        body.append("<h2>Data and training</h2>")
        body.append(_facts(facts))

    for name, s in splits.items():
        y, p = np.asarray(s["y_true"]), np.asarray(s["probs"], dtype=np.float64)
        m = computed[name]
        body.append(f"<h2>{_esc(name)} split <span class='note'>(n = {len(y)})</span></h2>")
        body.append(f'<p class="note">{_esc(split_line(task, name, y, class_names, positive_class))}</p>')
        figs = [_img(plot_roc_pr(task, y, p, class_names, threshold if kind.has_positive_class else None, name), f"ROC and PR curves, {name}")]
        cm = (m.get("confusion_matrix") or {}).get("value")
        if cm is not None:
            figs.append(_img(plot_confusion(cm, class_names, f"confusion matrix, {name}"), f"confusion matrix, {name}"))
        body.append(f'<div class="figs">{"".join(figs)}</div>')
        body.append(_FIGURE_NOTE)
        table = per_class_table(m, class_names)
        if table:
            body.append(f"<h3>Per class ({_esc(name)})</h3>{table}")

    if calibration:
        body.append("<h2>Calibration</h2>")
        facts_c = []
        for key, label in (("temperature", "temperature T"), ("ece_before", "ECE before"), ("ece_after", "ECE after")):
            if key in calibration and calibration[key] is not None:
                facts_c.append(f"{label}: {_esc(_fmt(calibration[key], 4))}")
        body.append(f"<p>{' · '.join(facts_c)}</p>")
        curves = dict(calibration.get("curves") or {})
        for key, label in (("reliability_before", "before scaling"), ("reliability_after", "after scaling")):
            if calibration.get(key):
                curves[label] = calibration[key]
        if curves:
            what = f"P({positive_class})" if positive_class else kind.confidence_words
            equal = any((c or {}).get("binning") == "equal-count" for c in curves.values())
            how = (f"cases sorted by {_esc(what)} and cut into groups of equal size (at least "
                   f"{M.MIN_BIN_CASES} cases each where the split allows; the count is printed beside each point)"
                   if equal else f"{_esc(what)} in equal-width bins")
            body.append(f'<p class="note">Reliability: {how}, against how often it came true; error bars: one '
                        "standard error; bottom panel: cases per bin. ECE (above) uses 15 equal-width bins.</p>")
            body.append(f'<div class="figs">{_img(plot_reliability(curves), "reliability diagram")}</div>')

    if history:
        body.append("<h2>Training</h2>")
        body.append(f'<div class="figs">{_img(plot_history(history, positive_class), "training curves")}</div>')

    if gallery:
        body.append("<h2>Cases</h2>")
        body.append('<p class="note">Each case: the image as the model saw it, then the Grad-CAM heatmap over it: '
                    "red = regions that raised the score of the predicted class most; a dark map means no region "
                    "stands out. Relative to the case's own maximum, not a probability.</p>")
        body.append(_gallery(gallery))

    body.append("<h2>Out-of-distribution cases</h2>")
    body.append(_ood_section(ood_flags))

    for sec_title, sec_html in extra_sections or ():
        body.append(f"<h2>{_esc(sec_title)}</h2>{sec_html}")

    body.append('<h2 id="glossary">Terms used in this report</h2>')
    body.append(glossary_html())

    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )


def write_report(path: str | os.PathLike, html_text: str) -> Path:
    """Write atomically: a temporary file in the same folder, then ``os.replace``."""
    from medsight.utils import atomic_write_text

    return atomic_write_text(path, html_text)


__all__ = [
    "GLOSSARY",
    "build_report",
    "counts_table",
    "glossary_html",
    "plot_case",
    "row_percentages",
    "metrics_table",
    "per_class_table",
    "plot_confusion",
    "plot_history",
    "plot_reliability",
    "plot_roc_pr",
    "png_data_uri",
    "write_report",
]
