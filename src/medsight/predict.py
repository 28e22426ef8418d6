"""Predictor: a bundle -> predictions for files, bytes or arrays, with a PyTorch or ONNX Runtime backend.

Everything comes from the bundle: the preprocessing recipe (``medsight.preprocess.apply_recipe`` on the
reader's output), the calibration temperature, the task's decision rule and the operating threshold. The
model (or ONNX Runtime session) is built once; each call only reads, preprocesses and runs.

    p = Predictor("runs/breast", backend="onnx")
    p.predict_file("scan.dcm").to_dict()
    p.predict_paths(["folder/"], heatmaps_dir="heat/")    # one Prediction per file; bad files carry .error
"""

from __future__ import annotations

import copy
import hashlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from medsight.bundle import Bundle, load_bundle
from medsight.errors import ConfigError, DataError, MedsightError, choices_message, optional_import
from medsight.preprocess import apply_recipe, load_one

BACKENDS = ("torch", "onnx")
#: file suffixes picked up when a folder is walked (DICOM files often have no suffix: see ``_wanted``)
INPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom", ".ima", ".nii", ".nii.gz")


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
    heatmap: np.ndarray | None = field(default=None, repr=False)
    image: np.ndarray | None = field(default=None, repr=False)  # the model input (C, *size) in [0, 1]

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        return {"file": self.file, "probabilities": self.probabilities, "predicted": self.predicted,
                "decision": self.decision, "threshold": self.threshold, "calibrated": self.calibrated,
                "model_version": self.model_version, "ood_score": self.ood_score, "ood_flag": self.ood_flag,
                "error": self.error}


def default_threads(bundle: Bundle) -> int:
    """Intra-op threads for one inference: 1 for small models (thread hand-off costs more than it saves and
    concurrent requests already fill the cores), up to 4 for large ones."""
    n_params = sum(p.numel() for p in bundle.model.parameters())
    size = int(np.prod(bundle.meta["input"]["size"]))
    if n_params < 2_000_000 and size <= 64 * 64:
        return 1
    return max(1, min(4, os.cpu_count() or 1))


def model_version(bundle: Bundle) -> str:
    """``<model name>-<first 12 hex of sha256(model.pt)>``: changes whenever the weights change."""
    h = hashlib.sha256()
    with open(bundle.path / "model.pt", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"{bundle.meta['model']['name']}-{h.hexdigest()[:12]}"


def _wanted(p: Path) -> bool:
    name = p.name.lower()
    if name.startswith("."):
        return False
    return name.endswith(INPUT_SUFFIXES) or "." not in name


def expand_inputs(items: Iterable[str | Path]) -> list[Path]:
    """Files as given; folders walked recursively (sorted) for image/DICOM/NIfTI files."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and _wanted(f))
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
        inp = self.bundle.meta["input"]
        self.input_shape = (int(inp["channels"]), *(int(s) for s in inp["size"]))
        self.threads = threads
        self.model = self.bundle.model.eval()
        self._explain_model: torch.nn.Module | None = None
        self._explain_lock = threading.Lock()
        self._session = None
        self.fusion = self.bundle.fusion
        if self.fusion and backend == "onnx":
            raise ConfigError(f"{self.bundle.path} is an image + clinical fusion model; use --backend torch")
        self.ood = None
        self._ood_model: torch.nn.Module | None = None
        self._ood_lock = threading.Lock()
        if (self.bundle.path / "ood.npz").is_file() and not self.fusion:
            from medsight.ood import load_ood

            self.ood = load_ood(self.bundle.path / "ood.npz")
        if backend == "onnx":
            self._session = self._make_session(onnx_path, threads or 1)
            self._in_name = self._session.get_inputs()[0].name
            outs = self._session.get_outputs()
            self._out_name = outs[0].name
            self._n_out = int(self.bundle.meta["model"]["num_outputs"])
            # model.onnx from `medsight export` carries the penultimate features as a second output
            self._feat = (outs[1].name, int(outs[1].shape[1])) if len(outs) > 1 else None
            self._local = threading.local()
        elif threads:
            torch.set_num_threads(threads)

    # --- backends -------------------------------------------------------------------------------------------
    def _make_session(self, onnx_path, threads: int):
        ort = optional_import("onnxruntime")
        path = Path(onnx_path) if onnx_path else self.bundle.path / "model.onnx"
        weights = self.bundle.path / "model.pt"
        stale = onnx_path is None and path.is_file() and path.stat().st_mtime < weights.stat().st_mtime
        if not path.is_file() or stale:  # missing, or older than the weights (e.g. after --resume): export
            from medsight.export import export_onnx

            try:
                path = export_onnx(self.bundle.path, out=path)
            except OSError as e:  # read-only bundle
                raise MedsightError(f"{path} is missing and cannot be written ({e.strerror}); "
                                    f"run `medsight export {self.bundle.path} --format onnx`") from e
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads == 1:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise MedsightError(f"cannot load ONNX model {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from e

    def _run_one(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Batch of one through a preallocated, per-thread IO binding (no per-call allocation by ORT)."""
        slot = getattr(self._local, "slot", None)
        if slot is None:
            inp = np.zeros((1, *self.input_shape), np.float32)
            out = np.zeros((1, self._n_out), np.float32)
            binding = self._session.io_binding()
            binding.bind_cpu_input(self._in_name, inp)
            binding.bind_output(self._out_name, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
            feat = None
            if self._feat is not None:
                feat = np.zeros((1, self._feat[1]), np.float32)
                binding.bind_output(self._feat[0], "cpu", 0, np.float32, list(feat.shape), feat.ctypes.data)
            slot = self._local.slot = (binding, inp, out, feat)
        binding, inp, out, feat = slot
        inp[...] = x
        self._session.run_with_iobinding(binding)
        return out.copy(), (None if feat is None else feat.copy())

    def forward(self, x: np.ndarray, tab: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, C, *size) model inputs -> (logits, OOD scores or None), from one pass of the model."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[1:] != self.input_shape:
            raise DataError(f"input batch has shape {x.shape}; the model expects (N, {', '.join(map(str, self.input_shape))})")
        if self._session is not None and (self.ood is None or self._feat is not None):
            if x.shape[0] == 1:
                logits, feats = self._run_one(x)
            else:
                outs = self._session.run(None, {self._in_name: x})
                logits, feats = outs[0], (outs[1] if len(outs) > 1 else None)
            if self.ood is None:
                return logits, None
            from medsight.ood import score_from_outputs

            return logits, score_from_outputs(logits, feats, self.ood, x=x)
        if self.ood is not None:  # PyTorch: logits and features from one pass on a private, hooked copy
            from medsight.ood import detect

            with self._ood_lock:
                if self._ood_model is None:
                    self._ood_model = copy.deepcopy(self.model).eval()
                r = detect(self._ood_model, x, self.ood)
            return r["logits"].float().numpy(), np.asarray(r["ood_score"], dtype=float)
        return self.logits(x, tab), None

    def encode_clinical(self, rows: Sequence[dict] | None, n: int) -> np.ndarray | None:
        """Clinical rows -> the fusion model's tabular input (None for image-only bundles)."""
        if not self.fusion:
            return None
        if rows is None or len(rows) != n or any(r is None for r in rows):
            raise DataError(f"this model needs clinical values for every image: columns "
                            f"{', '.join(self.fusion['columns'])}")
        from medsight.fusion import encode_tabular

        return encode_tabular(list(rows), self.fusion["tabular"])

    def logits(self, x: np.ndarray, tab: np.ndarray | None = None) -> np.ndarray:
        """(N, C, *size) float32 model inputs (+ encoded clinical rows for fusion) -> (N, outputs) logits."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[1:] != self.input_shape:
            raise DataError(f"input batch has shape {x.shape}; the model expects (N, {', '.join(map(str, self.input_shape))})")
        if self.fusion:
            if tab is None:
                raise DataError(f"this model needs clinical columns {', '.join(self.fusion['columns'])}")
            with torch.inference_mode():
                return self.model(torch.from_numpy(x), torch.from_numpy(np.asarray(tab, np.float32))).float().numpy()
        if self._session is not None:
            if x.shape[0] == 1:
                return self._run_one(x)[0]
            return self._session.run(None, {self._in_name: x})[0]
        with torch.inference_mode():
            return self.model(torch.from_numpy(x)).float().numpy()

    def probabilities(self, x: np.ndarray, tab: np.ndarray | None = None) -> np.ndarray:
        """Calibrated probabilities at the bundle's temperature: binary (N,), otherwise (N, K)."""
        return self.task.probabilities(torch.from_numpy(self.logits(x, tab)), self.temperature).numpy()

    def predict_batch(self, x: np.ndarray, tab: np.ndarray | None = None):
        """-> (probabilities, OOD scores or None, OOD flags or None) from one forward pass."""
        if self.fusion:
            logits, scores = self.logits(x, tab), None
        else:
            logits, scores = self.forward(x)
        probs = self.task.probabilities(torch.from_numpy(np.asarray(logits)), self.temperature).numpy()
        if scores is None:
            return probs, None, None
        from medsight.ood import ood_flags

        return probs, scores, ood_flags(scores, self.ood["threshold"])

    # --- input ----------------------------------------------------------------------------------------------
    def preprocess(self, array: np.ndarray, meta: dict | None = None, name: str = "image") -> np.ndarray:
        """Reader output -> model input (C, *size), exactly as the bundle's recipe says."""
        return apply_recipe(array, meta or {}, self.recipe, name=name)

    def load_file(self, path: str | Path, **reader_kw) -> np.ndarray:
        return load_one(path, self.recipe, name=str(path), **reader_kw)[0]

    def load_bytes(self, data: bytes, name: str, **reader_kw) -> np.ndarray:
        return load_one(data, self.recipe, name=name, **reader_kw)[0]

    # --- output ---------------------------------------------------------------------------------------------
    def _result(self, name: str, probs: np.ndarray) -> Prediction:
        """One row of ``probabilities(...)`` -> Prediction (class names, decision at the bundle's threshold)."""
        t = self.task.name
        if t == "binary":
            p1 = float(probs)
            per_class = {self.classes[0]: 1.0 - p1, self.classes[1]: p1}
            d = int(self.task.decide(np.asarray([p1]), self.threshold)[0])
            predicted, decision = self.classes[d], d
        elif t == "multilabel":
            per_class = {c: float(v) for c, v in zip(self.classes, probs)}
            ds = self.task.decide(np.asarray(probs)[None], self.threshold)[0]
            decision = [int(v) for v in ds]
            predicted = [c for c, v in zip(self.classes, decision) if v]
        else:
            per_class = {c: float(v) for c, v in zip(self.classes, probs)}
            d = int(self.task.decide(np.asarray(probs)[None], self.threshold)[0])
            predicted, decision = self.classes[d], d
        thr = self.threshold
        if thr is None and t in ("binary", "multilabel"):
            thr = 0.5
        return Prediction(file=name, probabilities=per_class, predicted=predicted, decision=decision,
                          threshold=thr, calibrated=self.calibrated, model_version=self.version)

    def _error(self, name: str, e: BaseException) -> Prediction:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not isinstance(e, MedsightError):
            msg = f"cannot use {name}: {type(e).__name__}: {msg}"
        return Prediction(file=name, error=msg, calibrated=self.calibrated, model_version=self.version)

    # --- explanations ---------------------------------------------------------------------------------------
    def heatmaps(self, x: np.ndarray, tab: np.ndarray | None = None) -> np.ndarray:
        """Grad-CAM heatmaps in [0, 1] at input size for a batch of model inputs, for the predicted class."""
        from medsight.explain import gradcam

        with self._explain_lock:  # hooks on a private copy: never disturbs concurrent predictions
            if self._explain_model is None:
                self._explain_model = copy.deepcopy(self.model).eval()
            model = self._explain_model
            if self.fusion:  # explain the image branch with this patient's clinical values held fixed
                model = model.model_with_tab(torch.from_numpy(np.asarray(tab, np.float32)))
            return gradcam(model, torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))

    @staticmethod
    def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> bytes:
        """PNG overlay of a 2D model input (C, H, W) and its heatmap; for 3D the middle axial slice."""
        from medsight.explain import overlay_png

        if image.ndim == 4:  # (C, D, H, W)
            k = image.shape[1] // 2
            image, heatmap = image[:, k], heatmap[k]
        return overlay_png(image, heatmap, alpha=alpha)

    # --- one input ------------------------------------------------------------------------------------------
    def predict_array(self, x: np.ndarray, name: str = "image", *, explain: bool = False,
                      clinical: dict | None = None) -> Prediction:
        """One preprocessed input (C, *size) (+ its clinical values for a fusion model) -> Prediction."""
        batch = x[None]
        tab = self.encode_clinical(None if clinical is None else [clinical], 1)
        probs, scores, flags = self.predict_batch(batch, tab)
        pred = self._result(name, probs[0])
        if scores is not None:
            pred.ood_score, pred.ood_flag = float(scores[0]), bool(flags[0])
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
                      heatmaps_dir: str | Path | None = None, alpha: float = 0.45,
                      clinical: dict[str, dict] | None = None) -> list[Prediction]:
        """Files and folders (walked recursively) -> one Prediction per file, in order; a file that cannot be
        read or preprocessed gets ``error`` set and does not stop the batch. With ``heatmaps_dir`` a Grad-CAM
        overlay PNG is written per file (``<stem>.heatmap.png``, numbered on name clashes)."""
        files = expand_inputs(items)
        results: list[Prediction | None] = [None] * len(files)
        out_dir = Path(heatmaps_dir) if heatmaps_dir is not None else None
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
        used_names: set[str] = set()
        for start in range(0, len(files), batch_size):
            chunk = list(enumerate(files[start:start + batch_size], start))
            xs, idx, tabs = [], [], []
            for i, f in chunk:
                try:
                    x = self.load_file(f)
                    if self.fusion:  # clinical values matched by path or file name
                        row = (clinical or {}).get(str(f)) or (clinical or {}).get(Path(f).name)
                        tabs.append(self.encode_clinical([row] if row is not None else None, 1)[0])
                    xs.append(x)
                    idx.append(i)
                except Exception as e:  # noqa: BLE001 - a bad file must not stop the batch
                    results[i] = self._error(str(f), e)
            if not xs:
                continue
            batch = np.stack(xs)
            tab = np.stack(tabs) if tabs else None
            probs, scores, flags = self.predict_batch(batch, tab)
            heat = self.heatmaps(batch, tab) if out_dir is not None else None
            for j, i in enumerate(idx):
                pred = self._result(str(files[i]), probs[j])
                if scores is not None:
                    pred.ood_score, pred.ood_flag = float(scores[j]), bool(flags[j])
                if heat is not None:
                    stem = files[i].name.split(".")[0] or "image"
                    name, k = f"{stem}.heatmap.png", 1
                    while name in used_names:
                        k += 1
                        name = f"{stem}-{k}.heatmap.png"
                    used_names.add(name)
                    from medsight.utils import atomic_write_bytes

                    atomic_write_bytes(out_dir / name, self.overlay(xs[j], heat[j], alpha))
                results[i] = pred
        return [r for r in results if r is not None]
