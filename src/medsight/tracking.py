"""MLflow tracking: optional, and never in the way of the run it records.

``medsight train --track`` (or ``track: {enabled: true}`` in the config) logs one MLflow run to the server at
``$MLFLOW_TRACKING_URI`` (unset: MLflow's own default, a local ``sqlite:///mlflow.db`` store in the working
directory; no server needed):

- params: the resolved config, flattened (``train.lr``, ``model.name``, ...);
- tags: ``medsight.dataset``, ``medsight.model``, ``medsight.task``, ``medsight.data_hash`` (see
  :func:`data_hash`), ``medsight.version``, ``medsight.bundle`` (the bundle folder);
- per-epoch metrics with ``step=epoch`` from the trainer's ``"epoch"`` events (``train_loss``, ``val_loss``,
  ``val_auc``, ``val_accuracy``, ..., ``lr``, ``seconds``);
- final metrics from ``metrics.json`` as ``<split>_<metric>`` with ``<split>_<metric>_ci_low`` / ``_ci_high``
  (per class: ``<split>_class_<k>_<metric>``), e.g. ``test_auc``; the validation split's are ``final_val_...``,
  as ``val_auc`` etc. already name the per-epoch curves (the bundle's are at its best epoch and threshold);
- artefacts: the bundle folder under ``bundle/`` (without ``checkpoints/``), ``report.html`` when present, and
  the bundle as an MLflow pyfunc model under ``model/`` (:func:`save_pyfunc`; the model's code is
  ``medsight.mlflow_model``, named by module path, not imported here, so training never loads the serving stack),
  so ``mlflow models serve -m runs:/<run id>/model --env-manager local`` serves it.

The run id is written to ``<bundle>/tracking.json`` (the bundle itself stays as written; ``tracking.json`` is a
side file that only ``train --track`` writes, without credentials). ``medsight evaluate --track`` logs a child
run of that run (or a standalone run for a bundle trained without tracking); ``bench --track`` logs a parent run
with a child run per training run (each seed, and the reference recipe).

Failure modes: before training, one connection check with 1 attempt and a 3 s timeout. An unreachable server is a
warning (a WARNING record on the ``medsight.tracking`` logger) and training goes on untracked, or, with
``track.required``, a :class:`TrackingError` (one line, exit 2) before anything is trained. Once the run has started, every MLflow call is best-effort: the first failure is one
warning and tracking stops for the rest of the run; the bundle, metrics and history are always written first and
never depend on the tracking server.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

from medsight.errors import MedsightError

TRACKING_FILE = "tracking.json"
CHECK_TIMEOUT_S = 3
#: HTTP retry settings used for every MLflow call medsight makes, unless the user set them: a dead server costs a
#: few seconds once, not MLflow's default retry storm (7 retries with exponential backoff, minutes per call)
RUN_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
CHECK_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(CHECK_TIMEOUT_S)}
#: epoch-event keys that are bookkeeping, not metrics
_NOT_METRICS = {"epoch", "best_epoch", "improved"}
#: bundle entries that are training state, not part of the model (and can be large)
_SKIP_IN_BUNDLE = {"checkpoints", TRACKING_FILE}

Warn = Callable[[str], None]


class TrackingError(MedsightError):
    """The tracking server is required (``track.required``) but cannot be used."""


#: tracking problems that do not stop the run are WARNING records here (the CLI prints them as "warning:" lines)
log = logging.getLogger("medsight.tracking")


def _default_warn(message: str) -> None:
    log.warning(message)


def _mlflow():
    try:
        import mlflow  # noqa: F401
        from mlflow.tracking import MlflowClient
    except ImportError as e:
        raise MedsightError("MLflow tracking needs mlflow: pip install 'medsight[track]'") from e
    return MlflowClient


# --- pure helpers ---------------------------------------------------------------------------------------------

def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else MLflow's default local store."""
    from mlflow.tracking import get_tracking_uri

    return os.environ.get("MLFLOW_TRACKING_URI") or get_tracking_uri()


def safe_uri(uri: str) -> str:
    """The URI without user name or password (what may be printed and written to tracking.json)."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparseable uri>"
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def flat_params(cfg_dump: dict, prefix: str = "") -> dict[str, str]:
    """Nested config dict -> ``{"train.lr": "0.001", ...}`` (lists and None as their JSON text)."""
    out: dict[str, str] = {}
    for k, v in cfg_dump.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_params(v, f"{key}."))
        else:
            out[key] = v if isinstance(v, str) else json.dumps(v)
    return out


def _metric_name(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_\-. /]", "_", str(name))


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def final_metrics(metrics: dict) -> dict[str, float]:
    """``metrics.json`` -> flat MLflow metrics: ``test_auc``, ``test_auc_ci_low``, ``test_auc_ci_high``, ...;
    per class ``test_class_<k>_<metric>``; split ``val`` as ``final_val_...`` (``val_*`` are the per-epoch
    curves). Missing values (NaN, None) and the confusion matrix are left out."""
    out: dict[str, float] = {}

    def add(key: str, entry: Any) -> None:
        if not isinstance(entry, dict) or not _finite(entry.get("value")):
            return
        out[_metric_name(key)] = float(entry["value"])
        ci = entry.get("ci")
        if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_finite(c) for c in ci):
            out[_metric_name(f"{key}_ci_low")], out[_metric_name(f"{key}_ci_high")] = float(ci[0]), float(ci[1])

    for split, block in metrics.items():
        if not isinstance(block, dict):
            continue
        split = "final_val" if split == "val" else split
        for name, entry in block.items():
            if name == "per_class" and isinstance(entry, dict):
                for k, per in entry.items():
                    for m, e in (per or {}).items():
                        add(f"{split}_class_{k}_{m}", e)
            else:
                add(f"{split}_{name}", entry)
    return out


def epoch_metrics(info: dict) -> dict[str, float]:
    """The trainer's ``"epoch"`` event -> its numeric metrics (``train_loss``, ``val_auc``, ``lr``, ``seconds``)."""
    return {_metric_name(k): float(v) for k, v in info.items() if k not in _NOT_METRICS and _finite(v)}


def data_hash(data) -> str:
    """Content digest of a loaded dataset: sha256 over every split's name, array shapes, dtypes and bytes (images,
    then labels), in split order; the first 16 hex digits. It is the data the model saw, after reading (so it does
    not depend on the file format or on paths), and costs one pass over memory already loaded (about 1 s/GB)."""
    import numpy as np

    h = hashlib.sha256()
    for name in sorted(data.splits):
        s = data.splits[name]
        for arr in (s.images, s.labels):
            if not isinstance(arr, np.ndarray):  # rows on disk (dataset cache): the same bytes, a chunk at a time
                h.update(f"{name}:{tuple(arr.shape)}:{arr.dtype.str};".encode())
                for i in range(0, len(arr), 1024):
                    h.update(np.ascontiguousarray(arr[i:i + 1024]).data.cast("B"))
                continue
            a = np.ascontiguousarray(arr)
            h.update(f"{name}:{a.shape}:{a.dtype.str};".encode())
            h.update(a.data.cast("B"))
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _http_env(settings: dict[str, str], *, override: bool = False) -> Iterator[None]:
    """Set MLflow's HTTP retry/timeout variables for the calls inside (keeping any the user set, unless
    ``override``); restore them after."""
    saved = {k: os.environ.get(k) for k in settings}
    for k, v in settings.items():
        if override or k not in os.environ:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, old in saved.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old


_CAUSES = ("Connection refused", "Read timed out", "timed out", "Name or service not known",
           "nodename nor servname", "No route to host", "Connection reset", "Remote end closed connection")


def _why(e: BaseException) -> str:
    """The root cause in a few words (MLflow wraps urllib3's errors in long texts)."""
    text = str(e)
    for cause in _CAUSES:
        if cause in text:
            return f"{type(e).__name__}: {cause.lower()}"
    lines = text.strip().splitlines()
    first = lines[0] if lines else ""
    first = first if len(first) <= 160 else first[:160] + "..."
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """MLflow and urllib3 log retries, warnings and write 'View run at' lines to stdout; library code stays
    quiet (the CLI says where the run is)."""
    import io

    loggers = [logging.getLogger(n) for n in ("mlflow", "urllib3", "alembic")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def connect(uri: str, experiment: str, *, required: bool, warn: Warn | None = None, doing: str = "training"):
    """One quick check (1 attempt, ``CHECK_TIMEOUT_S`` s) that the server answers; returns ``(client,
    experiment_id)`` or None after a warning (raises :class:`TrackingError` when ``required``). ``doing`` names
    what goes on without tracking (or, when required, what did not happen), for the message."""
    warn = warn or _default_warn
    MlflowClient = _mlflow()
    shown = safe_uri(uri)
    try:
        with _quiet_mlflow(), _http_env(CHECK_HTTP_ENV, override=True):
            client = MlflowClient(tracking_uri=uri)
            exp = client.get_experiment_by_name(experiment)
        with _quiet_mlflow(), _http_env(RUN_HTTP_ENV):
            exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    except Exception as e:  # noqa: BLE001 - any failure of the tracking backend
        msg = f"MLflow tracking server {shown} cannot be used ({_why(e)})"
        if required:
            raise TrackingError(f"{msg}; track.required is set, so no {doing} was done") from None
        warn(f"{msg}; the {doing} goes on without tracking")
        return None
    return client, exp_id


# --- the run ----------------------------------------------------------------------------------------------------

class Tracker:
    """One MLflow run. After :meth:`start` every call is best-effort: the first failure is one warning and tracking
    stops; nothing here can fail the run it records."""

    #: parent run id for runs started inside :func:`parent_run` (``bench --track``)
    _parent: "Tracker | None" = None

    def __init__(self, client, run_id: str, experiment_id: str, uri: str, warn: Warn):
        self.client, self.run_id, self.experiment_id, self.uri = client, run_id, experiment_id, uri
        self.warn = warn
        self.failed = False
        self.finished = False
        atexit.register(self._abandoned)

    # -- lifecycle
    @classmethod
    def start(cls, *, experiment: str = "medsight", required: bool = False, run_name: str | None = None,
              params: dict[str, str] | None = None, tags: dict[str, str] | None = None,
              parent_run_id: str | None = None, experiment_id: str | None = None,
              warn: Warn | None = None, doing: str = "training") -> "Tracker | None":
        """Connect, create the run and log params and tags. None (after a warning) when the server cannot be used,
        unless ``required``."""
        warn = warn or _default_warn
        _mlflow()
        uri = tracking_uri()
        conn = connect(uri, experiment, required=required, warn=warn, doing=doing)
        if conn is None:
            return None
        client, exp_id = conn
        parent = parent_run_id or (cls._parent.run_id if cls._parent is not None and not cls._parent.failed else None)
        all_tags = {"medsight.version": _version(), **(tags or {})}
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        try:
            with _quiet_mlflow(), _http_env(RUN_HTTP_ENV):
                run = client.create_run(experiment_id or exp_id, run_name=run_name, tags=all_tags)
        except Exception as e:  # noqa: BLE001
            msg = f"MLflow run cannot be created on {safe_uri(uri)} ({_why(e)})"
            if required:
                raise TrackingError(msg) from None
            warn(f"{msg}; the {doing} goes on without tracking")
            return None
        t = cls(client, run.info.run_id, run.info.experiment_id, uri, warn)
        if params:
            t.log_params(params)
        return t

    def _call(self, what: str, fn, *args, **kw) -> bool:
        if self.failed:
            return False
        try:
            with _quiet_mlflow(), _http_env(RUN_HTTP_ENV):
                fn(*args, **kw)
            return True
        except Exception as e:  # noqa: BLE001 - tracking must never fail the run
            self.failed = True
            self.warn(f"MLflow tracking stopped: cannot {what} on {safe_uri(self.uri)} "
                      f"({_why(e)}); the run goes on and its bundle is unaffected")
            return False

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run ended; tried even after a failure (else the server shows it RUNNING forever)."""
        if self.finished:
            return
        self.finished = True
        if self.failed:
            with contextlib.suppress(Exception), _quiet_mlflow(), _http_env(RUN_HTTP_ENV):
                self.client.set_terminated(self.run_id, status)
        else:
            self._call("end the run", self.client.set_terminated, self.run_id, status)

    def _abandoned(self) -> None:  # the process is exiting before end(): the command failed or was interrupted
        self.end("FAILED")

    # -- logging
    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's log_batch takes at most 100 params per call
            self._call("log params", self.client.log_batch, self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, v, ts, step) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self._call("log metrics", self.client.log_batch, self.run_id, metrics=items[i:i + 1000])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._call("set tags", self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_file(self, path: Path, artifact_path: str | None = None) -> None:
        self._call(f"upload {path.name}", self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_bundle(self, bundle_dir: Path, artifact_path: str = "bundle") -> None:
        """The bundle folder's files (not ``checkpoints/``) under ``artifact_path``."""
        for p in sorted(Path(bundle_dir).iterdir()):
            if p.name in _SKIP_IN_BUNDLE or p.name.startswith("."):
                continue
            if p.is_dir():
                self._call(f"upload {p.name}/", self.client.log_artifacts, self.run_id, str(p),
                           f"{artifact_path}/{p.name}")
            else:
                self.log_file(p, artifact_path)

    def log_model(self, bundle_dir: Path, artifact_path: str = "model") -> None:
        """The bundle as an MLflow pyfunc model (:func:`save_pyfunc`)."""
        if self.failed:
            return
        with tempfile.TemporaryDirectory() as tmp:
            try:
                with _quiet_mlflow():
                    local = save_pyfunc(bundle_dir, Path(tmp) / artifact_path)
            except Exception as e:  # noqa: BLE001
                self.warn(f"the bundle cannot be saved as an MLflow model ({_why(e)})")
                return
            self._call("upload the MLflow model", self.client.log_artifacts, self.run_id, str(local), artifact_path)

    def epoch_callback(self, then: Callable[[str, dict], None] | None = None) -> Callable[[str, dict], None]:
        """A trainer callback that logs each ``"epoch"`` event (step = epoch number) and passes every event on."""

        def cb(event: str, info: dict) -> None:
            if event == "epoch":
                self.log_metrics(epoch_metrics(info), step=int(info["epoch"]))
            if then is not None:
                then(event, info)

        return cb

    def write_side_file(self, bundle_dir: Path, **extra) -> None:
        from medsight.utils import write_json

        write_json(Path(bundle_dir) / TRACKING_FILE, {"run_id": self.run_id, "experiment_id": self.experiment_id,
                                                      "tracking_uri": safe_uri(self.uri), **extra})


# --- the bundle as an MLflow pyfunc model ----------------------------------------------------------------------
# The model is saved as code (MLflow's "models from code"): a two-line script naming the loader class by its module
# path. The loader (medsight.mlflow_model.MedsightModel) builds a Predictor when MLflow loads the model; saving it
# needs none of that, so it lives here and training does not import the serving stack.
PYFUNC_LOADER = "medsight.mlflow_model"
PYFUNC_BUNDLE_KEY = "bundle"  # the pyfunc artefact that holds the bundle folder
MODEL_CODE = ('"""medsight bundle as an MLflow pyfunc model (see medsight.mlflow_model)."""\n'
              f"import mlflow.models\n\nfrom {PYFUNC_LOADER} import MedsightModel\n\n"
              "mlflow.models.set_model(MedsightModel())\n")


def pyfunc_signature():
    """Input columns (all optional; see :mod:`medsight.mlflow_model`). Outputs are not enforced by MLflow, so not
    declared."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", "path", required=False),
                                         ColSpec("string", "image_b64", required=False),
                                         ColSpec("string", "name", required=False)]))


def save_pyfunc(bundle_dir: str | Path, path: str | Path) -> Path:
    """Write the bundle as an MLflow pyfunc model folder at ``path`` (the bundle copied in as an artefact, without
    ``checkpoints/``). The model is saved as code (a two-line script that imports
    ``medsight.mlflow_model.MedsightModel`` when the model is loaded), not as a pickle; requirements are given, not
    inferred (inference would load the model in a subprocess)."""
    import shutil

    import mlflow.pyfunc

    from medsight.bundle import load_bundle

    b = load_bundle(bundle_dir)  # refuses a folder that is not a bundle, with its one-line error
    version = _version()
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "bundle"
        shutil.copytree(b.path, copy, ignore=shutil.ignore_patterns("checkpoints", TRACKING_FILE, ".*"))
        code = Path(tmp) / "medsight_model.py"
        code.write_text(MODEL_CODE)
        mlflow.pyfunc.save_model(
            str(path), python_model=str(code), artifacts={PYFUNC_BUNDLE_KEY: str(copy)},
            signature=pyfunc_signature(), pip_requirements=[f"medsight=={version}", "mlflow>=3,<4"],
            metadata={"medsight_version": version, "task": b.task.name, "classes": b.classes})
    return Path(path)


def _version() -> str:
    from medsight import __version__

    return __version__


def read_side_file(bundle_dir: Path) -> dict | None:
    p = Path(bundle_dir) / TRACKING_FILE
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return d if isinstance(d, dict) and isinstance(d.get("run_id"), str) else None


@contextlib.contextmanager
def parent_run(name: str, *, experiment: str = "medsight", required: bool = False, params: dict | None = None,
               tags: dict | None = None, warn: Warn | None = None) -> Iterator["Tracker | None"]:
    """A parent run; training runs started inside (``start_training``) become its children and are tracked even
    when their config does not ask for it (``bench --track``)."""
    t = Tracker.start(experiment=experiment, required=required, run_name=name,
                      params={k: str(v) for k, v in (params or {}).items()}, tags=tags, warn=warn, doing="benchmark")
    prev, Tracker._parent = Tracker._parent, t
    status = "FAILED"
    try:
        yield t
        status = "FINISHED"
    finally:
        Tracker._parent = prev
        if t is not None:
            t.end(status)


# --- the pipeline's hooks ---------------------------------------------------------------------------------------

def start_training(cfg, data, out_dir: str | Path, *, warn: Warn | None = None) -> Tracker | None:
    """Hook 1 (config resolved, data loaded, nothing trained): the run with params and tags, or None when tracking
    is off or the server cannot be used (raises :class:`TrackingError` when required). The new bundle replaces
    ``out_dir`` whole when it is published, so an older ``tracking.json`` never outlives its bundle."""
    parent = Tracker._parent
    if not cfg.track.enabled and parent is None:
        return None
    t = Tracker.start(
        experiment=cfg.track.experiment, required=cfg.track.required, run_name=Path(out_dir).name or None,
        params=flat_params(cfg.model_dump(mode="json")),
        tags={"medsight.dataset": data.name, "medsight.model": cfg.model.name, "medsight.task": data.task,
              "medsight.data_hash": data_hash(data), "medsight.bundle": str(Path(out_dir).resolve())},
        experiment_id=parent.experiment_id if parent is not None and not parent.failed else None, warn=warn)
    return t


def finish_training(tracker: Tracker | None, out_dir: str | Path, metrics: dict, *, log_model: bool = True) -> None:
    """Hook 3 (bundle written): ``tracking.json``, final metrics with CIs, the bundle and the model; end the run."""
    if tracker is None:
        return
    out = Path(out_dir)
    if not (out / TRACKING_FILE).is_file():  # the pipeline writes it into the bundle before publishing
        try:
            tracker.write_side_file(out)
        except OSError as e:
            tracker.warn(f"cannot write {out / TRACKING_FILE}: {e.strerror}")
    tracker.log_metrics(final_metrics(metrics))
    tracker.log_bundle(out)
    if (out / "report.html").is_file():
        tracker.log_file(out / "report.html")
    if log_model:
        tracker.log_model(out)
    tracker.end("FINISHED")


def track_evaluation(bundle_dir: str | Path, metrics: dict, *, splits, data_name: str, params: dict | None = None,
                     report: Path | None = None, experiment: str = "medsight", required: bool = False,
                     warn: Warn | None = None) -> Tracker | None:
    """``evaluate --track``: a child run of the bundle's training run (``tracking.json``), or a standalone run when
    the bundle was trained without tracking or that run is not on this server. Logs the evaluated splits' metrics
    with CIs and the report."""
    warn = warn or _default_warn
    side = read_side_file(Path(bundle_dir))
    parent_id = exp_id = None
    if side is not None:
        MlflowClient = _mlflow()
        try:
            with _quiet_mlflow(), _http_env(CHECK_HTTP_ENV, override=True):
                run = MlflowClient(tracking_uri=tracking_uri()).get_run(side["run_id"])
            parent_id, exp_id = run.info.run_id, run.info.experiment_id
        except Exception:  # noqa: BLE001 - unknown here, or server down (Tracker.start says which)
            warn(f"training run {side['run_id']} of {bundle_dir} is not on {safe_uri(tracking_uri())}; "
                 "logging a standalone evaluation run")
    t = Tracker.start(experiment=experiment, required=required, run_name=f"evaluate {Path(bundle_dir).name}",
                      params={k: str(v) for k, v in (params or {}).items()},
                      tags={"medsight.dataset": data_name, "medsight.bundle": str(Path(bundle_dir).resolve()),
                            "medsight.command": "evaluate"},
                      parent_run_id=parent_id, experiment_id=exp_id, warn=warn, doing="evaluation")
    if t is None:
        return None
    t.log_metrics(final_metrics({s: metrics[s] for s in splits if s in metrics}))
    if report is not None and Path(report).is_file():
        t.log_file(Path(report))
    t.end("FINISHED")
    return t
