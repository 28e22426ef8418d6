"""Evaluate a bundle like a clinician would.

- ``split_logits``: a split's logits through :mod:`medsight.inference` (the bundle's TTA and clinical input),
  computed once per model and dataset when the caller passes a :class:`LogitsCache` (``evaluate_bundle`` and the
  pipeline do), shared by metrics, the report and its gallery;
- ``evaluate_split``: metrics with bootstrap 95% CIs at the bundle's temperature and threshold (both chosen on
  the validation split by :mod:`medsight.calibration` before the bundle was written);
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
from medsight.explain import explain_batch
from medsight.fusion import split_clinical_rows
from medsight.inference import run_logits
from medsight.inference import to_float


def check_compatible(bundle: Bundle, data: Dataset) -> None:
    """Refuse data the bundle cannot score; put a binary dataset's classes in the bundle's order (the positive
    class at index 1, as the model was trained)."""
    inp = bundle.meta.input
    if data.in_channels != inp.channels or list(data.input_size) != list(inp.size):
        raise MedsightError(
            f"data {data.name} has images of {data.in_channels} channel(s) x {list(data.input_size)}, but the model in "
            f"{bundle.path} expects {inp.channels} x {inp.size}")
    if data.task != bundle.task.name or len(data.classes) != len(bundle.classes):
        raise MedsightError(f"data {data.name} is a {data.task} task with {len(data.classes)} classes; the model in "
                            f"{bundle.path} is {bundle.task.name} with {len(bundle.classes)}")
    if bundle.task.kind.has_positive_class and list(data.classes) != bundle.classes \
            and set(data.classes) == set(bundle.classes):
        data.align_to(bundle.classes)


class LogitsCache(dict):
    """Logits per (model, dataset, split), held by the caller (the bundle stays immutable): calibration, metrics,
    the report and its gallery share one inference pass."""

    def get_for(self, bundle: Bundle, data: Dataset, split: str):
        hit = self.get((id(bundle.model), id(data), split))
        return hit[2] if hit is not None and hit[0] is bundle.model and hit[1] is data else None

    def put(self, bundle: Bundle, data: Dataset, split: str, logits: torch.Tensor) -> None:
        self[(id(bundle.model), id(data), split)] = (bundle.model, data, logits)


def split_logits(bundle: Bundle, data: Dataset, split: str, *, device="cpu",
                 cache: LogitsCache | None = None) -> torch.Tensor:
    """Logits of a split (the bundle's TTA and clinical input included); once per model and dataset with a
    ``cache``."""
    hit = None if cache is None else cache.get_for(bundle, data, split)
    if hit is not None:
        return hit
    check_compatible(bundle, data)
    logits = run_logits(bundle.model.to(device), data.split(split).images, device=torch.device(device),
                        tta_flip=bundle.tta_flip, tab=split_clinical_rows(bundle, data, split))
    if cache is not None:
        cache.put(bundle, data, split, logits)
    return logits


def split_probs(bundle: Bundle, data: Dataset, split: str, *, temperature: float | None = None,
                cache: LogitsCache | None = None) -> np.ndarray:
    t = bundle.temperature if temperature is None else temperature
    return bundle.task.probabilities(split_logits(bundle, data, split, cache=cache), t).numpy()


def evaluate_split(bundle: Bundle, data: Dataset, split: str, *, n_boot: int = 1000, seed: int = 0,
                   threshold="bundle", cache: LogitsCache | None = None) -> dict:
    """Metrics with bootstrap 95% CIs at the bundle's temperature and threshold (or ``threshold``)."""
    probs = split_probs(bundle, data, split, cache=cache)
    y = data.split(split).labels
    thr = bundle.threshold if threshold == "bundle" else threshold
    return M.evaluate_predictions(bundle.task.name, y, probs, threshold=thr, n_boot=n_boot, seed=seed,
                                  positive_class=bundle.positive_class)


def evaluate_splits(bundle: Bundle, data: Dataset, splits=("val", "test"), *, n_boot: int = 1000,
                    threshold="bundle", cache: LogitsCache | None = None) -> dict:
    from medsight import progress

    return {s: evaluate_split(bundle, data, s, n_boot=n_boot, threshold=threshold, cache=cache)
            for s in progress.track([s for s in splits if s in data.splits], "metrics and bootstrap CIs per split")}


def rechoose_threshold(bundle: Bundle, data: Dataset, operating_point: str, *, cache: LogitsCache | None = None):
    """A threshold re-chosen on the validation split (at the bundle's temperature) by ``operating_point``, for
    ``evaluate --operating-point``; the bundle itself is not changed."""
    if not bundle.task.uses_threshold:
        raise MedsightError(f"--operating-point applies to binary and multilabel models; {bundle.path} is "
                            f"{bundle.task.name} and decides by argmax")
    return bundle.task.as_threshold(M.choose_threshold(data.split("val").labels,
                                                       split_probs(bundle, data, "val", cache=cache), operating_point))


def calibration_report(bundle: Bundle, data: Dataset, splits=("val", "test"), *,
                       cache: LogitsCache | None = None) -> dict:
    """ECE before / after temperature scaling and reliability curves, per split."""
    task = bundle.task.name
    out: dict = {"temperature": bundle.temperature, "curves": {}}
    for s in splits:
        if s not in data.splits:
            continue
        y = data.split(s).labels
        logits = split_logits(bundle, data, s, cache=cache)
        before = bundle.task.probabilities(logits).numpy()
        after = bundle.task.probabilities(logits, bundle.temperature).numpy()
        out[f"ece_before_{s}"] = M.expected_calibration_error(task, y, before)
        out[f"ece_after_{s}"] = M.expected_calibration_error(task, y, after)
        # the diagram: bins of equal size (enough cases each), not the 15 equal-width bins of the ECE
        out["curves"][f"{s} uncalibrated"] = M.reliability_curve_equal_count(task, y, before)
        out["curves"][f"{s} T={bundle.temperature:.2f}"] = M.reliability_curve_equal_count(task, y, after)
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


def _gallery_tab(bundle: Bundle, data: Dataset, split: str, idx: list[int]):
    tab = split_clinical_rows(bundle, data, split)
    return None if tab is None else tab[idx]


def gallery(bundle: Bundle, data: Dataset, split: str, probs: np.ndarray, n: int = 4) -> list[dict]:
    """Up to ``n`` correct and ``n`` wrong cases of ``split`` (most confident first; binary: predicted positives and
    negatives alternately), each with the image as the model saw it and its Grad-CAM heatmap for the predicted class (2D arrays in [0, 1]; for a volume, the axial slice through the heatmap's
    maximum) for the report to draw side by side with a colour bar."""
    from medsight.explain import heatmap_peak

    task = bundle.task
    kind = task.kind
    y = data.split(split).labels
    pred = task.decide(probs, bundle.threshold)
    correct = kind.gallery_correct(pred, y)
    conf = kind.gallery_confidence(probs, bundle.threshold)
    picks = []
    for want in (True, False):
        idx = np.where(correct == want)[0]
        ranked = idx[np.argsort(-conf[idx], kind="stable")]
        if kind.has_positive_class:  # both kinds of each: true and false positives as well as negatives
            pos, neg = [i for i in ranked if pred[i] == 1], [i for i in ranked if pred[i] == 0]
            ranked = [i for pair in zip(pos, neg) for i in pair] + pos[len(neg):] + neg[len(pos):]
        picks += [(int(i), want) for i in list(ranked)[:n]]
    if not picks:
        return []
    images = to_float(torch.as_tensor(data.split(split).images[[i for i, _ in picks]]))
    explained = [kind.explained_class(pred[i]) for i, _ in picks]
    class_idx = None if any(c is None for c in explained) else explained
    heat = explain_batch(bundle.model, images, tab=_gallery_tab(bundle, data, split, [i for i, _ in picks]),
                         class_idx=class_idx)  # the heatmap explains the predicted class
    items = []
    for (i, ok), img, h in zip(picks, images.numpy(), heat):
        p = probs[i]
        truth = kind.shown_label(y[i], bundle.classes)
        shown = kind.shown_label(pred[i], bundle.classes)
        pv = kind.probability_caption(p, bundle.classes, shown)
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
                      "caption": f"{case_name(data, split, i)}: true {truth}, predicted {shown} ({pv}){where}"})
    return items


def case_name(data: Dataset, split: str, i: int) -> str:
    """How the report names case ``i`` of ``split``: its file (folders, manifests: the path relative to the data) or
    id column, else its position in the split's arrays (``test-50``, as in ``cases_<split>.csv``)."""
    ids = getattr(data.split(split), "ids", None)
    if ids is not None and i < len(ids) and ids[i] not in (None, "", f"{split}-{i}"):
        return str(ids[i])
    return f"{split}-{i} (image {i} of the {split} split's arrays, as in cases_{split}.csv)"


def bundle_ood_flags(bundle: Bundle, data: Dataset, splits) -> dict | str:
    """The bundle's own OOD detector (``ood.npz``) run over ``splits``: ``{split: {"flagged": [{"case", "score"}],
    "n", "threshold"}}``, or a sentence saying why it cannot be run."""
    path = bundle.path / "ood.npz"
    if not path.is_file():
        return "the bundle has no out-of-distribution detector (ood.npz; trained with train.ood false)"
    if bundle.meta.fusion is not None:
        return "the detector of an image + clinical model is run by predict and serve, per file, not over a split"
    from medsight.ood import detect, load_ood

    det = load_ood(path)
    out = {}
    for s in splits:
        if s not in data.splits:
            continue
        r = detect(bundle.model, data.split(s).images, det)
        score, flag = np.asarray(r["ood_score"], dtype=np.float64), np.asarray(r["ood_flag"], dtype=bool)
        out[s] = {"flagged": [{"case": case_name(data, s, int(i)), "score": float(score[i])}
                              for i in np.flatnonzero(flag)],
                  "n": int(len(flag)), "threshold": float(det["threshold"])}
    return out


def write_bundle_report(bundle: Bundle, data: Dataset, results: dict, splits=("val", "test"),
                        extra_sections=None, path: Path | None = None, *, facts: list[str] | None = None,
                        ood_flags: dict | str | None = None, cache: LogitsCache | None = None) -> Path:
    """``report.html`` for a bundle. ``facts``: lines from :func:`medsight.summary.describe_training` (default:
    those the data alone can tell); ``ood_flags``: ``{split: {"flagged": [{"case", "score"}], "n", "threshold"}}``
    when the bundle's detector was run, else the report says the section is not available."""
    from medsight.report import build_report, write_report
    from medsight.summary import describe_training

    split_data = {}
    for s in splits:
        if s in data.splits and s in results:
            split_data[s] = {"y_true": data.split(s).labels, "probs": split_probs(bundle, data, s, cache=cache),
                             "metrics": results[s]}
    last = list(split_data)[-1]
    if facts is None:
        facts = list(bundle.meta.training_summary) or describe_training(data, None)
    if ood_flags is None:  # the bundle's own detector, when it has one (else the report says why not)
        ood_flags = bundle_ood_flags(bundle, data, tuple(split_data))
    from medsight.summary import threshold_lines, warn_degenerate

    detail = bundle.meta.threshold_detail
    if detail is not None and detail.get("rule") != bundle.meta.threshold_rule:
        detail = None  # a threshold re-chosen by another rule: the stored placement is not about it
    threshold_warnings = threshold_lines({**bundle.meta.model_dump(), "threshold_detail": detail})[1] if detail else []
    warnings = threshold_warnings + warn_degenerate({s: results[s] for s in split_data}, bundle.classes,
                                                    bundle.positive_class)
    html = build_report(
        title=f"{bundle.meta.model.name} on {bundle.meta.data} - {bundle.path.name}",
        task=bundle.task.name, class_names=bundle.classes, splits=split_data, threshold=bundle.threshold,
        threshold_rule=bundle.meta.threshold_rule,
        threshold_detail=detail, warnings=warnings,
        positive_class=bundle.positive_class,
        history=read_history(bundle), calibration=calibration_report(bundle, data, tuple(split_data), cache=cache),
        gallery=gallery(bundle, data, last, split_data[last]["probs"]),
        facts=facts, ood_flags=ood_flags, extra_sections=extra_sections)
    return write_report(path or bundle.path / "report.html", html)

def parse_shift_options(severities: str, corruptions: str | None) -> tuple[tuple[int, ...], list[str] | None]:
    """``"1,3,5"`` and ``"gaussian_noise,gamma"`` -> checked severities and corruption names."""
    from medsight.errors import choices_message
    from medsight.shift import CORRUPTIONS

    try:
        sev = tuple(int(v) for v in severities.split(","))
    except ValueError:
        raise MedsightError(f"shift severities (--shift-severities) {severities!r}: expected integers 1..5 "
                            "like 1,3,5") from None
    names = [c.strip() for c in corruptions.split(",")] if corruptions else None
    for n in names or []:
        if n not in CORRUPTIONS:
            raise MedsightError(choices_message("corruption", n, CORRUPTIONS))
    return sev, names


def bundle_shift(bundle: Bundle, data: Dataset, split: str, *, severities: str = "1,3,5",
                 corruptions: str | None = None) -> dict:
    """The seeded corruption battery on one split, through the bundle's own inference (TTA, clinical input,
    temperature, threshold). Writes ``shift_<split>.json`` and ``.png`` into the bundle (``evaluate --shift`` is
    an explicit command) and returns ``{"result", "png", "section": (title, html)}`` for the report."""
    import base64

    from medsight.shift import evaluate_shift, plot_shift, shift_table_html
    from medsight.utils import atomic_write_bytes, write_json

    sev, names = parse_shift_options(severities, corruptions)
    check_compatible(bundle, data)
    s = data.split(split)
    res = evaluate_shift(bundle.model, bundle.task, s.images, s.labels, corruptions=names, severities=sev, seed=0,
                         temperature=bundle.temperature, threshold=bundle.threshold, tta_flip=bundle.tta_flip,
                         tab=split_clinical_rows(bundle, data, split))
    write_json(bundle.path / f"shift_{split}.json", res)
    png = plot_shift(res)
    atomic_write_bytes(bundle.path / f"shift_{split}.png", png)
    img = base64.b64encode(png).decode()
    section = ("Robustness to distribution shift",
               f'<img src="data:image/png;base64,{img}" alt="shift">' + shift_table_html(res))
    return {"result": res, "png": png, "section": section}


def evaluate_bundle(bundle: Bundle, data: Dataset, splits=("test",), *, n_boot: int = 1000,
                    operating_point: str | None = None, report: bool = True, shift: bool = False,
                    shift_severities: str = "1,3,5", shift_corruptions: str | None = None) -> dict:
    """``medsight evaluate`` as a library call. Per-case probabilities go to ``cases_<split>.csv``. Metrics for ``val`` and ``splits`` go to ``metrics.json`` when the
    data is the bundle's own and the bundle's threshold is used; another dataset's to
    ``metrics_<data>.json``; a threshold re-chosen on val with ``operating_point`` is reported without changing
    the bundle (``metrics_op-<rule>.json``). Returns ``{"metrics", "threshold", "rule", "metrics_path",
    "shift", "report_path"}``."""
    import re

    from medsight.utils import write_json

    check_compatible(bundle, data)
    cache = LogitsCache()
    all_splits = tuple(dict.fromkeys(["val", *splits]))
    threshold, rule = "bundle", bundle.meta.threshold_rule
    if operating_point is not None:
        threshold, rule = rechoose_threshold(bundle, data, operating_point, cache=cache), str(operating_point)
    metrics = evaluate_splits(bundle, data, all_splits, n_boot=n_boot, threshold=threshold, cache=cache)
    suffix = ""
    if data.name != bundle.meta.data:
        suffix += "_" + re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(data.name)).name)
    if operating_point is not None:
        suffix += "_op-" + re.sub(r"[^A-Za-z0-9._-]+", "_", str(operating_point))
    metrics_path = write_json(bundle.path / f"metrics{suffix}.json", metrics)
    cases = {s: write_cases(bundle, data, s, bundle.path / f"cases_{s}{suffix}.csv", cache=cache) for s in splits}
    shift_out = bundle_shift(bundle, data, splits[-1], severities=shift_severities,
                             corruptions=shift_corruptions) if shift else None
    report_path = None
    if report:
        shown = bundle
        if operating_point is not None:  # the report states the re-chosen threshold; the bundle stays as it is
            import dataclasses

            shown = dataclasses.replace(bundle, meta=bundle.meta.model_copy(
                update={"threshold": threshold, "threshold_rule": rule}))
        from medsight import progress

        with progress.task("report: curves, calibration, Grad-CAM gallery"):
            report_path = write_bundle_report(shown, data, metrics, splits=all_splits,
                                              extra_sections=[shift_out["section"]] if shift_out else None,
                                              path=bundle.path / f"report{suffix}.html", cache=cache)
    return {"metrics": metrics, "threshold": bundle.threshold if threshold == "bundle" else threshold, "rule": rule,
            "metrics_path": metrics_path, "cases": cases, "shift": shift_out and shift_out["result"],
            "report_path": report_path}


def write_cases(bundle: Bundle, data: Dataset, split: str, path: Path, *, cache: LogitsCache | None = None) -> Path:
    """One row per case of ``split``: its id, true label(s), the probability of each class (the bundle's temperature
    and TTA, as ``predict`` gives them) and the decision at the bundle's threshold."""
    import io

    from medsight.utils import atomic_write_text

    s = data.split(split)
    probs = split_probs(bundle, data, split, cache=cache)
    task = bundle.task
    decision = task.decide(probs, bundle.threshold)
    p2 = task.class_table(probs)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["case", "true", *[f"p_{c}" for c in bundle.classes], "predicted"])
    for i in range(len(s)):
        case = s.ids[i] if s.ids is not None else str(i)
        true, pred = (task.names(r, bundle.classes) for r in (s.labels[i], decision[i]))
        true, pred = (";".join(v) if isinstance(v, list) else v for v in (true, pred))
        w.writerow([case, true, *[f"{v:.8f}" for v in p2[i]], pred])
    return atomic_write_text(path, buf.getvalue())


def ensemble_summary(bundle: Bundle, data: Dataset, splits=("val", "test")) -> dict:
    """A seed ensemble on each split: every member's AUC / accuracy (at the ensemble's temperature and threshold)
    beside the ensemble's, and the mean and largest spread of the members' probabilities (see
    :func:`medsight.models.member_spread`)."""
    from medsight.inference import run_model
    from medsight.metrics import compute_metrics
    from medsight.models import member_spread

    task = bundle.task
    out = {}
    for s in [s for s in splits if s in data.splits]:
        check_compatible(bundle, data)
        res = run_model(bundle.model, data.split(s).images, tta_flip=bundle.tta_flip, members=True,
                        tab=split_clinical_rows(bundle, data, s))
        y = data.split(s).labels
        rows = []
        for k in range(res.members.shape[1]):
            p = task.probabilities(res.members[:, k], bundle.temperature).numpy()
            m = compute_metrics(task.name, y, p, threshold=bundle.threshold)
            rows.append({"auc": float(m.get("auc", float("nan"))), "accuracy": float(m.get("accuracy", float("nan")))})
        spread = np.asarray(member_spread(res.members, task, bundle.temperature))
        out[s] = {"members": rows, "mean_spread": float(spread.mean()), "max_spread": float(spread.max())}
    return out
