"""Evaluate a bundle like a clinician would.

- ``calibrate_bundle``: on the **validation** split only, fit the temperature and choose the operating point
  (Youden / target sensitivity or specificity / F1 / fixed); both are stored in ``bundle.json`` and used by every
  later prediction.
- ``evaluate_split``: metrics with bootstrap 95% CIs at the bundle's temperature and threshold.
- ``write_bundle_report``: the self-contained ``report.html`` (curves, confusion matrix, reliability, training
  curves, per-class table, gallery of correct and wrong cases with Grad-CAM overlays).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from medsight import metrics as M
from medsight.bundle import Bundle
from medsight.data.sources import Dataset
from medsight.errors import MedsightError
from medsight.train import evaluate_logits
from medsight.transforms import to_float


def check_compatible(bundle: Bundle, data: Dataset) -> None:
    inp = bundle.meta["input"]
    if data.in_channels != inp["channels"] or list(data.input_size) != list(inp["size"]):
        raise MedsightError(
            f"data {data.name} has images of {data.in_channels} channel(s) x {list(data.input_size)}, but the model in "
            f"{bundle.path} expects {inp['channels']} x {inp['size']}")
    if data.task != bundle.meta["task"] or len(data.classes) != len(bundle.classes):
        raise MedsightError(f"data {data.name} is a {data.task} task with {len(data.classes)} classes; the model in "
                            f"{bundle.path} is {bundle.meta['task']} with {len(bundle.classes)}")


def split_logits(bundle: Bundle, data: Dataset, split: str, *, device="cpu", batch_size: int = 512) -> torch.Tensor:
    """Logits of a split, computed once per bundle and dataset (the model and the data do not change)."""
    key = (id(data), split)
    hit = bundle.logits_cache.get(key)
    if hit is not None and hit[0] is data:
        return hit[1]
    logits = _compute_split_logits(bundle, data, split, device=device, batch_size=batch_size)
    bundle.logits_cache[key] = (data, logits)
    return logits


def _compute_split_logits(bundle: Bundle, data: Dataset, split: str, *, device, batch_size) -> torch.Tensor:
    s = data.split(split)
    tab = None
    if bundle.fusion:
        from medsight.fusion import encode_tabular

        if s.clinical is None:
            raise MedsightError(f"the model in {bundle.path} needs clinical columns "
                                f"{', '.join(bundle.fusion['columns'])}; {data.name} has none")
        tab = encode_tabular(s.clinical, bundle.fusion["tabular"])
    return evaluate_logits(bundle.model.to(device), s.images, device=torch.device(device), batch_size=batch_size,
                           tta_flip=bundle.meta.get("tta_flip") or (), tab=tab)


def split_probs(bundle: Bundle, data: Dataset, split: str, *, temperature: float | None = None) -> np.ndarray:
    t = bundle.temperature if temperature is None else temperature
    return bundle.task.probabilities(split_logits(bundle, data, split), t).numpy()


def calibrate_bundle(bundle: Bundle, data: Dataset, *, operating_point: str | float | None = "0.5",
                     calibrate: bool = True) -> dict:
    """Fit temperature and threshold on the validation split; store them in the bundle; return a summary."""
    check_compatible(bundle, data)
    task = bundle.task
    val = data.split("val")
    logits = split_logits(bundle, data, "val")
    summary: dict = {"split": "val"}
    temperature = 1.0
    probs_before = task.probabilities(logits).numpy()
    if calibrate and task.name != "ordinal":  # ordinal heads are cumulative logits: left uncalibrated
        temperature = float(M.fit_temperature(logits.numpy(), val.labels, task.name))
        # NLL-optimal T does not always lower ECE; keep it only when it does on the validation split
        ece_t = M.expected_calibration_error(task.name, val.labels, task.probabilities(logits, temperature).numpy())
        if not ece_t < M.expected_calibration_error(task.name, val.labels, probs_before):
            temperature = 1.0
    probs = task.probabilities(logits, temperature).numpy()
    summary.update(temperature=temperature,
                   ece_before=M.expected_calibration_error(task.name, val.labels, probs_before),
                   ece_after=M.expected_calibration_error(task.name, val.labels, probs))
    threshold = None
    rule = None
    if task.name in ("binary", "multilabel") and operating_point is not None:
        rule = str(operating_point)
        thr = M.choose_threshold(val.labels, probs, rule)
        threshold = [float(v) for v in np.atleast_1d(thr)] if task.name == "multilabel" else float(thr)
    bundle.meta.update(temperature=temperature, threshold=threshold, threshold_rule=rule,
                       calibration={k: v for k, v in summary.items()})
    bundle.save_meta()
    return summary


def evaluate_split(bundle: Bundle, data: Dataset, split: str, *, n_boot: int = 1000, seed: int = 0) -> dict:
    check_compatible(bundle, data)
    probs = split_probs(bundle, data, split)
    y = data.split(split).labels
    return M.evaluate_predictions(bundle.task.name, y, probs, threshold=bundle.threshold, n_boot=n_boot, seed=seed)


def calibration_report(bundle: Bundle, data: Dataset, splits=("val", "test")) -> dict:
    """ECE before / after temperature scaling and reliability curves, per split."""
    task = bundle.task.name
    out: dict = {"temperature": bundle.temperature, "curves": {}}
    for s in splits:
        if s not in data.splits:
            continue
        y = data.split(s).labels
        logits = split_logits(bundle, data, s)
        before = bundle.task.probabilities(logits).numpy()
        after = bundle.task.probabilities(logits, bundle.temperature).numpy()
        out[f"ece_before_{s}"] = M.expected_calibration_error(task, y, before)
        out[f"ece_after_{s}"] = M.expected_calibration_error(task, y, after)
        out["curves"][f"{s} uncalibrated"] = M.reliability_curve(task, y, before)
        out["curves"][f"{s} T={bundle.temperature:.2f}"] = M.reliability_curve(task, y, after)
    first = next((s for s in splits if f"ece_before_{s}" in out), None)
    if first:
        out["ece_before"], out["ece_after"] = out[f"ece_before_{first}"], out[f"ece_after_{first}"]
    return out


def read_history(bundle: Bundle) -> list[dict]:
    p = bundle.path / "history.csv"
    if not p.is_file():
        return []
    rows = []
    for r in csv.DictReader(p.open()):
        rows.append({k: (float(v) if v not in ("", None) else None) for k, v in r.items()})
    return rows


def explain_images(bundle: Bundle, x: torch.Tensor, class_idx=None, method: str = "gradcam") -> np.ndarray:
    """Heatmaps in [0, 1] for a float batch already preprocessed; Grad-CAM or occlusion."""
    from medsight import explain

    if method == "gradcam":
        return explain.gradcam(bundle.model, x, class_idx=class_idx)
    if method == "occlusion":
        patch = max(2, min(x.shape[2:]) // 4)
        return explain.occlusion(bundle.model, x, class_idx=class_idx, patch=patch)
    raise MedsightError(f"unknown explanation method {method!r}; allowed: gradcam, occlusion")


def overlay(image: np.ndarray, heatmap: np.ndarray) -> bytes:
    from medsight import explain

    if heatmap.ndim == 3:
        return explain.orthogonal_slices(image, heatmap)
    return explain.overlay_png(image, heatmap)


def gallery(bundle: Bundle, data: Dataset, split: str, probs: np.ndarray, n: int = 4) -> list[dict]:
    """Up to ``n`` correct and ``n`` wrong cases of ``split`` (most confident first; binary: predicted positives and
    negatives alternately), each with the image as the model saw it and its Grad-CAM heatmap for the predicted class (2D arrays in [0, 1]; for a volume, the axial slice through the heatmap's
    maximum) for the report to draw side by side with a colour bar."""
    from medsight.explain import heatmap_peak

    task = bundle.task
    y = data.split(split).labels
    pred = task.decide(probs, bundle.threshold)
    if task.name == "multilabel":
        correct = (pred == y).all(axis=1)
        conf = np.abs(probs - 0.5).mean(axis=1)
    else:
        correct = pred == y.reshape(-1)
        thr = 0.5 if bundle.threshold is None else float(np.asarray(bundle.threshold))
        conf = np.abs(probs - thr) if probs.ndim == 1 else probs.max(axis=1)  # binary: distance from the threshold
    picks = []
    for want in (True, False):
        idx = np.where(correct == want)[0]
        ranked = idx[np.argsort(-conf[idx], kind="stable")]
        if task.name == "binary":  # both kinds of each: true and false positives as well as negatives
            pos, neg = [i for i in ranked if pred[i] == 1], [i for i in ranked if pred[i] == 0]
            ranked = [i for pair in zip(pos, neg) for i in pair] + pos[len(neg):] + neg[len(pos):]
        picks += [(int(i), want) for i in list(ranked)[:n]]
    if not picks:
        return []
    images = to_float(torch.as_tensor(data.split(split).images[[i for i, _ in picks]]))
    class_idx = None if task.name == "multilabel" else [int(pred[i]) for i, _ in picks]
    heat = explain_images(bundle, images, class_idx=class_idx)  # the heatmap explains the predicted class
    items = []
    for (i, ok), img, h in zip(picks, images.numpy(), heat):
        p = probs[i]
        truth = bundle.classes[int(y[i])] if task.name != "multilabel" else str(y[i].astype(int).tolist())
        shown = bundle.classes[int(pred[i])] if task.name != "multilabel" else str(pred[i].tolist())
        if task.name == "binary":
            pv = f"P({bundle.classes[1]})={float(p):.2f}"
        elif task.name == "multilabel":
            pv = f"max label p={float(np.max(p)):.2f}"
        else:
            pv = f"P({shown})={float(np.max(p)):.2f}"
        where = ""
        h = np.asarray(h, dtype=np.float32)
        img = np.asarray(img, dtype=np.float32)
        if h.ndim == 3:  # a volume: the axial slice through the heatmap's maximum
            d = heatmap_peak(h)[0]
            h, img = h[d], img[:, d]
            where = f", axial slice {d + 1} of {heat.shape[1]}"
        if float(h.max()) <= 0:
            where += f"; flat heatmap: no region stands out for {shown}"
        items.append({"image": img, "heatmap": h, "correct": bool(ok),
                      "caption": f"{split} #{i}: true {truth}, predicted {shown} ({pv}){where}"})
    return items


def write_bundle_report(bundle: Bundle, data: Dataset, results: dict, splits=("val", "test"),
                        extra_sections=None, path: Path | None = None, *, facts: list[str] | None = None,
                        ood_flags: dict | None = None) -> Path:
    """``report.html`` for a bundle. ``facts``: lines from :func:`medsight.summary.describe_training` (default:
    those the data alone can tell); ``ood_flags``: ``{split: {"flagged": [{"case", "score"}], "n", "threshold"}}``
    when the bundle's detector was run, else the report says the section is not available."""
    from medsight.report import build_report, write_report
    from medsight.summary import describe_training

    split_data = {}
    for s in splits:
        if s in data.splits and s in results:
            split_data[s] = {"y_true": data.split(s).labels, "probs": split_probs(bundle, data, s),
                             "metrics": results[s]}
    last = list(split_data)[-1]
    if facts is None:
        facts = describe_training(data, None)
    html = build_report(
        title=f"{bundle.meta['model']['name']} on {bundle.meta['data']} - {bundle.path.name}",
        task=bundle.task.name, class_names=bundle.classes, splits=split_data, threshold=bundle.threshold,
        threshold_rule=bundle.meta.get("threshold_rule"),
        positive_class=bundle.classes[1] if bundle.task.name == "binary" else None,
        history=read_history(bundle), calibration=calibration_report(bundle, data, tuple(split_data)),
        gallery=None if bundle.fusion else gallery(bundle, data, last, split_data[last]["probs"]),
        facts=facts, ood_flags=ood_flags, extra_sections=extra_sections)
    return write_report(path or bundle.path / "report.html", html)
