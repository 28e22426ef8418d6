"""The first hour of a new user (issue 25): each friction found by following the README has a test here.

Help without type markers and with every option described, printed once; `train` without --data refused; Ctrl-C
during training says where the partial run is and how to resume; one exit code convention (2: bad input before any
work, 1: per-file refusals); medsight's own message for a text file named .npz; `qc --json` lists every finding;
plurals; `deid` quiet and specific; early stopping by default; the summary names the settings that ran; the demo
finds its data before it installs; install.sh prints a line per step; the report's OOD section, case names,
reliability bins and glossary."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from medsight.cli import main
from tests.conftest import REPO, make_npz


def _run(capsys, *argv):
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_exit_2(rc, err, *needles):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """A bundle trained for one epoch on a synthetic 16 px set (seconds), evaluated once (report.html)."""
    d = tmp_path_factory.mktemp("tiny")
    npz = make_npz(d / "tiny.npz", n=(48, 40, 40))
    out = d / "run"
    assert main(["-q", "train", "--data", str(npz), "--epochs", "1", "--batch-size", "16", "--no-auto",
                 "--out", str(out)]) == 0
    assert main(["-q", "evaluate", str(out), "--data", str(npz), "--split", "test", "--n-boot", "0"]) == 0
    return out, npz


# ------------------------------------------------------------------------------------------------ help

COMMANDS = [[], ["train"], ["evaluate"], ["predict"], ["explain"], ["qc"], ["deid"], ["serve"], ["export"],
            ["datasets"], ["models"], ["bench", "medmnist"], ["cache", "ls"], ["cache", "clear"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "top")
def test_help_has_no_type_markers(command, capsys):
    rc, out, _ = _run(capsys, *command, "--help")
    assert rc == 0 and "Usage" in out
    for marker in ("<bool>", "<str>", "<int>", "<path>", "<float>", "<list[", "{bundle}", "{inputs}", "{data}"):
        assert marker not in out, (marker, out)


def test_every_option_and_argument_is_described():
    import typer

    from medsight.cli import app

    missing = []

    def walk(cmd, path):
        for p in cmd.params:
            if not (getattr(p, "help", None) or "").strip():
                missing.append(f"{path} {p.name}")
        for name, sub in (getattr(cmd, "commands", None) or {}).items():
            walk(sub, f"{path} {name}")

    walk(typer.main.get_command(app), "medsight")
    assert missing == []


def test_train_help_shows_defaults_and_the_early_stopping_ceiling(capsys):
    rc, out, _ = _run(capsys, "train", "--help")
    text = " ".join(out.split())
    assert "[default: runs/run]" in text and "early stopping" in text


def test_no_arguments_prints_the_help_once(capsys):
    rc, out, err = _run(capsys)
    assert rc == 2 and out.count("Usage:") == 1 and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ refusals

def test_train_without_data_is_a_usage_error_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, out, err = _run(capsys, "train")
    _one_line_exit_2(rc, err, "--data", "medsight train --help")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["predict", "explain"])
def test_missing_input_exits_2_before_any_work(command, tmp_path, capsys):
    rc, out, err = _run(capsys, command, str(tmp_path / "no_bundle"), str(tmp_path / "missing.png"))
    _one_line_exit_2(rc, err, "input not found", "missing.png")


@pytest.mark.parametrize("command", ["train", "qc"])
def test_text_file_named_npz_gets_medsights_own_message(command, tmp_path, capsys):
    fake = tmp_path / "notes.npz"
    fake.write_text("these are my notes, not arrays\n")
    argv = ["train", "--data", str(fake), "--out", str(tmp_path / "o")] if command == "train" else ["qc", str(fake)]
    rc, out, err = _run(capsys, *argv)
    _one_line_exit_2(rc, err, "is not an .npz archive", "text")
    assert "allow_pickle" not in err and "unsafely" not in err


def test_qc_json_lists_every_unreadable_file(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(root / c / f"ok{i}.png")
    for i in range(26):  # more than the table's 20 examples
        (root / "a" / f"broken{i}.png").write_bytes(b"not a png")
    rc, out, err = _run(capsys, "qc", str(root), "--json", str(tmp_path / "qc.json"))
    assert rc == 1
    report = json.loads((tmp_path / "qc.json").read_text())
    assert report["n_unreadable"] == 26 and len(report["unreadable"]) == 26


def test_plurals(tiny_bundle, tmp_path, capsys):
    from PIL import Image

    from medsight.cli import _plural

    assert [_plural(1, "prediction"), _plural(2, "prediction"), _plural(1, "entry", "entries"),
            _plural(0, "entry", "entries")] == ["1 prediction", "2 predictions", "1 entry", "0 entries"]
    png = tmp_path / "one.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(png)
    rc, out, err = _run(capsys, "predict", str(tiny_bundle[0]), str(png))
    assert rc == 0 and "1 prediction, no errors" in " ".join(out.split())
    rc, out, err = _run(capsys, "cache", "clear", "--dir", str(tmp_path / "cache"))
    assert rc == 0 and "removed 0 entries" in out


def test_deid_quiet_shows_no_pydicom_warnings_and_failures_say_why(tmp_path, capsys):
    from pydicom.data import get_testdata_file

    src = tmp_path / "in"
    src.mkdir()
    for name in ("rtdose.dcm", "no_meta.dcm"):  # rtdose: non-standard values pydicom warns about (with the value)
        shutil.copy(get_testdata_file(name), src / name)
    rc, out, err = _run(capsys, "-q", "deid", str(src), str(tmp_path / "out"))
    assert err == "", err  # no raw 'UserWarning: Invalid value for VR ...' lines
    text = " ".join(out.split())
    assert rc == 1 and "de-identified 1 file into" in text and "1 error)" in text
    assert "no_meta.dcm: cannot write its output (AttributeError:" in text
    assert "Media Storage SOP Class UID" in text


# ------------------------------------------------------------------------------------------------ training

def test_ctrl_c_during_training_says_where_the_run_is_and_resume_finishes_it(tmp_path, monkeypatch, capsys):
    import medsight.train as T

    npz = make_npz(tmp_path / "t.npz")
    out = tmp_path / "run"
    real = T.train_one_epoch

    def interrupted(*a, epoch, **kw):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(*a, epoch=epoch, **kw)

    monkeypatch.setattr(T, "train_one_epoch", interrupted)
    rc, _, err = _run(capsys, "train", "--data", str(npz), "--epochs", "3", "--batch-size", "8", "--no-auto",
                      "--no-progress", "--out", str(out))
    text = " ".join(err.split())
    assert rc == 130
    assert f"the unfinished run is in {tmp_path / '.run.partial'}" in text
    assert f"medsight train --out {out} --resume" in text and text.count("interrupted") == 1
    monkeypatch.setattr(T, "train_one_epoch", real)
    rc, out_text, err = _run(capsys, "train", "--out", str(out), "--resume", "--no-progress")
    assert rc == 0 and (out / "bundle.json").is_file()
    assert "resuming at epoch 2" in err


def test_early_stopping_is_on_by_default_and_stated(tmp_path, capsys):
    from medsight.config import RunConfig

    assert RunConfig().train.patience == 10
    # labels that carry no signal: validation never improves for long, so training stops well before 60 epochs
    rng = np.random.default_rng(1)
    npz = make_npz(tmp_path / "noise.npz", n=(32, 32, 16), shape=(12, 12),
                   val_labels=rng.integers(0, 2, (32, 1)).astype(np.uint8))
    rc, out, err = _run(capsys, "train", "--data", str(npz), "--epochs", "60", "--batch-size", "16", "--no-auto",
                        "--no-progress", "--set", "train.patience=3", "--out", str(tmp_path / "run"))
    assert rc == 0
    text = " ".join(err.split())
    assert "training stops after 3 epochs in a row without a gain of more than 0.001 in validation ROC AUC" in text
    m = re.search(r"stopped early at epoch (\d+) of at most 60", text)
    assert m and int(m.group(1)) < 60, text
    meta = json.loads((tmp_path / "run" / "bundle.json").read_text())
    assert any("stopped early at epoch" in line for line in meta["training_summary"])
    rows = (tmp_path / "run" / "history.csv").read_text().strip().splitlines()
    assert len(rows) - 1 == int(m.group(1))


def _demo_train_argv() -> list[str]:
    line = next(ln for ln in (REPO / "scripts" / "demo.sh").read_text().splitlines()
                if ln.strip().startswith("medsight train"))
    argv = line.split()[1:]
    return [a for a in argv if a != '"$@"']


@pytest.mark.realdata
def test_demo_training_summary_names_exactly_the_settings_in_its_config(medmnist_dir, tmp_path, capsys):
    """The demo's own train command (from scripts/demo.sh), with a tiny epoch count: every setting the summary names
    is the one in config.yaml, flags are named as such, and the automatic recipe lists only what it applied."""
    argv = _demo_train_argv()
    assert argv[:3] == ["train", "--data", "breastmnist"]
    i = argv.index("--epochs")
    argv[i + 1] = "1"
    j = argv.index("--out")
    argv[j + 1] = str(tmp_path / "breast")
    rc, out, err = _run(capsys, *argv, "--no-progress")
    assert rc == 0, err
    cfg = yaml.safe_load((tmp_path / "breast" / "config.yaml").read_text())
    text = " ".join(err.split())
    m, t = cfg["model"], cfg["train"]
    assert (f"model: {m['name']} (from --model), width {m['width']:g}, dropout {m['dropout']:g}; at most "
            f"{t['epochs']} epoch (from --epochs) of batch {t['batch_size']} (from the automatic recipe), "
            f"{t['optimizer']} learning rate {t['lr']:g} (from the automatic recipe)") in text
    assert f"augmentation {'on' if cfg['augment']['enabled'] else 'off'} (from the automatic recipe)" in text
    auto_lines = [ln for ln in json.loads((tmp_path / "breast" / "bundle.json").read_text())["auto_recipe"]["reasons"]]
    joined = " ".join(auto_lines)
    # the rule did not choose the model, its dropout or the epochs: it says so instead of describing cnn6 x 100
    assert "cnn6" not in joined and "dropout 0.3" not in joined and "100 epochs" not in joined
    assert "model.name = simple_cnn (from --model)" in joined and "train.epochs = 1 (from --epochs)" in joined
    meta = json.loads((tmp_path / "breast" / "bundle.json").read_text())
    assert meta["auto_recipe"]["given"]["train.epochs"] == "--epochs"
    assert set(meta["auto_recipe"]["applied"]).isdisjoint(meta["auto_recipe"]["given"])
    for k, v in meta["auto_recipe"]["applied"].items():  # what it says it applied is what ran
        section, name = k.split(".")
        assert cfg[section][name] == v, k
    # the threshold: 3 significant digits, the rule in words, its interval over validation resamples
    thr = meta["threshold"]
    assert f"decision threshold {thr:.3g}, chosen on the validation split by Youden's J" in text
    assert "95% interval over 200 resamples of the validation cases" in text


def test_autorecipe_lines_list_only_what_it_applied():
    from medsight import autorecipe
    from medsight.config import load_config

    facts = autorecipe.DataFacts(spatial_dims=2, channels=1, n_train=420, task="binary", n_classes=2,
                                 stored_size=[28, 28])
    cfg = load_config(None, {"model.name": "simple_cnn", "train.epochs": 7, "auto": True},
                      labels={"model.name": "--model", "train.epochs": "--epochs"})
    recipe = autorecipe.choose(facts)
    applied = autorecipe.apply(cfg, recipe)
    text = " ".join(recipe.reasons)
    assert "train.epochs" not in applied and "model.dropout" not in applied and cfg.model.dropout == 0
    assert "cnn6" not in text and "dropout 0.3" not in text and "at most" not in text
    assert "train.batch_size = 64" in text and "kept as given" in text and "train.epochs = 7 (from --epochs)" in text
    assert "model.dropout = 0 (from model simple_cnn's own default)" in text
    full = autorecipe.choose(facts)
    autorecipe.apply(load_config(None, {"auto": True}), full)  # nothing given: the rule's own sentences
    assert any("cnn6 x1" in ln for ln in full.reasons) and not any("kept as given" in ln for ln in full.reasons)


# ------------------------------------------------------------------------------------------------ scripts

def _copy_scripts(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in ("demo.sh", "install.sh"):
        shutil.copy(REPO / "scripts" / name, repo / "scripts" / name)
    return repo


def test_demo_says_where_its_data_is_before_installing(tmp_path):
    repo = _copy_scripts(tmp_path)
    (repo / "scripts" / "install.sh").write_text("echo INSTALLING; exit 3\n")  # stop right there
    shared = tmp_path / "shared" / "data" / "medmnist"
    shared.mkdir(parents=True)
    (shared / "breastmnist.npz").write_bytes(b"")  # only its presence is looked at
    env = {k: v for k, v in os.environ.items() if k != "MEDSIGHT_DATA_DIR"}
    res = subprocess.run(["bash", str(repo / "scripts" / "demo.sh")], capture_output=True, text=True, env=env,
                         timeout=60)
    assert res.returncode == 3 and "INSTALLING" in res.stdout
    before = res.stdout.split("INSTALLING")[0]
    assert f"BreastMNIST from {shared.resolve()}/breastmnist.npz" in before
    shutil.rmtree(tmp_path / "shared")
    env["HOME"] = str(tmp_path / "home")
    res = subprocess.run(["bash", str(repo / "scripts" / "demo.sh")], capture_output=True, text=True, env=env,
                         timeout=60)
    before = res.stdout.split("INSTALLING")[0]
    assert "breastmnist.npz is missing" in before and "needs network" in " ".join(before.split())
    assert "MEDSIGHT_DATA_DIR" in before


def test_install_prints_a_line_per_step(tmp_path):
    """install.sh with stand-ins for python3 and pip (nothing is installed): every step announces itself."""
    repo = _copy_scripts(tmp_path)
    fake = tmp_path / "bin"
    fake.mkdir()
    log = tmp_path / "calls.log"
    (fake / "python3").write_text(f'#!/bin/sh\nmkdir -p .venv/bin\necho \'export PATH="{fake}:$PATH"\' > '
                                  f".venv/bin/activate\necho \"python3 $*\" >> {log}\n")
    (fake / "python").write_text(f'#!/bin/sh\necho "python $*" >> {log}\n')
    for f in fake.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    res = subprocess.run(["bash", str(repo / "scripts" / "install.sh")], capture_output=True, text=True, env=env,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    steps = [ln for ln in res.stdout.splitlines() if ln.startswith("install: [")]
    assert [s[:14] for s in steps] == [f"install: [{i}/4]" for i in range(1, 5)]
    assert "PyTorch" in steps[2] and "done in" in res.stdout.splitlines()[-1]
    calls = log.read_text().splitlines()
    assert calls[0].startswith("python3 -m venv") and any("torch==2.13.0" in c for c in calls)


# ------------------------------------------------------------------------------------------------ the report

def test_report_runs_the_bundles_ood_detector_and_names_cases(tiny_bundle):
    out, _ = tiny_bundle
    assert (out / "ood.npz").is_file()
    html = (out / "report.html").read_text()
    assert "the bundle has no detector" not in html and "Not available" not in html
    assert re.search(r"test: \d+ case\(s\) flagged of 40", html)
    assert "test #" not in html and "test-" in html  # cases by id, as in cases_test.csv


def test_report_names_cases_by_file_or_id(tmp_path):
    from types import SimpleNamespace

    from medsight.evaluate import case_name

    data = SimpleNamespace(split=lambda s: SimpleNamespace(ids=["normal/IM-0001.png", "test-1"]))
    assert case_name(data, "test", 0) == "normal/IM-0001.png"
    assert case_name(data, "test", 1).startswith("test-1 (image 1 of the test split")
    assert case_name(SimpleNamespace(split=lambda s: SimpleNamespace(ids=None)), "val", 3).startswith("val-3")


def test_report_says_why_ood_is_missing(tmp_path):
    from types import SimpleNamespace

    from medsight.evaluate import bundle_ood_flags
    from medsight.report import _ood_section

    reason = bundle_ood_flags(SimpleNamespace(path=tmp_path, meta={}), None, ("test",))  # no ood.npz there
    assert isinstance(reason, str) and "no out-of-distribution detector" in reason
    assert f"Not available: {reason}" in _ood_section(reason)


def test_reliability_bins_hold_enough_cases():
    from medsight import metrics as M

    rng = np.random.default_rng(0)
    p = rng.random(90)
    y = (rng.random(90) < p).astype(int)
    rc = M.reliability_curve_equal_count("binary", y, p)
    assert sum(rc["count"]) == 90 and min(rc["count"]) >= M.MIN_BIN_CASES and len(rc["count"]) == 3
    assert rc["binning"] == "equal-count" and np.all(np.diff(rc["confidence"]) > 0)
    big = M.reliability_curve_equal_count("binary", (rng.random(1000) < 0.3).astype(int), rng.random(1000))
    assert len(big["count"]) == 10 and min(big["count"]) == 100


def test_report_glossary_explains_every_term(tiny_bundle):
    html = (tiny_bundle[0] / "report.html").read_text()
    assert 'id="glossary"' in html
    glossary = html.split('id="glossary"')[1]
    for term in ("ROC AUC", "PPV / NPV", "Youden&#x27;s J", "ECE", "Temperature", "bootstrap", "OOD",
                 "CPU budget", "Grad-CAM", "patience", "Reliability diagram"):
        assert term in glossary, term
    assert f"at least {25} cases" in html  # the reliability note states the minimum bin size


@pytest.mark.slow
def test_small_folder_with_the_automatic_recipe_stops_when_validation_stops_improving(tmp_path, capsys):
    """420 images at 28 px (the issue's folder): the rule's 100-epoch ceiling stays, but training stops once the
    validation AUC has not gained for the patience (an easy task: it reaches its best within a few epochs)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("normal", "finding"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(210):
            a = rng.integers(0, 80, (28, 28)).astype(np.uint8)
            if c == "finding":
                a[8:20, 8:20] += 120
            Image.fromarray(a).save(tmp_path / "data" / c / f"{c}{i}.png")
    rc, out, err = _run(capsys, "train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                        "--no-progress", "--set", "train.threads=1")
    assert rc == 0, err
    text = " ".join(err.split())
    assert "at most 100 epochs" in text  # the step budget is the ceiling ...
    m = re.search(r"stopped early at epoch (\d+) of at most 100", text)
    assert m and int(m.group(1)) <= 40, text  # ... and validation ends it


def test_report_states_the_threshold_placement_interval_and_warning(tiny_bundle):
    out, _ = tiny_bundle
    meta = json.loads((out / "bundle.json").read_text())
    html = (out / "report.html").read_text()
    d = meta["threshold_detail"]
    assert d["rule"] == "youden" and d["optimal_range"][0] < meta["threshold"] <= d["optimal_range"][1]
    assert f"threshold {meta['threshold']:.3g}, chosen on the validation split by Youden" in html
    assert "placed at the midpoint, on the logit scale" in html and "95% interval over 200 resamples" in html
    # 40 validation cases, about 20 of each class: too few to place a threshold well, and the report says so
    assert "threshold: the validation split has only" in html
