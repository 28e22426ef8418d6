"""MLflow tracking (medsight.tracking, medsight.mlflow_model) against a REAL `mlflow server` (sqlite backend,
proxied artefacts) started for the session: no mocks of MLflow. mlflow is imported at module level on purpose:
without it (pip install -e '.[dev]' installs it) these tests error, they never skip."""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow  # noqa: F401 - missing mlflow must fail the run, not skip it
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from medsight import tracking
from medsight.cli import main
from tests import _subproc
from tests.conftest import make_npz

VENV_BIN = str(Path(sys.executable).parent)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            pytest.fail(f"{url}: process exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout}s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def _started(cmd: list[str], url: str, log: Path, timeout: float, env: dict | None = None):
    """A server process in its own process group (it forks workers), stopped with its whole group."""
    env = {**(env or os.environ), "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", "")}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_http(url, proc, log, timeout)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{root / 'x.db'}", "--serve-artifacts",
           "--artifacts-destination", str(root / "art"), "--workers", "1"]
    uri = f"http://127.0.0.1:{port}"
    # no background job runner (7 huey consumers, for GenAI jobs medsight does not use): a faster start and stop
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with _started(cmd, f"{uri}/health", root / "server.log", timeout=120, env=env):
        yield uri


@pytest.fixture
def tracking_env(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return mlflow_server


@pytest.fixture(scope="module")
def tracked(mlflow_server, tmp_path_factory) -> dict:
    """`medsight train --track` (tiny npz, simple_cnn, 2 epochs) logged to the session's server."""
    root = tmp_path_factory.mktemp("tracked")
    npz = make_npz(root / "tiny.npz")
    out = root / "bundle"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        rc = main(["train", "--data", str(npz), "--model", "simple_cnn", "--epochs", "2", "--out", str(out),
                   "--no-progress", "--no-auto", "--track", "--set", "train.n_boot=50", "--set", "track.experiment=t-train"])
    assert rc == 0
    side = json.loads((out / "tracking.json").read_text())
    return {"npz": npz, "bundle": out, "run_id": side["run_id"], "side": side, "root": root,
            "client": MlflowClient(tracking_uri=mlflow_server), "uri": mlflow_server}


def _artifacts(client, run_id, path=None) -> dict[str, int | None]:
    out = {}
    for f in client.list_artifacts(run_id, path):
        if f.is_dir:
            out.update(_artifacts(client, run_id, f.path))
        else:
            out[f.path] = f.file_size
    return out


# --- the training run on the server ---------------------------------------------------------------------------

def test_train_track_logs_params_tags_and_side_file(tracked):
    from medsight.data.sources import load_dataset

    run = tracked["client"].get_run(tracked["run_id"])
    assert run.info.status == "FINISHED"
    assert tracked["client"].get_experiment(run.info.experiment_id).name == "t-train"
    p = run.data.params
    assert p["model.name"] == "simple_cnn" and p["train.epochs"] == "2" and p["train.n_boot"] == "50"
    assert p["data.name"] == str(tracked["npz"]) and p["track.enabled"] == "true" and p["augment.flip"] == "[1]"
    t = run.data.tags
    assert t["medsight.dataset"] == "tiny" and t["medsight.model"] == "simple_cnn" and t["medsight.task"] == "binary"
    assert t["medsight.version"] == __import__("medsight").__version__
    assert t["medsight.data_hash"] == tracking.data_hash(load_dataset(str(tracked["npz"])))
    assert t["mlflow.runName"] == "bundle"
    assert tracked["side"] == {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                               "tracking_uri": tracked["uri"]}


def test_train_track_logs_epoch_curves_equal_to_history(tracked):
    import csv

    client, rid = tracked["client"], tracked["run_id"]
    rows = list(csv.DictReader(open(tracked["bundle"] / "history.csv")))
    assert len(rows) == 2
    for key in ("train_loss", "val_loss", "val_auc", "val_accuracy", "lr", "seconds"):
        hist = sorted((m.step, m.value) for m in client.get_metric_history(rid, key))
        assert [s for s, _ in hist] == [1, 2], key
        assert [v for _, v in hist] == pytest.approx([float(r[key]) for r in rows], rel=1e-9, abs=1e-12), key


def test_train_track_logs_final_metrics_with_cis(tracked):
    run = tracked["client"].get_run(tracked["run_id"])
    m = run.data.metrics
    saved = json.loads((tracked["bundle"] / "metrics.json").read_text())
    auc = saved["test"]["auc"]
    assert m["test_auc"] == pytest.approx(auc["value"])
    assert (m["test_auc_ci_low"], m["test_auc_ci_high"]) == pytest.approx(tuple(auc["ci"]))
    assert m["test_auc_ci_low"] <= m["test_auc"] <= m["test_auc_ci_high"]
    assert m["final_val_accuracy"] == pytest.approx(saved["val"]["accuracy"]["value"])
    # every finite value of metrics.json is there, nothing else under test_/final_val_
    expected = tracking.final_metrics(saved)
    assert {k: v for k, v in m.items() if k.startswith(("test_", "final_val_"))} == pytest.approx(expected)


def test_train_track_uploads_bundle_and_model(tracked, tmp_path):
    client, rid, bundle = tracked["client"], tracked["run_id"], tracked["bundle"]
    arts = _artifacts(client, rid)
    for name in ("bundle.json", "model.pt", "config.yaml", "history.csv", "metrics.json", "ood.npz"):
        assert arts[f"bundle/{name}"] == (bundle / name).stat().st_size, name
    assert not any("checkpoints" in a or a.endswith("tracking.json") for a in arts)
    assert "model/MLmodel" in arts and "model/artifacts/bundle/model.pt" in arts
    got = client.download_artifacts(rid, "bundle/model.pt", str(tmp_path))
    assert Path(got).read_bytes() == (bundle / "model.pt").read_bytes()


# --- the pyfunc model -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def test_pngs(tracked) -> list[Path]:
    from PIL import Image

    d = np.load(tracked["npz"])
    out = tracked["root"] / "png"
    out.mkdir(exist_ok=True)
    paths = []
    for i, img in enumerate(d["test_images"][:6]):
        p = out / f"t{i}.png"
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def cli_predictions(tracked, test_pngs) -> dict[str, dict]:
    """`medsight predict` on the same files: the reference answers."""
    out = tracked["root"] / "preds.json"
    assert main(["predict", str(tracked["bundle"]), *map(str, test_pngs), "--out", str(out)]) == 0
    return {Path(r["file"]).name: r for r in json.loads(out.read_text())}


def _check_against_cli(rows: list[dict], names: list[str], cli: dict[str, dict], classes=("0", "1")) -> None:
    assert len(rows) == len(names)
    for row, name in zip(rows, names):
        ref = cli[name]
        assert row["error"] is None, row
        for c in classes:
            assert row[f"p_{c}"] == pytest.approx(ref["probabilities"][c], abs=1e-6)
        decision = None if row["decision"] is None else int(row["decision"])  # None: OOD, no class verdict
        assert row["predicted"] == ref["predicted"] and decision == ref["decision"]
        assert row["ood_flag"] == ref["ood_flag"] and row["ood_score"] == pytest.approx(ref["ood_score"], rel=1e-5)
        assert row["review"] == ref["review"] and row["review_reasons"] == ref["review_reasons"]


def test_pyfunc_predictions_equal_medsight_predict(tracked, test_pngs, cli_predictions, tracking_env):
    import mlflow.pyfunc
    import pandas as pd

    model = mlflow.pyfunc.load_model(f"runs:/{tracked['run_id']}/model")
    b64 = [base64.b64encode(p.read_bytes()).decode() for p in test_pngs[3:]]
    df = pd.DataFrame({"path": [str(p) for p in test_pngs[:3]] + [None] * 3 + [str(tracked["root"] / "nope.png"), None],
                       "image_b64": [None] * 3 + b64 + [None, "not base64!"],
                       "name": [None] * 3 + [p.name for p in test_pngs[3:]] + [None, "bad.png"]})
    out = model.predict(df)
    rows = out.to_dict("records")
    names = [p.name for p in test_pngs]
    _check_against_cli(rows[:6], names, cli_predictions)
    assert [r["file"] for r in rows[:3]] == [str(p) for p in test_pngs[:3]]
    assert "nope.png" in rows[6]["error"] and "not found" in rows[6]["error"] and math.isnan(rows[6]["p_0"])
    assert rows[7]["error"] == "bad.png: image_b64 is not valid base64 (Non-base64 digit found)" or \
        rows[7]["error"].startswith("bad.png: image_b64 is not valid base64")
    with pytest.raises(Exception, match="'path' or an 'image_b64' column"):
        model.predict(pd.DataFrame({"file": ["x.png"]}))


def test_pyfunc_refuses_oversized_b64_before_decoding():
    from medsight.errors import DataError
    from medsight.mlflow_model import MAX_B64_CHARS, decode_b64

    with pytest.raises(DataError, match=f"limit is {MAX_B64_CHARS}"):
        decode_b64("A" * (MAX_B64_CHARS + 4), "big.png")
    assert decode_b64(base64.b64encode(b"\x89PNG").decode(), "x") == b"\x89PNG"


@pytest.mark.slow
def test_mlflow_models_serve_answers_like_medsight_predict(tracked, test_pngs, cli_predictions):
    """The real `mlflow models serve -m runs:/<id>/model --env-manager local` over HTTP."""
    port = _free_port()
    env = _subproc.env(MLFLOW_TRACKING_URI=tracked["uri"])
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{tracked['run_id']}/model",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    with _started(cmd, f"http://127.0.0.1:{port}/ping", tracked["root"] / "serve.log", timeout=180, env=env):
        payload = {"dataframe_split": {
            "columns": ["path", "image_b64"],
            "data": [[str(test_pngs[0]), None], [str(test_pngs[1]), None],
                     [None, base64.b64encode(test_pngs[2].read_bytes()).decode()]]}}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            rows = json.loads(r.read())["predictions"]
    assert rows[2]["file"] == "row 2"
    _check_against_cli(rows, [p.name for p in test_pngs[:3]], cli_predictions)


# --- evaluate and bench ---------------------------------------------------------------------------------------

def test_evaluate_track_logs_a_child_run(tracked, tracking_env):
    client, rid, bundle = tracked["client"], tracked["run_id"], tracked["bundle"]
    assert main(["evaluate", str(bundle), "--track", "--n-boot", "20"]) == 0
    parent = client.get_run(rid)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{rid}'")
    assert len(children) == 1
    child = children[0]
    saved = json.loads((bundle / "metrics.json").read_text())
    assert child.data.metrics["test_auc"] == pytest.approx(saved["test"]["auc"]["value"])
    assert child.data.metrics["test_auc_ci_low"] == pytest.approx(saved["test"]["auc"]["ci"][0])
    assert child.data.params["n_boot"] == "20" and child.data.tags["medsight.command"] == "evaluate"
    assert "report.html" in _artifacts(client, child.info.run_id)
    assert client.get_run(rid).info.status == "FINISHED"  # the training run itself is left as it was


def test_parent_run_makes_training_runs_children(tracking_env, tmp_path):
    """What `bench --track` does: every run_training inside parent_run() is a child, tracked without asking."""
    from medsight.config import load_config
    from medsight.pipeline import run_training

    npz = make_npz(tmp_path / "b.npz")
    with tracking.parent_run("bench test", experiment="t-bench", params={"seeds": "0,1"}) as parent:
        assert parent is not None
        for seed in (0, 1):
            cfg = load_config(None, {"data.name": str(npz), "model.name": "simple_cnn", "train.epochs": 1,
                                     "train.seed": seed, "train.n_boot": 0, "track.log_model": False})
            run_training(cfg, tmp_path / f"s{seed}", callback=None)
    client = MlflowClient(tracking_uri=tracking_env)
    kids = client.search_runs([parent.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}'")
    assert sorted(k.data.params["train.seed"] for k in kids) == ["0", "1"]
    assert all(k.info.status == "FINISHED" and "test_auc" in k.data.metrics for k in kids)
    assert client.get_run(parent.run_id).info.status == "FINISHED"


def test_bench_track_cli_logs_a_child_per_training_run(tracking_env, tmp_path, medmnist_dir):
    """`bench medmnist --quick --track` on the real BreastMNIST: the recipe's seed and the reference recipe."""
    assert main(["bench", "medmnist", "--datasets", "breastmnist", "--seeds", "0", "--quick", "--track",
                 "--out-dir", str(tmp_path), "--stem", "trackbench"]) == 0
    client = MlflowClient(tracking_uri=tracking_env)
    exp = client.get_experiment_by_name("medsight")
    parents = client.search_runs([exp.experiment_id], "attributes.run_name = 'bench trackbench'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.params["datasets"] == "breastmnist" and parents[0].data.params["quick"] == "True"
    kids = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert sorted(k.data.params["model.name"] for k in kids) == sorted(["resnet18", load_recipe_model("breastmnist")])
    result = json.loads((tmp_path / "trackbench.json").read_text())
    recipe_auc = result["rows"][0]["runs"][0]["test_auc"]
    assert recipe_auc in [pytest.approx(k.data.metrics["test_auc"]) for k in kids]
    assert all(k.data.tags["medsight.dataset"] == "breastmnist" for k in kids)


def load_recipe_model(name: str) -> str:
    from medsight.config import load_config

    return load_config(None, recipe=name).model.name


def test_evaluate_track_without_its_training_run_logs_a_standalone_run(tracked, tracking_env, tmp_path, capsys):
    import shutil

    bundle = tmp_path / "copy"
    shutil.copytree(tracked["bundle"], bundle)
    (bundle / "tracking.json").write_text(json.dumps({"run_id": "0" * 32}))
    assert main(["evaluate", str(bundle), "--track", "--n-boot", "0", "--no-report"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: training run {'0' * 32} of {bundle} is not on {tracking_env}; logging a standalone "
                   "evaluation run"], err
    client = MlflowClient(tracking_uri=tracking_env)
    runs = client.search_runs([client.get_experiment_by_name("medsight").experiment_id],
                              "attributes.run_name = 'evaluate copy'")
    assert len(runs) == 1 and "mlflow.parentRunId" not in runs[0].data.tags
    saved = json.loads((bundle / "metrics.json").read_text())
    assert runs[0].data.metrics["test_auc"] == pytest.approx(saved["test"]["auc"]["value"])
    assert "test_auc_ci_low" not in runs[0].data.metrics  # --n-boot 0: no CIs, none invented


# --- failure modes --------------------------------------------------------------------------------------------

def _dead_uri() -> str:
    return f"http://127.0.0.1:{_free_port()}"  # nothing listens there


def test_unreachable_server_warns_and_the_bundle_is_written(tmp_path):
    npz = make_npz(tmp_path / "tiny.npz")
    uri = _dead_uri()
    t0 = time.monotonic()
    res = subprocess.run(_subproc.medsight_cmd("train", "--data", str(npz), "--model", "simple_cnn", "--epochs", "1",
                                               "--out", str(tmp_path / "r"), "--no-progress", "--no-auto", "--track",
                                               "--set", "train.n_boot=0"),
                         capture_output=True, text=True, env=_subproc.env(MLFLOW_TRACKING_URI=uri), timeout=300)
    assert res.returncode == 0, res.stderr
    # (a threshold placed on the tiny set's 4 positive validation cases has its own warning, not about tracking)
    warn = [ln for ln in res.stderr.splitlines() if ln.startswith("warning:") and not ln.startswith("warning: threshold:")]
    assert warn == [f"warning: MLflow tracking server {uri} cannot be used (MlflowException: connection refused); "
                    "the training goes on without tracking"], res.stderr
    assert "Traceback" not in res.stderr and "Retrying" not in res.stderr
    assert (tmp_path / "r" / "model.pt").is_file() and (tmp_path / "r" / "metrics.json").is_file()
    assert not (tmp_path / "r" / "tracking.json").exists() and "tracked as" not in res.stdout
    assert time.monotonic() - t0 < 120


def test_required_unreachable_server_is_one_line_exit_2(tmp_path):
    npz = make_npz(tmp_path / "tiny.npz")
    uri = _dead_uri()
    res = subprocess.run(_subproc.medsight_cmd("train", "--data", str(npz), "--epochs", "1", "--out",
                                               str(tmp_path / "r"), "--track-required"),
                         capture_output=True, text=True, env=_subproc.env(MLFLOW_TRACKING_URI=uri), timeout=300)
    assert res.returncode == 2, res.stderr
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err == (f"error: MLflow tracking server {uri} cannot be used (MlflowException: connection refused); "
                   "track.required is set, so no training was done")
    assert not (tmp_path / "r").exists()


def test_required_from_config_file(tmp_path, monkeypatch, capsys):
    npz = make_npz(tmp_path / "tiny.npz")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{name: {npz}}}\ntrain: {{epochs: 1}}\ntrack: {{enabled: true, required: true}}\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _dead_uri())
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
    assert "track.required is set" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_silent_server_check_takes_seconds_not_minutes(monkeypatch):
    """A server that accepts connections but never answers: one attempt, CHECK_TIMEOUT_S, then a warning."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        warnings_seen = []
        t0 = time.monotonic()
        assert tracking.Tracker.start(experiment="x", warn=warnings_seen.append) is None
        took = time.monotonic() - t0
        assert warnings_seen == [f"MLflow tracking server {uri} cannot be used (MlflowException: read timed out); "
                                 "the training goes on without tracking"]
        assert took < tracking.CHECK_TIMEOUT_S + 3, took
        with pytest.raises(tracking.TrackingError, match="track.required is set"):
            tracking.Tracker.start(experiment="x", required=True)
    assert os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES") is None  # the check's settings are not left behind


def test_failure_mid_run_is_one_warning_and_tracking_stops(tracking_env):
    seen: list[str] = []
    t = tracking.Tracker.start(experiment="t-fail", run_name="mid", warn=seen.append)
    assert t is not None
    calls = []
    cb = t.epoch_callback(lambda e, i: calls.append(e))
    cb("epoch", {"epoch": 1, "train_loss": 0.5, "val_loss": 0.6, "improved": True})
    t.client = MlflowClient(tracking_uri=_dead_uri())  # the server goes away
    cb("epoch", {"epoch": 2, "train_loss": 0.4, "val_loss": 0.5})
    cb("epoch", {"epoch": 3, "train_loss": 0.3, "val_loss": 0.4})
    assert calls == ["epoch"] * 3  # the trainer's own callback still gets every event
    assert len(seen) == 1 and seen[0].startswith("MLflow tracking stopped: cannot log metrics") and t.failed
    live = MlflowClient(tracking_uri=tracking_env)
    hist = live.get_metric_history(t.run_id, "train_loss")
    assert [(m.step, m.value) for m in hist] == [(1, 0.5)]
    t.client = live  # the server is back: the run is still ended, so it does not stay RUNNING forever
    t.end()
    assert live.get_run(t.run_id).info.status == "FINISHED" and len(seen) == 1


# --- pure helpers ---------------------------------------------------------------------------------------------

def test_final_metrics_flattening():
    nan = float("nan")
    m = {"val": {"auc": {"value": 0.8, "ci": [0.7, 0.9]}},
         "test": {"auc": {"value": 0.75, "ci": [0.6, 0.85]}, "ppv": {"value": nan, "ci": [nan, nan]},
                  "f1": {"value": 0.5, "ci": [nan, nan]}, "confusion_matrix": {"value": [[1, 2], [3, 4]], "ci": None},
                  "per_class": {"lung opacity": {"recall": {"value": 0.4, "ci": [0.1, 0.6]}}}},
         "note": "not a split"}
    assert tracking.final_metrics(m) == {
        "final_val_auc": 0.8, "final_val_auc_ci_low": 0.7, "final_val_auc_ci_high": 0.9,
        "test_auc": 0.75, "test_auc_ci_low": 0.6, "test_auc_ci_high": 0.85, "test_f1": 0.5,
        "test_class_lung opacity_recall": 0.4, "test_class_lung opacity_recall_ci_low": 0.1,
        "test_class_lung opacity_recall_ci_high": 0.6}


def test_epoch_metrics_and_flat_params():
    info = {"epoch": 3, "train_loss": 0.2, "val_auc": 0.9, "lr": 1e-3, "seconds": 1.5, "improved": True,
            "best_epoch": 3, "val_ppv": float("nan")}
    assert tracking.epoch_metrics(info) == {"train_loss": 0.2, "val_auc": 0.9, "lr": 1e-3, "seconds": 1.5}
    assert tracking.flat_params({"a": {"b": 1, "c": [1, 2], "d": None, "e": "x"}, "f": True}) == \
        {"a.b": "1", "a.c": "[1, 2]", "a.d": "null", "a.e": "x", "f": "true"}


def test_safe_uri_drops_credentials():
    assert tracking.safe_uri("https://alice:s3cret@mlflow.example.org:8443/path?x=1") == \
        "https://mlflow.example.org:8443/path?x=1"
    assert tracking.safe_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert tracking.safe_uri("sqlite:///mlflow.db") == "sqlite:///mlflow.db"


def test_data_hash_follows_content(tmp_path):
    from medsight.data.sources import load_dataset

    a = load_dataset(str(make_npz(tmp_path / "a.npz")))
    assert tracking.data_hash(a) == tracking.data_hash(load_dataset(str(make_npz(tmp_path / "b.npz"))))
    imgs = np.load(tmp_path / "a.npz")["test_images"].copy()
    imgs[0, 0, 0] ^= 1
    c = load_dataset(str(make_npz(tmp_path / "c.npz", test_images=imgs)))
    assert tracking.data_hash(c) != tracking.data_hash(a) and len(tracking.data_hash(a)) == 16


def test_track_config_section():
    from medsight.config import load_config
    from medsight.errors import ConfigError

    cfg = load_config(None, {"track.enabled": True, "track.experiment": "e"})
    assert (cfg.track.enabled, cfg.track.experiment, cfg.track.required, cfg.track.log_model) == (True, "e", False, True)
    with pytest.raises(ConfigError, match="track.uri"):
        load_config(None, {"track.uri": "http://x"})  # the server comes from $MLFLOW_TRACKING_URI only


def test_tracking_off_touches_no_server(tmp_path, monkeypatch):
    from medsight.config import load_config
    from medsight.data.sources import load_dataset

    from medsight.pipeline import run_training

    monkeypatch.setenv("MLFLOW_TRACKING_URI", _dead_uri())
    cfg = load_config(None, {"data.name": str(make_npz(tmp_path / "t.npz")), "train.epochs": 1, "train.n_boot": 0})
    assert tracking.start_training(cfg, load_dataset(cfg.data.name), tmp_path / "b") is None
    out, _, _ = run_training(cfg, tmp_path / "b")
    (out / "tracking.json").write_text('{"run_id": "old"}')  # an older run's side file
    out, _, _ = run_training(cfg, out, overwrite=True)
    assert not (out / "tracking.json").exists()  # a side file never outlives the bundle it came with
