"""CLI behaviour: one-line errors with exit code 2 and no traceback; datasets and models listings."""

import subprocess
import sys


from medsight.cli import main
from tests.conftest import make_npz


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "medsight", *args], capture_output=True, text=True, env=env, timeout=300)


def _one_line_error(res, *needles):
    assert res.returncode == 2, res.stderr + res.stdout
    err = res.stderr.strip()
    assert "Traceback" not in err and "Traceback" not in res.stdout
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


def test_unknown_model(tmp_path, tiny_npz):
    res = run_cli("train", "--data", str(tiny_npz), "--model", "vgg99", "--epochs", "1", "--out", str(tmp_path / "r"))
    _one_line_error(res, "vgg99", "resnet18")


def test_unknown_dataset(tmp_path):
    res = run_cli("train", "--data", "cifar10", "--out", str(tmp_path / "r"))
    _one_line_error(res, "cifar10", "MedMNIST")


def test_missing_dataset_no_download(tmp_path):
    import os

    env = {**os.environ, "MEDSIGHT_DATA_DIR": str(tmp_path)}
    res = run_cli("train", "--data", "breastmnist", "--set", "data.download=false", "--out", str(tmp_path / "r"), env=env)
    _one_line_error(res, "breastmnist.npz", "not found")


def test_wrong_md5(tmp_path):
    import os

    make_npz(tmp_path / "breastmnist.npz")
    env = {**os.environ, "MEDSIGHT_DATA_DIR": str(tmp_path)}
    res = run_cli("train", "--data", "breastmnist", "--out", str(tmp_path / "r"), env=env)
    _one_line_error(res, "MD5", "750601b1f35ba3300ea97c75c52ff8f6")


def test_corrupt_and_wrong_keys(tmp_path, tiny_npz):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(tiny_npz.read_bytes()[:200])
    _one_line_error(run_cli("train", "--data", str(bad), "--out", str(tmp_path / "r")), "bad.npz")
    keys = make_npz(tmp_path / "keys.npz", test_images=None)
    _one_line_error(run_cli("train", "--data", str(keys), "--out", str(tmp_path / "r")), "test_images")


def test_invalid_config_value_and_task(tmp_path, tiny_npz):
    _one_line_error(run_cli("train", "--data", str(tiny_npz), "--lr", "-1", "--out", str(tmp_path / "r")), "train.lr")
    _one_line_error(run_cli("train", "--data", str(tiny_npz), "--task", "regression", "--out", str(tmp_path / "r")),
                    "data.task")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  schedule: wiggly\n")
    _one_line_error(run_cli("train", "--config", str(cfg), "--data", str(tiny_npz), "--out", str(tmp_path / "r")),
                    "train.schedule", "cosine")


def test_evaluate_not_a_bundle(tmp_path):
    _one_line_error(run_cli("evaluate", str(tmp_path)), "not a medsight bundle")


def test_datasets_lists_presence(medmnist_dir, capsys):
    assert main(["datasets", "--root", str(medmnist_dir)]) == 0
    out = capsys.readouterr().out
    assert "breastmnist" in out and "pneumoniamnist" in out and "yes" in out


def test_models_listing(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("simple_cnn", "resnet18", "resnet50", "densenet121", "efficientnet_b0"):
        assert name in out


def test_tiny_train_and_evaluate_in_process(tmp_path, tiny_npz, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(tiny_npz), "--epochs", "2", "--batch-size", "8", "--out", str(out),
                 "--no-progress"]) == 0
    for f in ("config.yaml", "model.pt", "bundle.json", "history.csv", "metrics.json"):
        assert (out / f).is_file(), f
    assert main(["evaluate", str(out), "--data", str(tiny_npz), "--split", "test", "--n-boot", "0"]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_qc_on_real_medmnist_and_deid(tmp_path, medmnist_dir, capsys):
    import json

    from tests.data.conftest import make_dicom
    import numpy as np

    rc = main(["qc", "breastmnist", "--json", str(tmp_path / "qc.json")])
    report = json.loads((tmp_path / "qc.json").read_text())
    assert rc in (0, 1) and "class" in capsys.readouterr().out.lower()
    assert report["n_records"] == 780
    src = tmp_path / "in"
    src.mkdir()
    make_dicom(src / "a.dcm", np.zeros((8, 8), np.uint8))
    assert main(["deid", str(src), str(tmp_path / "out")]) == 0  # a Secondary Capture: held back by default
    printed = capsys.readouterr().out
    assert "de-identified 0 files" in printed and "1 held back" in printed and "held back, may carry burned-in text" in printed
    assert main(["deid", str(src), str(tmp_path / "out1"), "--allow-burned-in"]) == 0
    printed = capsys.readouterr().out
    assert "de-identified 1 files" in printed and "written, may carry burned-in text" in printed
    assert main(["deid", str(src), str(tmp_path / "out1")]) == 2  # not empty any more: one line, exit 2
    assert "not empty" in capsys.readouterr().err
    assert main(["deid", str(src), str(tmp_path / "out2"), "--secret-env", "NOPE_NOT_SET"]) == 2


def test_cli_option_errors_name_the_option(tmp_path, tiny_npz, capsys):
    out = tmp_path / "r"
    assert main(["train", "--data", str(tiny_npz), "--epochs", "1", "--batch-size", "8", "--out", str(out),
                 "--no-progress"]) == 0
    capsys.readouterr()
    cases = [
        (["train", "--data", str(tiny_npz), "--set", "train.epochs"], "--set expects key=value"),
        (["predict", str(out), str(tmp_path), "--out", str(tmp_path / "p.txt")], "--out must end in .csv or .json"),
        (["predict", str(out), str(tmp_path), "--clinical-csv", str(tmp_path / "none.csv")], "none.csv"),
        (["evaluate", str(out), "--shift", "--shift-severities", "high", "--n-boot", "0"], "--shift-severities"),
        (["explain", str(out), str(tmp_path / "x.png"), "--method", "lime", "--out", str(tmp_path / "e")], "x.png"),
    ]
    for argv, needle in cases:
        assert main(argv) != 0, argv
        err = capsys.readouterr().err
        assert needle in err, (argv, err)
    (tmp_path / "nopath.csv").write_text("file,age\nx.png,3\n")
    assert main(["predict", str(out), str(tmp_path), "--clinical-csv", str(tmp_path / "nopath.csv")]) == 2
    assert "'path' column" in capsys.readouterr().err
