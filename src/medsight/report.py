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
from .errors import ConfigError, DataError

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f2f2f2}
td.l,th.l{text-align:left}.ci{color:#666;font-size:.85em}
.figs{display:flex;flex-wrap:wrap;gap:12px}.figs img{max-width:100%;border:1px solid #eee}
.gallery{display:flex;flex-wrap:wrap;gap:10px}
.card{border:2px solid #ccc;padding:4px;width:180px;font-size:.8em}
.card img{width:100%;image-rendering:pixelated}.ok{border-color:#3a3}.bad{border-color:#c33}
.note{color:#555;font-size:.9em}
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
    if task == "binary":
        return [(class_names[1] if len(class_names) > 1 else "positive", y, M.binary_positive_probs(p))]
    if task == "multilabel":
        return [(class_names[c], y[:, c], p[:, c]) for c in range(p.shape[1])]
    return [(class_names[c], (y == c).astype(int), p[:, c]) for c in range(p.shape[1])]


def plot_roc_pr(task, y_true, probs, class_names, threshold=None, title: str = "") -> bytes:
    """ROC and precision-recall curves side by side; the binary operating point is marked."""
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    fig = _figure(8.4, 3.8)
    ax_roc, ax_pr = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name, yc, sc in _one_vs_rest(task, y, p, class_names):
        curves = _binary_curves(np.asarray(yc).astype(int), sc)
        if curves is None:
            continue
        fpr, tpr, prec, rec = curves
        ax_roc.plot(fpr, tpr, lw=1.5, label=str(name))
        ax_pr.plot(rec, prec, lw=1.5, label=str(name))
    if task == "binary" and threshold is not None:
        m = M.compute_metrics("binary", y, p, threshold=threshold)
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
    """Confusion matrix heatmap with counts (rows = truth). A multilabel (K, 2, 2) stack is drawn
    as one 2x2 panel per class."""
    cm = np.asarray(cm)
    if cm.ndim == 3:
        k = cm.shape[0]
        fig = _figure(min(2.4 * k, 12), 2.6)
        for c in range(k):
            ax = fig.add_subplot(1, k, c + 1)
            _draw_cm(ax, cm[c], ["neg", "pos"], str(class_names[c]))
        return _fig_png(fig)
    k = cm.shape[0]
    fig = _figure(max(3.6, 0.6 * k + 2), max(3.2, 0.6 * k + 1.6))
    _draw_cm(fig.add_subplot(1, 1, 1), cm, class_names, title or "confusion matrix")
    return _fig_png(fig)


def _draw_cm(ax, cm, names, title):
    ax.imshow(cm, cmap="Blues")
    k = cm.shape[0]
    hi = cm.max() if cm.size else 0
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", color="white" if cm[i, j] > hi / 2 else "black", fontsize=8)
    names = [str(n) for n in names][:k]
    ax.set_xticks(range(k), names, rotation=45 if k > 3 else 0, fontsize=7)
    ax.set_yticks(range(k), names, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title=title)


def plot_reliability(curves: Mapping[str, Mapping], title: str = "reliability") -> bytes:
    """Reliability diagram: one line per named curve (e.g. before / after temperature scaling),
    each a :func:`medsight.metrics.reliability_curve` dict."""
    fig = _figure(4.2, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1, label="perfect")
    for name, rc in curves.items():
        conf = np.asarray(rc["confidence"], dtype=np.float64)
        acc = np.asarray(rc["accuracy"], dtype=np.float64)
        ok = ~(np.isnan(conf) | np.isnan(acc))
        ax.plot(conf[ok], acc[ok], "o-", ms=3, label=str(name))
    ax.set(xlabel="mean predicted probability", ylabel="observed frequency", title=title, xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7, loc="upper left")
    return _fig_png(fig)


def plot_history(history: Sequence[Mapping[str, Any]]) -> bytes:
    """Training curves: losses on the left, every other numeric series (val_auc, ...) on the right."""
    keys = sorted({k for row in history for k, v in row.items() if k != "epoch" and _is_num(v)})
    epochs = [row.get("epoch", i) for i, row in enumerate(history)]
    losses = [k for k in keys if "loss" in k]
    others = [k for k in keys if k not in losses and k != "lr"]
    fig = _figure(8.4, 3.4)
    for pos, group, label in ((1, losses, "loss"), (2, others, "metric")):
        ax = fig.add_subplot(1, 2, pos)
        for k in group:
            xs = [e for e, row in zip(epochs, history) if _is_num(row.get(k))]
            ys = [float(row[k]) for row in history if _is_num(row.get(k))]
            ax.plot(xs, ys, "o-", ms=3, label=k)
        ax.set(xlabel="epoch", ylabel=label)
        if group:
            ax.legend(fontsize=7)
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


def metrics_table(split_metrics: Mapping[str, Mapping[str, Any]]) -> str:
    """Summary table: rows = metrics, columns = splits, cells = value (95% CI)."""
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
        rows.append(f'<tr><td class="l">{_esc(_LABELS.get(k, k))}</td>{cells}</tr>')
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
            f'<div class="card {"ok" if want else "bad"}">{_img(it["png"], it.get("caption", ""))}'
            f"<div>{_esc(it.get('caption', ''))}</div></div>"
            for it in items
            if bool(it.get("correct")) == want
        ]
        parts.append(f"<h3>{title} ({len(cards)})</h3>")
        parts.append(f'<div class="gallery">{"".join(cards)}</div>' if cards else '<p class="note">none</p>')
    return "".join(parts)


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
    history: Sequence[Mapping[str, Any]] | None = None,
    calibration: Mapping[str, Any] | None = None,
    gallery: Sequence[Mapping[str, Any]] | None = None,
    extra_sections: Sequence[tuple[str, str]] | None = None,
) -> str:
    """Self-contained HTML report.

    ``splits``: ``{split_name: {"y_true", "probs", "metrics"}}`` where ``metrics`` is the output
    of :func:`medsight.metrics.evaluate_predictions` (computed here when missing).
    ``threshold``: the binary / multilabel operating point (chosen on validation).
    ``history``: list of per-epoch dicts (``epoch``, ``train_loss``, ``val_loss``, ``val_auc``...).
    ``calibration``: ``{"temperature", "ece_before", "ece_after", "curves": {label:
    reliability_curve dict}}`` (``"reliability_before"`` / ``"reliability_after"`` also accepted).
    ``gallery``: list of ``{"png": bytes, "caption": str, "correct": bool}``.
    ``extra_sections``: ``(title, html)`` pairs appended verbatim; the html must be trusted.
    """
    if task not in M.TASKS:
        from .errors import choices_message

        raise ConfigError(choices_message("task", task, M.TASKS))
    if not splits:
        raise DataError("build_report needs at least one split of predictions")
    class_names = [str(c) for c in class_names]
    body: list[str] = [f"<h1>{_esc(title)}</h1>"]
    thr_txt = ""
    if threshold is not None:
        t = np.atleast_1d(np.asarray(threshold, dtype=np.float64))
        thr_txt = f" · operating threshold {_esc(', '.join(f'{v:.4g}' for v in t))} (chosen on validation)"
    body.append(
        f'<p class="note">task: {_esc(task)} · classes: {_esc(", ".join(class_names))}{thr_txt} · '
        "intervals are 95% percentile bootstrap CIs</p>"
    )

    computed: dict[str, Mapping[str, Any]] = {}
    for name, s in splits.items():
        if "y_true" not in s or "probs" not in s:
            raise DataError(f"split {name!r} needs 'y_true' and 'probs'")
        computed[name] = s.get("metrics") or M.evaluate_predictions(task, s["y_true"], s["probs"], threshold=threshold, n_boot=200)

    body.append("<h2>Summary</h2>")
    body.append(metrics_table(computed))

    for name, s in splits.items():
        y, p = np.asarray(s["y_true"]), np.asarray(s["probs"], dtype=np.float64)
        m = computed[name]
        body.append(f"<h2>{_esc(name)} split <span class='note'>(n = {len(y)})</span></h2>")
        figs = [_img(plot_roc_pr(task, y, p, class_names, threshold if task == "binary" else None, name), f"ROC and PR curves, {name}")]
        cm = (m.get("confusion_matrix") or {}).get("value")
        if cm is not None:
            figs.append(_img(plot_confusion(cm, class_names, f"confusion matrix, {name}"), f"confusion matrix, {name}"))
        body.append(f'<div class="figs">{"".join(figs)}</div>')
        table = per_class_table(m, class_names)
        if table:
            body.append(f"<h3>Per class ({_esc(name)})</h3>{table}")

    if calibration:
        body.append("<h2>Calibration</h2>")
        facts = []
        for key, label in (("temperature", "temperature T"), ("ece_before", "ECE before"), ("ece_after", "ECE after")):
            if key in calibration and calibration[key] is not None:
                facts.append(f"{label}: {_esc(_fmt(calibration[key], 4))}")
        body.append(f"<p>{' · '.join(facts)}</p>")
        curves = dict(calibration.get("curves") or {})
        for key, label in (("reliability_before", "before scaling"), ("reliability_after", "after scaling")):
            if calibration.get(key):
                curves[label] = calibration[key]
        if curves:
            body.append(f'<div class="figs">{_img(plot_reliability(curves), "reliability diagram")}</div>')

    if history:
        body.append("<h2>Training</h2>")
        body.append(f'<div class="figs">{_img(plot_history(history), "training curves")}</div>')

    if gallery:
        body.append("<h2>Cases</h2>")
        body.append(_gallery(gallery))

    for sec_title, sec_html in extra_sections or ():
        body.append(f"<h2>{_esc(sec_title)}</h2>{sec_html}")

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
    "build_report",
    "metrics_table",
    "per_class_table",
    "plot_confusion",
    "plot_history",
    "plot_reliability",
    "plot_roc_pr",
    "png_data_uri",
    "write_report",
]
