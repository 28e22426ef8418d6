"""Predictor: a bundle -> predictions for files, bytes or arrays, with a PyTorch or ONNX Runtime backend.

Everything comes from the bundle: the preprocessing recipe (``medsight.data.preprocess.apply_recipe`` on the
reader's output), the calibration temperature, the task's decision rule and the operating threshold. The
model (or ONNX Runtime session) is built once; each call only reads, preprocesses and runs.

    p = Predictor("runs/breast", backend="onnx")
    p.predict_file("scan.dcm").to_dict()
    p.predict_paths(["folder/"], heatmaps_dir="heat/")    # one Prediction per file; bad files carry .error
"""

from __future__ import annotations

import copy
import io
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from medsight.bundle import Bundle, load_bundle
from medsight.data.readers import budget_for, walk_readable
from medsight.errors import ConfigError, DataError, MedsightError, choices_message, optional_import
from medsight.data.preprocess import apply_recipe, load_one
from medsight.review import NO_VERDICT, ReviewRule, rule_from_meta, threshold_text
from medsight.review import review as review_reasons

BACKENDS = ("torch", "onnx")


@dataclass
class Prediction:
    """One file's result. ``error`` is set (and the rest empty) when the file could not be used."""

    file: str
    probabilities: dict[str, float] = field(default_factory=dict)
    predicted: str | list[str] | None = None
    decision: int | list[int] | None = None
    threshold: float | list[float] | None = None
    calibrated: bool = False
    model_version: str = ""
    error: str | None = None
    ood_score: float | None = None  # higher = less like the training data (None: the bundle has no detector)
    ood_flag: bool | None = None  # score above the threshold fitted on the validation split
    positive_class: str | None = None  # binary: the class the probability and decision are about (classes[1])
    #: seed ensembles: standard deviation of the members' probabilities (binary: of P(positive); else per class)
    member_spread: float | dict[str, float] | None = None
    #: the one "needs review" decision (medsight.review): out of distribution, or too close to call
    review: bool = False
    review_reasons: list[str] = field(default_factory=list)
    heatmap: np.ndarray | None = field(default=None, repr=False)
    image: np.ndarray | None = field(default=None, repr=False)  # the model input (C, *size) in [0, 1]

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        return {"file": self.file, "probabilities": self.probabilities, "predicted": self.predicted,
                "decision": self.decision, "threshold": self.threshold, "calibrated": self.calibrated,
                "model_version": self.model_version, "ood_score": self.ood_score, "ood_flag": self.ood_flag,
                "positive_class": self.positive_class, "review": None if self.error else self.review, "review_reasons": self.review_reasons,
                "error": self.error,
                **({"member_spread": self.member_spread} if self.member_spread is not None else {})}


def default_threads(bundle: Bundle) -> int:
    """Intra-op threads for one inference: 1 for small models (thread hand-off costs more than it saves and
    concurrent requests already fill the cores), up to 4 for large ones."""
    n_params = sum(p.numel() for p in bundle.model.parameters())
    size = int(np.prod(bundle.meta.input.size))
    if n_params < 2_000_000 and size <= 64 * 64:
        return 1
    return max(1, min(4, os.cpu_count() or 1))


def model_version(bundle: Bundle) -> str:
    """``<model name>-<12 hex>`` of the bundle's digest (bundle.json's every field, the sha256 of model.pt and the
    other artefacts included): changes whenever the weights or a decision field change."""
    return bundle.version


def expand_inputs(items: Iterable[str | Path]) -> list[Path]:
    """Files as given; folders walked recursively (sorted) for the files ``data.io`` reads
    (:func:`medsight.data.io.walk_readable`: by suffix, or by content for suffix-less DICOM)."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out += walk_readable(p)
        else:
            out.append(p)
    return out


class Predictor:
    """Load a bundle once; predict many times. Thread-safe for concurrent ``predict_*`` calls."""

    def __init__(self, bundle: Bundle | str | Path, *, backend: str = "torch", threads: int | None = None,
                 onnx_path: str | Path | None = None):
        if backend not in BACKENDS:
            raise ConfigError(choices_message("backend", backend, BACKENDS))
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.backend = backend
        self.task = self.bundle.task
        self.classes = self.bundle.classes
        self.recipe = self.bundle.recipe
        self.temperature = self.bundle.temperature
        self.threshold = self.bundle.threshold
        self.calibrated = abs(self.temperature - 1.0) > 1e-12
        self.version = model_version(self.bundle)
        inp = self.bundle.meta.input.model_dump()
        self.input_shape = (int(inp["channels"]), *(int(s) for s in inp["size"]))
        #: decode limits for every file this predictor reads (sized for the model's input)
        self.budget = budget_for(inp)
        self.threads = threads
        self.model = self.bundle.model.eval()
        self.tta_flip = self.bundle.tta_flip
        #: seed ensembles: the number of members (None for one model); predictions carry the members' spread
        self.members = int(self.bundle.meta.ensemble.members) if self.bundle.meta.ensemble else None
        self._explain_model: torch.nn.Module | None = None
        self._explain_lock = threading.Lock()
        self._session = None
        self.fusion = self.bundle.fusion
        #: the bundle's "needs review" rule (medsight.review): the same decision for every caller
        self.review_rule: ReviewRule = rule_from_meta(self.bundle.meta)
        self.ood = None
        if self.bundle.meta.ood and (self.bundle.path / "ood.npz").is_file():
            from medsight.ood import load_ood

            self.ood = load_ood(self.bundle.path / "ood.npz")
        if backend == "onnx":
            self._session = self._make_session(onnx_path, threads or 1)
            ins = self._session.get_inputs()
            self._in_name = ins[0].name
            self._tab_name = ins[1].name if len(ins) > 1 else None
            if bool(self.fusion) != (self._tab_name is not None):
                raise MedsightError(f"the ONNX model for {self.bundle.path} has {len(ins)} input(s), which does not "
                                    "fit this bundle; re-export it with `medsight export`")
            outs = self._session.get_outputs()
            self._out_name = outs[0].name
            self._n_out = int(self.bundle.meta.model.num_outputs)
            # model.onnx from `medsight export` carries the penultimate features as a second output
            self._feat = (outs[1].name, int(outs[1].shape[1])) if len(outs) > 1 else None
            # ... and, for a seed ensemble, the member logits (N, members, outputs) as a third
            self._mem = outs[2].name if len(outs) > 2 else None
            if self.members and self._mem is None:
                raise MedsightError(f"the ONNX model for {self.bundle.path} has no member logits output for this "
                                    "ensemble; re-export it with `medsight export`")
            if self.ood is not None and self._feat is None:
                raise MedsightError(f"the ONNX model for {self.bundle.path} has no features output for the OOD "
                                    "detector; re-export it with `medsight export`")
            self._local = threading.local()
        elif threads:
            torch.set_num_threads(threads)

    # --- backends -------------------------------------------------------------------------------------------
    def _make_session(self, onnx_path, threads: int):
        from medsight.export import onnx_for_bundle

        ort = optional_import("onnxruntime")
        # model.onnx is used only when it was exported from this bundle's model.pt; otherwise the model is
        # exported in memory (the bundle is never written by a predictor or the service)
        model_bytes = onnx_for_bundle(self.bundle, onnx_path)
        path = "model.onnx"
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads == 1:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise MedsightError(f"cannot load ONNX model {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from e

    def _run_one(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Batch of one through a preallocated, per-thread IO binding (no per-call allocation by ORT)."""
        slot = getattr(self._local, "slot", None)
        if slot is None:
            inp = np.zeros((1, *self.input_shape), np.float32)
            out = np.zeros((1, self._n_out), np.float32)
            binding = self._session.io_binding()
            binding.bind_cpu_input(self._in_name, inp)
            binding.bind_output(self._out_name, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
            feat = mem = None
            if self._feat is not None:
                feat = np.zeros((1, self._feat[1]), np.float32)
                binding.bind_output(self._feat[0], "cpu", 0, np.float32, list(feat.shape), feat.ctypes.data)
            if self._mem is not None:
                mem = np.zeros((1, self.members, self._n_out), np.float32)
                binding.bind_output(self._mem, "cpu", 0, np.float32, list(mem.shape), mem.ctypes.data)
            slot = self._local.slot = (binding, inp, out, feat, mem)
        binding, inp, out, feat, mem = slot
        inp[...] = x
        self._session.run_with_iobinding(binding)
        return out.copy(), (None if feat is None else feat.copy()), (None if mem is None else mem.copy())

    def _onnx_outputs(self, x: np.ndarray, tab: np.ndarray | None):
        """ONNX Runtime over the TTA views of the batch, combined by the same rule as medsight.inference:
        (logits, features or None, member logits or None)."""
        from medsight.inference import combine_views, tta_views

        zs, fs, ms = [], [], []
        for v in tta_views(x, self.tta_flip):
            if tab is None and x.shape[0] == 1:
                z, f, m = self._run_one(v)
            else:
                feeds = {self._in_name: np.ascontiguousarray(v, dtype=np.float32)}
                if self._tab_name is not None:
                    feeds[self._tab_name] = np.ascontiguousarray(tab, dtype=np.float32)
                outs = self._session.run(None, feeds)
                z, f, m = outs[0], (outs[1] if len(outs) > 1 else None), (outs[2] if len(outs) > 2 else None)
            zs.append(z)
            fs.append(f)
            ms.append(m)
        feats = None if fs[0] is None else combine_views(fs)
        members = None if ms[0] is None else combine_views(ms)
        return combine_views(zs), feats, members

    def outputs(self, x: np.ndarray, tab: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, C, *size) model inputs (+ encoded clinical rows for an image + clinical model) -> (logits, OOD scores
        or None), from one pass of the model (per TTA view) on either backend."""
        logits, scores, _ = self._outputs(x, tab)
        return logits, scores

    def _outputs(self, x: np.ndarray, tab: np.ndarray | None = None):
        """:meth:`outputs` plus the member logits of a seed ensemble (None for one model)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[1:] != self.input_shape:
            raise DataError(f"input batch has shape {x.shape}; the model expects (N, {', '.join(map(str, self.input_shape))})")
        if self.fusion and (tab is None or len(tab) != len(x)):
            raise DataError(f"this model needs clinical columns {', '.join(self.fusion['columns'])} for every image")
        if self._session is not None:
            logits, feats, members = self._onnx_outputs(x, tab)
        else:
            from medsight.inference import run_model

            out = run_model(self.model, x, tab=tab, tta_flip=self.tta_flip, features=self.ood is not None,
                            members=bool(self.members))
            logits = out.logits.numpy()
            feats = None if out.features is None else out.features.numpy()
            members = None if out.members is None else out.members.numpy()
        if self.ood is None:
            return logits, None, members
        from medsight.ood import score_from_outputs

        return logits, score_from_outputs(logits, feats, self.ood, x=x), members

    def encode_clinical(self, rows: Sequence[dict] | None, n: int) -> np.ndarray | None:
        """Clinical rows -> the image + clinical model's tabular input (None for image-only bundles)."""
        if not self.fusion:
            return None
        if rows is None or len(rows) != n or any(r is None for r in rows):
            raise DataError(f"this model needs clinical values for every image: columns "
                            f"{', '.join(self.fusion['columns'])}")
        from medsight.fusion import encode_tabular

        return encode_tabular(list(rows), self.fusion["tabular"])

    def logits(self, x: np.ndarray, tab: np.ndarray | None = None) -> np.ndarray:
        """(N, C, *size) float32 model inputs (+ encoded clinical rows) -> (N, outputs) logits (TTA included)."""
        return self.outputs(x, tab)[0]

    def probabilities(self, x: np.ndarray, tab: np.ndarray | None = None) -> np.ndarray:
        """Calibrated probabilities at the bundle's temperature: binary (N,), otherwise (N, K)."""
        return self.task.probabilities(torch.from_numpy(self.logits(x, tab)), self.temperature).numpy()

    def predict_batch(self, x: np.ndarray, tab: np.ndarray | None = None):
        """-> (probabilities, OOD scores or None, OOD flags or None) from one forward pass."""
        return self._predict_batch(x, tab)[:3]

    def _predict_batch(self, x: np.ndarray, tab: np.ndarray | None = None):
        """:meth:`predict_batch` plus the members' spread of a seed ensemble (None for one model)."""
        logits, scores, members = self._outputs(x, tab)
        probs = self.task.probabilities(torch.from_numpy(np.asarray(logits)), self.temperature).numpy()
        spread = None
        if members is not None:
            from medsight.models import member_spread

            spread = member_spread(members, self.task, self.temperature)
        if scores is None:
            return probs, None, None, spread
        from medsight.ood import ood_flags

        return probs, scores, ood_flags(scores, self.ood["threshold"]), spread

    def _spread(self, spread, j: int):
        """Row ``j`` of a batch's member spread, as a Prediction carries it."""
        if spread is None:
            return None
        row = spread[j]
        if np.ndim(row) == 0:
            return float(row)
        return {c: float(v) for c, v in zip(self.classes, self.task.class_table(np.asarray(row)[None])[0])}

    # --- input ----------------------------------------------------------------------------------------------
    def preprocess(self, array: np.ndarray, meta: dict | None = None, name: str = "image") -> np.ndarray:
        """Reader output -> model input (C, *size), exactly as the bundle's recipe says."""
        return apply_recipe(array, meta or {}, self.recipe, name=name)

    def load_file(self, path: str | Path, **reader_kw) -> np.ndarray:
        reader_kw.setdefault("budget", self.budget)
        return load_one(path, self.recipe, name=str(path), **reader_kw)[0]

    def load_bytes(self, data: bytes, name: str, **reader_kw) -> np.ndarray:
        arr, meta = self.read_bytes(data, name, **reader_kw)
        return self.preprocess(arr, meta, name)

    def read_bytes(self, data: bytes, name: str, **reader_kw) -> tuple[np.ndarray, dict]:
        """An upload's bytes -> the reader's (array, meta), decoded within this model's budget (fixed before
        decoding). The ONE call from prediction into the readers for bytes; raises :class:`DataError`.

        Memory: a compressed upload (deflated DICOM, ``.nii.gz``) is inflated through the budget's capped
        stream; afterwards the freed heap is handed back to the operating system (glibc ``malloc_trim``), so a
        stream of refused bombs does not ratchet the service's resident memory up."""
        from medsight.data.readers import read_image_bytes

        reader_kw.setdefault("budget", self.budget)
        window = self.recipe.get("window")
        try:
            return read_image_bytes(data, name, window=tuple(window) if isinstance(window, list) else window,
                                    **reader_kw)
        finally:
            if len(data) > _TRIM_ABOVE:
                _trim_heap()

    @staticmethod
    def readable(data: bytes, name: str) -> bool:
        """Is this a format the readers understand (so a failure is a corrupt file, not an unsupported type)?"""
        from medsight.data.readers import HEAD, sniff_format

        return sniff_format(bytes(data[:HEAD]), name) not in (None, "gzip")

    # --- output ---------------------------------------------------------------------------------------------
    def _result(self, name: str, probs: np.ndarray) -> Prediction:
        """One row of ``probabilities(...)`` -> Prediction (class names, decision at the bundle's threshold)."""
        per_class = {c: float(v) for c, v in zip(self.classes, self.task.class_table(np.asarray(probs)[None])[0])}
        d = self.task.decide(np.asarray(probs)[None], self.threshold)[0]
        predicted = self.task.names(d, self.classes)
        decision = [int(v) for v in d] if np.ndim(d) else int(d)
        thr = self.threshold
        if thr is None and self.task.uses_threshold:
            thr = 0.5
        return Prediction(file=name, probabilities=per_class, predicted=predicted, decision=decision,
                          threshold=thr, calibrated=self.calibrated, model_version=self.version,
                          positive_class=self.bundle.positive_class)

    def _finish(self, pred: Prediction, score=None, flag=None) -> Prediction:
        """Add the OOD score and the "needs review" decision (:mod:`medsight.review`): an out-of-distribution
        scan keeps its probabilities but gets no class verdict (``predicted`` and ``decision`` None)."""
        if score is not None:
            pred.ood_score, pred.ood_flag = float(score), bool(flag)
        pred.review_reasons = review_reasons(
            self.task, self.classes, pred.probabilities, pred.threshold, self.review_rule, ood_flag=pred.ood_flag,
            ood_score=pred.ood_score, ood_threshold=None if self.ood is None else float(self.ood["threshold"]))
        pred.review = bool(pred.review_reasons)
        if pred.ood_flag:
            pred.predicted, pred.decision = None, None
        return pred

    def model_card(self) -> dict:
        """What the service's ``/v1/model`` says about this model: the bundle's facts, each split's metric
        values (from ``metrics.json``), the review rule and the thresholds as displayed (3 significant digits)."""
        from medsight.bundle import decision_text

        from medsight.bundle import BundleCard

        meta = self.bundle.meta
        return {
            **{n: getattr(meta, n) for n in BundleCard.model_fields},  # task, classes, threshold, rule, ...
            "name": meta.model.name, "classes": self.classes,
            "input": {**meta.input.model_dump(), "preprocessing": self.recipe},
            "threshold": self.threshold, "threshold_display": threshold_text(self.threshold),
            "decision_rule": decision_text(meta),
            "positive_class": self.bundle.positive_class, "temperature": self.temperature,
            "calibrated": self.calibrated, "model_version": self.version,
            "metrics": _metrics_summary(self.bundle.path),
            "clinical_columns": list((self.fusion or {}).get("columns") or []),
            "review_margin": self.review_rule.margin, "review": self.review_rule.as_dict(),
            "ood_threshold": None if self.ood is None else float(self.ood["threshold"]),
            "ensemble_members": self.members,
        }

    def display(self, arr: np.ndarray, meta: dict, heatmap: np.ndarray, name: str,
                max_side: int = 1024) -> dict:
        """The upload as the reader windowed/normalised it, at its own resolution (longest side capped at
        ``max_side``), and the heatmap resampled onto it; for volumes the middle axial slice. -> PNG bytes
        ``display``, ``display_heatmap``, ``colorbar`` and ``display_size`` [width, height]."""
        from medsight.augment import resize
        from medsight.explain import overlay_png

        r = self.recipe
        native = [int(s) for s in arr.shape[1:]]
        if arr.ndim == 4 and len(r["size"]) == 2 and arr.shape[1] == 1:
            native = native[1:]
        if len(native) == 2:
            s = min(1.0, max_side / max(native))
            native = [max(1, round(v * s)) for v in native]
        # the bundle's own recipe, at the scan's own size and channels
        img = apply_recipe(arr, meta, {**r, "size": native, "channels": None}, name=name)
        heat = heatmap
        if img.ndim == 4:  # volume: middle axial slice, in-plane size capped
            img, heat = img[:, img.shape[1] // 2], heat[heat.shape[0] // 2]
            h, w = img.shape[1:]
            s = min(1.0, max_side / max(h, w))
            if s < 1:
                img = resize(torch.from_numpy(np.ascontiguousarray(img))[None], (round(h * s), round(w * s)))[0].numpy()
        hh = resize(torch.from_numpy(np.ascontiguousarray(heat, dtype=np.float32))[None, None], tuple(img.shape[1:]))
        hh = np.clip(hh[0, 0].numpy(), 0, 1)
        bar = np.tile(np.linspace(0, 1, 256, dtype=np.float32), (12, 1))
        return {"display": image_png(img), "display_heatmap": overlay_png(img, hh, alpha=1.0),
                "display_size": [int(img.shape[2]), int(img.shape[1])],
                "colorbar": overlay_png(np.zeros((1, 12, 256), np.float32), bar, alpha=1.0)}

    def _error(self, name: str, e: BaseException) -> Prediction:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not isinstance(e, MedsightError):
            msg = f"cannot use {name}: {type(e).__name__}: {msg}"
        return Prediction(file=name, error=msg, calibrated=self.calibrated, model_version=self.version)

    # --- explanations ---------------------------------------------------------------------------------------
    def heatmaps(self, x: np.ndarray, tab: np.ndarray | None = None, *, method: str = "gradcam",
                 class_idx=None) -> np.ndarray:
        """Heatmaps in [0, 1] at input size for a batch of model inputs, for the predicted class (or
        ``class_idx``); an image + clinical model is explained through its image branch with the clinical rows
        held fixed."""
        from medsight.explain import explain_batch

        with self._explain_lock:  # hooks on a private copy: never disturbs concurrent predictions
            if self._explain_model is None:
                self._explain_model = copy.deepcopy(self.model).eval()
            return explain_batch(self._explain_model, np.ascontiguousarray(x, dtype=np.float32), tab=tab,
                                 class_idx=class_idx, method=method)

    @staticmethod
    def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float | None = None) -> bytes:
        """PNG overlay of a model input (C, *size) and its heatmap; for 3D three orthogonal slices."""
        from medsight.explain import OVERLAY_ALPHA, overlay

        return overlay(image, heatmap, OVERLAY_ALPHA if alpha is None else alpha)

    # --- one input ------------------------------------------------------------------------------------------
    def predict_array(self, x: np.ndarray, name: str = "image", *, explain: bool = False,
                      clinical: dict | None = None) -> Prediction:
        """One preprocessed input (C, *size) (+ its clinical values for a fusion model) -> Prediction."""
        batch = x[None]
        tab = self.encode_clinical(None if clinical is None else [clinical], 1)
        probs, scores, flags, spread = self._predict_batch(batch, tab)
        pred = self._result(name, probs[0])
        pred.member_spread = self._spread(spread, 0)
        self._finish(pred, *((scores[0], flags[0]) if scores is not None else ()))
        pred.image = x
        if explain:
            pred.heatmap = self.heatmaps(batch, tab)[0]
        return pred

    def predict_bytes(self, data: bytes, name: str, *, explain: bool = False, clinical: dict | None = None) -> Prediction:
        """Raises :class:`DataError` for unreadable input (the service maps it to an HTTP status)."""
        return self.predict_array(self.load_bytes(data, name), name, explain=explain, clinical=clinical)

    def predict_file(self, path: str | Path, *, explain: bool = False, clinical: dict | None = None) -> Prediction:
        return self.predict_array(self.load_file(path), str(path), explain=explain, clinical=clinical)

    # --- many inputs ----------------------------------------------------------------------------------------
    def predict_paths(self, items: Sequence[str | Path], *, batch_size: int = 64,
                      heatmaps_dir: str | Path | None = None, alpha: float | None = None,
                      clinical: dict[str, dict] | None = None) -> list[Prediction]:
        """Files and folders (walked recursively) -> one Prediction per file, in order; a file that cannot be
        read or preprocessed gets ``error`` set and does not stop the batch. With ``heatmaps_dir`` a Grad-CAM
        overlay PNG is written per file (``<stem>.heatmap.png``, numbered on name clashes)."""
        return list(self.iter_predictions(items, batch_size=batch_size, heatmaps_dir=heatmaps_dir, alpha=alpha,
                                          clinical=clinical))

    def _loaded_batches(self, files: list[Path], batch_size: int, workers: int) -> Iterator[list]:
        """Per batch, ``[(index, file, array or None, exception or None)]``. With ``workers`` > 0 the files are
        decoded in that many forked processes and the next batch is decoded while this one runs, so at most two
        batches of arrays exist at a time."""
        starts = range(0, len(files), batch_size)
        if workers <= 0:
            for start in starts:
                out = []
                for i, f in enumerate(files[start:start + batch_size], start):
                    try:
                        out.append((i, f, self.load_file(f), None))
                    except (KeyboardInterrupt, SystemExit):
                        raise
                    except BaseException as e:  # noqa: BLE001 - a bad file must not stop the batch (incl. PanicException)
                        out.append((i, f, None, e))
                yield out
            return
        import multiprocessing as mp

        global _LOADER
        _LOADER = self
        pool = mp.get_context("fork").Pool(workers, initializer=_loader_init)

        def submit(start: int):
            chunk = files[start:start + batch_size]
            parts = [chunk[k::workers] for k in range(workers)]  # interleaved: equal shares, any order
            return start, len(chunk), pool.map_async(_load_paths, [p for p in parts if p])

        try:
            pending = submit(starts[0]) if len(starts) else None
            for n, _ in enumerate(starts):
                start, size, job = pending
                pending = submit(starts[n + 1]) if n + 1 < len(starts) else None
                parts, out = job.get(), [None] * size
                for k, part in enumerate(parts):
                    for j, (x, err) in enumerate(part):
                        pos = k + j * workers
                        out[pos] = (start + pos, files[start + pos], x, err)
                yield out
        finally:
            pool.terminate()
            pool.join()
            _LOADER = None

    def iter_predictions(self, items: Sequence[str | Path], *, batch_size: int = 64,
                         heatmaps_dir: str | Path | None = None, alpha: float | None = None,
                         clinical: dict[str, dict] | None = None, workers: int = 0) -> Iterator[Prediction]:
        """:meth:`predict_paths` as a generator: each batch's Predictions are yielded, in order, as soon as
        the batch is done (what :func:`write_predictions` streams). ``workers`` > 0 decodes files in that many
        processes, a batch ahead; memory stays bounded by two batches whatever the number of files."""
        files = expand_inputs(items)
        results: list[Prediction | None] = [None] * len(files)
        out_dir = Path(heatmaps_dir) if heatmaps_dir is not None else None
        if out_dir is not None:
            from medsight.utils import private_dir

            private_dir(out_dir)  # heatmaps named after input files: patient data
        used_names: set[str] = set()
        loaded = self._loaded_batches(files, batch_size, workers)
        try:
            yield from self._predict_batches(files, loaded, batch_size, results, out_dir, used_names, alpha, clinical)
        finally:
            loaded.close()  # stops the decode workers, also when the caller stops early

    def _predict_batches(self, files, loaded, batch_size, results, out_dir, used_names, alpha, clinical):
        from medsight import progress

        for start in progress.track(range(0, len(files), batch_size), f"predicting {len(files)} files, by batch"):
            chunk = next(loaded)
            xs, idx, tabs = [], [], []
            for i, f, x, err in chunk:
                if err is not None:
                    results[i] = self._error(str(f), err)
                    continue
                try:
                    if self.fusion:  # clinical values matched by path or file name
                        row = (clinical or {}).get(str(f)) or (clinical or {}).get(Path(f).name)
                        tabs.append(self.encode_clinical([row] if row is not None else None, 1)[0])
                    xs.append(x)
                    idx.append(i)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except BaseException as e:  # noqa: BLE001 - a bad file must not stop the batch (incl. PanicException)
                    results[i] = self._error(str(f), e)
            if xs:
                self._predict_loaded(files, xs, idx, tabs, results, out_dir, used_names, alpha)
            for i, *_ in chunk:
                if results[i] is not None:
                    yield results[i]
                results[i] = None

    def _predict_loaded(self, files, xs, idx, tabs, results, out_dir, used_names, alpha) -> None:
        """One batch of loaded inputs -> Predictions into ``results`` (and heatmap PNGs)."""
        batch = np.stack(xs)
        tab = np.stack(tabs) if tabs else None
        probs, scores, flags, spread = self._predict_batch(batch, tab)
        heat = self.heatmaps(batch, tab) if out_dir is not None else None
        for j, i in enumerate(idx):
            pred = self._result(str(files[i]), probs[j])
            pred.member_spread = self._spread(spread, j)
            self._finish(pred, *((scores[j], flags[j]) if scores is not None else ()))
            if heat is not None:
                stem = files[i].name.split(".")[0] or "image"
                name, k = f"{stem}.heatmap.png", 1
                while name in used_names:
                    k += 1
                    name = f"{stem}-{k}.heatmap.png"
                used_names.add(name)
                from medsight.utils import atomic_write_bytes

                atomic_write_bytes(out_dir / name, self.overlay(xs[j], heat[j], alpha), private=True)
            results[i] = pred

    # --- explanations of files ------------------------------------------------------------------------------
    def explain_paths(self, items: Sequence[str | Path], out_dir: str | Path, *, method: str = "gradcam",
                      class_idx=None, clinical: dict[str, dict] | None = None) -> Iterable[dict]:
        """For each file (folders walked): ``<name>_heatmap.npy`` and ``<name>_overlay.png`` in ``out_dir``,
        yielding ``{"file", "error", "summary", "overlay"}`` as each is written. The probabilities are the ones
        ``predict`` gives (same preprocessing, TTA, temperature, clinical input)."""
        from medsight.utils import atomic_write_bytes, private_dir

        out = private_dir(out_dir)
        used: set[str] = set()
        for f in expand_inputs(items):
            try:
                x = self.load_file(f)
                tab = None
                if self.fusion:
                    row = (clinical or {}).get(str(f)) or (clinical or {}).get(Path(f).name)
                    tab = self.encode_clinical([row] if row is not None else None, 1)
                probs, scores, flags = self.predict_batch(x[None], tab)
                pred = self._finish(self._result(str(f), probs[0]),
                                    *((scores[0], flags[0]) if scores is not None else ()))
                heat = self.heatmaps(x[None], tab, method=method, class_idx=class_idx)[0]
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # noqa: BLE001 - one bad file must not stop the others (incl. PanicException)
                yield {"file": str(f), "error": self._error(str(f), e).error, "summary": "", "overlay": None}
                continue
            stem = Path(f).name.split(".")[0] or "input"
            name, k = stem, 1
            while name in used:
                k += 1
                name = f"{stem}-{k}"
            used.add(name)
            buf = io.BytesIO()
            np.save(buf, heat.astype(np.float32))
            atomic_write_bytes(out / f"{name}_heatmap.npy", buf.getvalue(), private=True)
            png = atomic_write_bytes(out / f"{name}_overlay.png", self.overlay(x, heat), private=True)
            summary = f"predicted {pred.predicted or NO_VERDICT}, " + ", ".join(
                f"p({c})={v:.3f}" for c, v in pred.probabilities.items())
            if pred.review:
                summary += " [needs review: " + "; ".join(pred.review_reasons) + "]"
            yield {"file": str(f), "error": None, "summary": summary, "overlay": png}


#: uploads larger than this hand freed heap back to the OS after decoding (see ``Predictor.read_bytes``)
_TRIM_ABOVE = 256 * 1024


def _trim_heap() -> None:
    """glibc only: return freed heap pages to the operating system (a no-op elsewhere)."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.malloc_trim.argtypes = [ctypes.c_size_t]
            _LIBC = libc
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)  # type: ignore[attr-defined]


_LIBC: "object | None" = None  # the C library (False where it cannot be loaded)


def image_png(x: np.ndarray) -> bytes:
    """A model input or display image (C, *size) in [0, 1] as a PNG (3D: the middle slice)."""
    from PIL import Image

    img = x[:, x.shape[1] // 2] if x.ndim == 4 else x
    img = img[0] if img.shape[0] == 1 else np.moveaxis(img[:3], 0, -1)
    buf = io.BytesIO()
    Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _metrics_summary(path: Path) -> dict:
    """``metrics.json`` -> per split, each metric's value (None where it has none); {} when there is none."""
    import json

    try:
        raw = json.loads((path / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    out: dict = {}
    for split, vals in raw.items():
        if isinstance(vals, dict):
            out[split] = {k: (float(v["value"]) if isinstance(v.get("value"), (int, float)) else None)
                          for k, v in vals.items() if isinstance(v, dict) and "value" in v
                          and (v["value"] is None or isinstance(v["value"], (int, float)))}
    return out


#: ``write_predictions`` formats, by the output file's suffix
OUTPUT_SUFFIXES = (".csv", ".json", ".jsonl")


_LOADER: "Predictor | None" = None  # the predictor whose load_file forked decode workers call


def _loader_init() -> None:
    torch.set_num_threads(1)  # a decode worker: one thread each (resizing uses torch)


def _load_paths(paths: list[Path]) -> list[tuple]:
    """In a decode worker: ``(array, None)`` or ``(None, exception)`` per file, as ``load_file`` gives them."""
    import pickle

    out = []
    for p in paths:
        try:
            out.append((_LOADER.load_file(p), None))
        except BaseException as e:  # noqa: BLE001 - reported per file by the parent
            try:
                pickle.dumps(e)
            except Exception:  # noqa: BLE001 - an exception that cannot cross processes: keep its words
                e = DataError(f"cannot use {p}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            out.append((None, e))
    return out


def default_workers(n_files: int, batch_size: int) -> int:
    """Decode processes for ``predict``: none for one batch or less, else up to 4 (one core left to the model)."""
    if n_files <= batch_size:
        return 0
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def _csv_row(r: dict, classes: Sequence[str]) -> list:
    import json

    probs = [f"{r['probabilities'][c]:.6f}" if r["error"] is None else "" for c in classes]
    pred = ";".join(r["predicted"]) if isinstance(r["predicted"], list) else (r["predicted"] or "")
    dec = json.dumps(r["decision"]) if isinstance(r["decision"], list) else ("" if r["decision"] is None else r["decision"])
    # displayed to 3 significant digits (one per label, comma-separated); the JSON output carries it exactly
    thr = "" if r["threshold"] is None else threshold_text(r["threshold"])
    ood = "" if r["ood_score"] is None else f"{r['ood_score']:.3f}"
    review = "" if r["error"] is not None else r["review"]
    return [r["file"], *probs, pred, dec, thr, r.get("positive_class") or "", r["calibrated"], r["model_version"],
            ood, "" if r["ood_flag"] is None else r["ood_flag"], review, "; ".join(r["review_reasons"]),
            r["error"] or ""]


def write_predictions(predictions: Iterable[Prediction], out: str | Path, classes: Sequence[str],
                      on_row: Callable[[Prediction], None] | None = None) -> tuple[int, int]:
    """Stream Predictions to ``out`` as they are produced: ``.csv`` (one row per file), ``.jsonl`` (one JSON
    object per line) or ``.json`` (an array, closed at the end). Each row is flushed when written, so a
    crash keeps every row before it. ``on_row`` is called after each row. Returns (rows, rows with an error)."""
    import csv
    import json

    out = Path(out)
    kind = out.suffix.lower()
    if kind not in OUTPUT_SUFFIXES:
        raise ConfigError(f"output file must end in {', '.join(OUTPUT_SUFFIXES)}, got {out.name!r}")
    n = n_err = 0
    from medsight.utils import private_open

    with private_open(out, "w", newline="", encoding="utf-8") as fh:  # per-file results: patient data, 0600
        w = csv.writer(fh) if kind == ".csv" else None
        if w is not None:
            w.writerow(["file", *[f"p_{c}" for c in classes], "predicted", "decision", "threshold", "positive_class",
                        "calibrated", "model_version", "ood_score", "ood_flag", "review", "review_reasons",
                        "error"])
        elif kind == ".json":
            fh.write("[")
        for p in predictions:
            r = p.to_dict()
            if w is not None:
                w.writerow(_csv_row(r, classes))
            elif kind == ".jsonl":
                fh.write(json.dumps(r) + "\n")
            else:
                fh.write(("\n" if n == 0 else ",\n") + json.dumps(r, indent=None))
            fh.flush()
            n += 1
            n_err += r["error"] is not None
            if on_row is not None:
                on_row(p)
        if kind == ".json":
            fh.write("\n]\n")
    return n, n_err
