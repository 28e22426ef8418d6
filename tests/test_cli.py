"""CLI behaviour: one-line errors with exit code 2 and no traceback (usage errors of every command, bad input,
unexpected errors), --version, --quiet / --verbose, progress bars; datasets and models listings.

Most cases run main() in this interpreter (fast); a few start a real `python -m medsight` process."""

import subprocess
import sys

import pytest


from medsight.cli import main
from tests._subproc import env as subproc_env
from tests.conftest import make_npz


def run_cli(*args, env=None):
    """A real `python -m medsight` process (this checkout's src first on the path)."""
    return subprocess.run([sys.executable, "-m", "medsight", *args], capture_output=True, text=True,
                          env=env or subproc_env(), timeout=300)


@pytest.fixture
def cli(capsys):
    """main() in this interpreter, returning what a process would: returncode, stdout, stderr."""

    def run(*args):
        capsys.readouterr()
        rc = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), rc, out, err)

    return run


def _one_line_error(res, *needles):
    assert res.returncode == 2, res.stderr + res.stdout
    err = res.stderr.strip()
    assert "Traceback" not in err and "Traceback" not in res.stdout
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


def test_unknown_model(tmp_path, tiny_npz, cli):
    res = cli("train", "--data", str(tiny_npz), "--model", "vgg99", "--epochs", "1", "--out", str(tmp_path / "r"))
    _one_line_error(res, "vgg99", "resnet18")


def test_unknown_dataset_in_a_real_process(tmp_path):
    res = run_cli("train", "--data", "cifar10", "--out", str(tmp_path / "r"))
    _one_line_error(res, "cifar10", "MedMNIST")


def test_missing_dataset_no_download(tmp_path, cli, monkeypatch):
    monkeypatch.setenv("MEDSIGHT_DATA_DIR", str(tmp_path))
    res = cli("train", "--data", "breastmnist", "--set", "data.download=false", "--out", str(tmp_path / "r"))
    # the same offline steps as the README: where to get the file, its MD5, where to put it
    _one_line_error(res, "breastmnist.npz", "not found", "without network access",
                    "https://zenodo.org/records/10519652/files/breastmnist.npz", "750601b1f35ba3300ea97c75c52ff8f6",
                    str(tmp_path / "breastmnist.npz"), "MEDSIGHT_DATA_DIR")


def test_wrong_md5(tmp_path, cli, monkeypatch):
    make_npz(tmp_path / "breastmnist.npz")
    monkeypatch.setenv("MEDSIGHT_DATA_DIR", str(tmp_path))
    res = cli("train", "--data", "breastmnist", "--out", str(tmp_path / "r"))
    _one_line_error(res, "MD5", "750601b1f35ba3300ea97c75c52ff8f6")


def test_corrupt_and_wrong_keys(tmp_path, tiny_npz, cli):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(tiny_npz.read_bytes()[:200])
    _one_line_error(cli("train", "--data", str(bad), "--out", str(tmp_path / "r")), "bad.npz")
    keys = make_npz(tmp_path / "keys.npz", test_images=None)
    _one_line_error(cli("train", "--data", str(keys), "--out", str(tmp_path / "r")), "test_images")


def test_invalid_config_value_and_task(tmp_path, tiny_npz, cli):
    _one_line_error(cli("train", "--data", str(tiny_npz), "--lr", "-1", "--out", str(tmp_path / "r")), "train.lr")
    _one_line_error(cli("train", "--data", str(tiny_npz), "--task", "regression", "--out", str(tmp_path / "r")),
                    "data.task")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  schedule: wiggly\n")
    _one_line_error(cli("train", "--config", str(cfg), "--data", str(tiny_npz), "--out", str(tmp_path / "r")),
                    "train.schedule", "cosine")


def test_evaluate_not_a_bundle(tmp_path, cli):
    _one_line_error(cli("evaluate", str(tmp_path)), "not a medsight bundle")


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
    captured = capsys.readouterr()
    assert "epoch   1" in captured.err and f"bundle written to {out}" in captured.out
    assert main(["evaluate", str(out), "--data", str(tiny_npz), "--split", "test", "--n-boot", "0"]) == 0
    captured = capsys.readouterr().out
    assert "accuracy" in captured and f"report written to {out / 'report.html'}" in captured
    # --quiet: the results table stays, the info line goes, and nothing at all on stderr
    assert main(["--quiet", "evaluate", str(out), "--data", str(tiny_npz), "--split", "test", "--n-boot", "0"]) == 0
    captured = capsys.readouterr()
    assert "accuracy" in captured.out and "report written" not in captured.out and captured.err == ""
    assert main(["-q", "train", "--data", str(tiny_npz), "--epochs", "1", "--batch-size", "8", "--no-auto",
                 "--out", str(tmp_path / "run2")]) == 0  # the plain seed CNN: not degenerate on this tiny set
    captured = capsys.readouterr()
    # --quiet keeps only the warnings that change how results read: here, a threshold placed on 4 positive cases
    err = " ".join(captured.err.split())
    assert err.startswith("warning: threshold: the validation split has only 4 positive case(s)"), err
    assert err.count("warning:") == 1 and "epoch" not in err.replace("epoch with", "")
    assert "bundle written" not in captured.out and "accuracy" in captured.out


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
    assert "de-identified 1 file into" in printed and "written, may carry burned-in text" in printed
    assert main(["deid", str(src), str(tmp_path / "out1")]) == 2  # not empty any more: one line, exit 2
    assert "not empty" in capsys.readouterr().err
    assert "medsight.data.deid" not in capsys.readouterr().err
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


# --- usage errors: every command, one line on stderr, exit 2, never a traceback --------------------------------

# (argv with a typo'd option, argv missing a required argument or an option's value, argv with a bad-typed value)
USAGE_CASES = {
    "train": (["train", "--epoch", "3"], ["train", "--epochs"], ["train", "--epochs", "three"]),
    "evaluate": (["evaluate", "b", "--nboot", "1"], ["evaluate"], ["evaluate", "b", "--n-boot", "many"]),
    "explain": (["explain", "b", "x.png", "--methd", "gradcam"], ["explain", "b"],
                ["explain", "b", "x.png", "--class-idx", "first"]),
    "predict": (["predict", "b", "x.png", "--batchsize", "2"], ["predict", "b"],
                ["predict", "b", "x.png", "--batch-size", "2.5"]),
    "export": (["export", "b", "--opsett", "17"], ["export"], ["export", "b", "--opset", "seventeen"]),
    "serve": (["serve", "b", "--prot", "80"], ["serve"], ["serve", "b", "--port", "http"]),
    "qc": (["qc", "d", "--near-dupe", "4"], ["qc"], ["qc", "d", "--near-dup", "close"]),
    "deid": (["deid", "a", "b", "--maping", "m.csv"], ["deid", "a"], ["deid", "a", "b", "--keep-private=maybe"]),
    "datasets": (["datasets", "--roots", "d"], ["datasets", "--root"], ["datasets", "--root", "d", "extra"]),
    "models": (["models", "--all"], ["models", "extra"], ["models", "--all=1"]),
    "bench medmnist": (["bench", "medmnist", "--seed", "0"], ["bench", "medmnist", "--seeds"],
                       ["bench", "medmnist", "--ref-epochs", "two"]),
    "top level": (["--no-such-option"], ["trian"], ["--quiet=loud", "models"]),
}


def _assert_usage_error(rc, err, out, argv):
    assert rc == 2, (argv, rc, err)
    lines = [ln for ln in err.splitlines()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) > len("error: "), (argv, err)
    assert "Traceback" not in err + out, argv
    assert "--help" in lines[0], (argv, err)  # says where to look


@pytest.mark.parametrize("command", sorted(USAGE_CASES))
def test_every_command_usage_error_is_one_line_exit_2(command, capsys):
    for argv in USAGE_CASES[command]:
        rc = main(argv)
        captured = capsys.readouterr()
        _assert_usage_error(rc, captured.err, captured.out, argv)


def test_usage_error_messages_say_what_was_wrong(capsys):
    for argv, needle in [(["train", "--epoch", "3"], "--epoch"), (["evaluate"], "bundle"), (["trian"], "train"),
                         (["train", "--epochs", "three"], "--epochs")]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err, (argv, err)
    for argv, where in [(["train", "--epoch", "3"], "medsight train"), (["train", "--epochs"], "medsight train"),
                        (["-q", "bench", "medmnist", "--seeds"], "medsight bench medmnist"), (["--nope"], "medsight")]:
        assert main(argv) == 2
        assert f"(see '{where} --help')" in capsys.readouterr().err, argv


def test_usage_errors_in_a_real_process():
    """The installed entry point path (python -m medsight) on the resolved typer/click: what CI checks too."""
    for argv in (["--no-such-option"], ["trian"], ["evaluate"], ["train", "--epochs"]):
        res = run_cli(*argv)
        _assert_usage_error(res.returncode, res.stderr, res.stdout, argv)


def test_version_in_a_real_process():
    from medsight import __version__

    res = run_cli("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"medsight {__version__}" and res.stderr == ""


def test_no_arguments_shows_help_exit_2(capsys):
    assert main([]) == 2
    captured = capsys.readouterr()
    assert "Usage" in captured.out and "train" in captured.out and "Traceback" not in captured.err
    assert main(["bench"]) == 2
    assert "medmnist" in capsys.readouterr().out
    assert main(["--help"]) == 0 and "--quiet" in capsys.readouterr().out


def test_quiet_and_verbose_exclude_each_other(capsys):
    assert main(["-q", "-v", "models"]) == 2
    assert capsys.readouterr().err.strip() == "error: --quiet and --verbose exclude each other"


def test_unexpected_exception_is_one_line_and_traceback_only_with_verbose(monkeypatch, capsys):
    import medsight.models

    def boom():
        raise RuntimeError("registry exploded")

    monkeypatch.setattr(medsight.models, "list_models", boom)
    assert main(["models"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "unexpected RuntimeError: registry exploded" in err
    assert "Traceback" not in err and "--verbose" in err
    assert main(["--verbose", "models"]) == 1
    assert "Traceback" in capsys.readouterr().err

    def missing():
        raise FileNotFoundError(2, "No such file or directory", "/nowhere/x.yaml")

    monkeypatch.setattr(medsight.models, "list_models", missing)
    assert main(["models"]) == 2  # a path that is not there is bad input, named in one line
    assert capsys.readouterr().err.strip() == "error: No such file or directory: /nowhere/x.yaml"


def test_serve_logs_requests_at_info_unless_quiet(monkeypatch, capsys):
    import logging

    import medsight.serve.app
    from medsight.errors import MedsightError

    levels = []

    def fake_create_app(*a, **k):
        levels.append(logging.getLogger("medsight").getEffectiveLevel())
        raise MedsightError("stop here")

    monkeypatch.setattr(medsight.serve.app, "create_app", fake_create_app)
    assert main(["serve", "b"]) == 2 and main(["-q", "serve", "b"]) == 2 and main(["models"]) == 0
    assert levels == [logging.INFO, logging.WARNING]
    capsys.readouterr()


def test_cli_leaves_logging_and_progress_as_it_found_them():
    import logging

    from medsight import progress

    log = logging.getLogger("medsight")
    before = (log.level, log.propagate, list(log.handlers), progress.get_sink())
    assert main(["--verbose", "models"]) == 0
    assert main(["trian"]) == 2
    assert (log.level, log.propagate, list(log.handlers), progress.get_sink()) == before


def test_progress_bars_render_on_a_terminal_and_vanish(monkeypatch):
    """The CLI's sink draws a bar per library step on a terminal and erases it when the step ends."""
    import io

    from rich.console import Console

    import medsight.console as con  # the CLI's rendering
    from medsight import progress

    buf = io.StringIO()
    monkeypatch.setattr(con, "console", Console(file=buf, force_terminal=True, width=100))
    sink = con.RichSink()
    assert sink.enabled
    with progress.using(sink):
        for _ in progress.track(range(3), "de-identifying"):
            pass
        assert sink.tasks == {} and not sink.progress.live.is_started
    assert "de-identifying" in buf.getvalue()
    monkeypatch.setattr(con.Opts, "quiet", True)  # set by the global options after main() made the sink
    assert not sink.enabled
    with progress.using(sink):
        progress.task("quietly", total=1).close()
    assert "quietly" not in buf.getvalue()
    monkeypatch.setattr(con.Opts, "quiet", False)
    monkeypatch.setattr(con, "console", Console(file=io.StringIO(), force_terminal=False))
    assert not con.RichSink().enabled  # piped / CI logs: no bars
