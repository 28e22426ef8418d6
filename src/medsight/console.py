"""What the command line shows: Rich consoles, tables, the progress sink, the training bar, and logging set-up.

The CLI (:mod:`medsight.cli`) parses and prints; everything it prints is rendered here. Library code never
prints: it reports progress through :mod:`medsight.progress` (drawn by :class:`RichSink`) and problems through
the ``medsight.*`` loggers (routed by :func:`setup_logging`).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(stderr=True)  # progress, warnings, errors
out_console = Console()  # results


class Opts:
    """Global options of this invocation (set by the CLI's callback, reset by ``cli.main()``)."""

    quiet = False
    verbose = False


def is_main_process() -> bool:
    """Rank 0 of a distributed run (or not distributed): the one process that prints."""
    return int(os.environ.get("RANK", "0")) == 0


def info(message: str) -> None:
    """A line about what was done (files written, where the server listens); --quiet drops it."""
    if not Opts.quiet:
        out_console.print(message, highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------------------------- logging
_MARK = "_medsight_cli"


def setup_logging(*, quiet: bool = False, verbose: bool = False, server: bool = False) -> None:
    """The invocation's one logging set-up: ``medsight.*`` records to stderr (WARNING; ``--quiet`` ERROR;
    ``--verbose`` DEBUG). A server (``server=True``) logs one timestamped INFO line per request (no patient data),
    and the other libraries' records go through the same handler format at INFO. :func:`restore_logging` undoes
    it (``cli.main()`` calls it at the end of each invocation)."""
    if server:
        level, fmt = (logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO,
                      "%(asctime)s %(levelname)s %(name)s %(message)s")
    else:
        level, fmt = logging.ERROR if quiet else logging.DEBUG if verbose else logging.WARNING, \
            "%(levelname)s %(name)s: %(message)s"
    log = logging.getLogger("medsight")
    _drop_handlers(log)
    handler = logging.StreamHandler(sys.stderr)
    setattr(handler, _MARK, True)
    handler.setFormatter(logging.Formatter(fmt))
    # tracking warnings have their own one-line printer (show_tracking_warnings) once it is installed
    handler.addFilter(lambda r: not (r.name == "medsight.tracking" and any(
        getattr(h, "medsight_cli", False) for h in logging.getLogger("medsight.tracking").handlers)))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    if server:
        root = logging.getLogger()
        _drop_handlers(root)
        if not root.handlers:  # as logging.basicConfig: only where nobody configured the root logger
            h = logging.StreamHandler(sys.stderr)
            setattr(h, _MARK, True)
            h.setFormatter(logging.Formatter(fmt))
            root.addHandler(h)
            root.setLevel(logging.INFO)


def _drop_handlers(log: logging.Logger) -> None:
    for h in [h for h in log.handlers if getattr(h, _MARK, False) or getattr(h, "medsight_cli", False)]:
        log.removeHandler(h)


def save_logging() -> tuple[Any, ...]:
    log, root = logging.getLogger("medsight"), logging.getLogger()
    return log.level, log.propagate, root.level


def restore_logging(saved: tuple[Any, ...]) -> None:
    """Undo :func:`setup_logging` and :func:`show_tracking_warnings` (``saved`` from :func:`save_logging`)."""
    log, root = logging.getLogger("medsight"), logging.getLogger()
    _drop_handlers(log)
    _drop_handlers(logging.getLogger("medsight.tracking"))
    if any(getattr(h, _MARK, False) for h in root.handlers):
        _drop_handlers(root)
        root.setLevel(saved[2])
    log.setLevel(saved[0])
    log.propagate = saved[1]


def show_tracking_warnings() -> None:
    """Tracking problems (logged by medsight.tracking, never fatal to the run) as one 'warning:' line each."""

    class WarningLines(logging.Handler):
        medsight_cli = True

        def emit(self, record):
            console.print(f"[yellow]warning:[/yellow] {record.getMessage()}", highlight=False, soft_wrap=True)

    lg = logging.getLogger("medsight.tracking")
    if not any(getattr(h, "medsight_cli", False) for h in lg.handlers):
        lg.addHandler(WarningLines(logging.WARNING))


# --------------------------------------------------------------------------------------------- progress
class RichSink:
    """Renders medsight.progress steps as Rich bars on stderr: only on a terminal, never with --quiet, only on
    rank 0. One rich Progress serves every step (and the training bar), started with the first step, stopped
    (and erased) with the last."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
        from rich.text import Text

        class Count(ProgressColumn):  # "12/40"; nothing for a step of unknown length
            def render(self, task):
                def n(x):
                    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"

                return Text("" if task.total is None else f"{n(task.completed)}/{n(task.total)}", style="green")

        self.console = console
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), Count(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console,
                                 transient=True)
        self.tasks: dict = {}

    @property
    def enabled(self) -> bool:
        """Asked at each step: --quiet is only known once the global options are parsed."""
        return self.console.is_terminal and not Opts.quiet and is_main_process()

    def start(self, key, description, total) -> None:
        if not self.enabled:
            return
        if not self.tasks:
            self.progress.start()
        self.tasks[key] = self.progress.add_task(description, total=total, info="")

    def advance(self, key, amount) -> None:
        if key in self.tasks:
            self.progress.advance(self.tasks[key], amount)

    def update(self, key, **fields) -> None:
        if key in self.tasks:
            self.progress.update(self.tasks[key], **fields)

    def finish(self, key) -> None:
        if key in self.tasks:
            self.progress.remove_task(self.tasks.pop(key))
            if not self.tasks:
                self.progress.stop()

    def close(self) -> None:
        for key in list(self.tasks):
            self.finish(key)

    def print(self, line: str) -> None:
        """A line above the bars (or plain on stderr when they are off)."""
        if not Opts.quiet:
            self.console.print(line, highlight=False, soft_wrap=True)  # above the bars while they are live


def current_sink() -> RichSink | None:
    from medsight import progress

    s = progress.get_sink()
    return s if isinstance(s, RichSink) else None


class TrainingProgress:
    """Training bar fed by the trainer's callback events, drawn through the invocation's progress sink."""

    def __init__(self, enabled: bool = True):
        from medsight import progress

        self.enabled = is_main_process()  # epoch lines are printed either way; the bar only when asked
        self.show_bar = enabled
        self.sink = current_sink()
        self.task: Any = None
        self.progress = progress

    def __enter__(self):
        return self

    def __exit__(self, *a):
        if self.task is not None:
            self.task.close()
            self.task = None

    def _print(self, line: str) -> None:
        if self.sink is not None:
            self.sink.print(line)
        elif not Opts.quiet:
            console.print(line, highlight=False)

    def __call__(self, event: str, info: dict) -> None:
        if not self.enabled:
            return
        if event == "start":
            self.total = info["epochs"]
            if self.show_bar:
                self.task = self.progress.task(f"epoch {info['start_epoch'] + 1}/{info['epochs']}", total=info["steps"])
        elif event == "step" and self.task is not None and self.sink is not None:
            self.sink.update(self.task.key, completed=info["step"], total=info["steps"],
                             description=f"epoch {info['epoch'] + 1}/{self.total}", info=f"loss {info['loss']:.4f}")
        elif event == "epoch":
            auc = info.get("val_auc")
            line = (f"epoch {info['epoch']:>3}  train_loss {info['train_loss']:.4f}  val_loss {info['val_loss']:.4f}"
                    + (f"  val_auc {auc:.4f}" if auc is not None else "")
                    + (f"  val_acc {info['val_accuracy']:.4f}" if "val_accuracy" in info else "")
                    + ("  *" if info.get("improved") else ""))
            self._print(line)
            if self.task is not None and self.sink is not None:
                self.sink.update(self.task.key, completed=0)
        elif event == "early_stop":
            self._print(f"early stop at epoch {info['epoch']} (best epoch {info['best_epoch']})")
        elif event == "pretrained":
            self._print(f"pretrained weights {info['source']}: {info['filled']} of {info['weight_tensors']} weight "
                        f"tensors loaded (sha256 {info['sha256'][:12]}), head {info['head']} trained from scratch")
        elif event == "member":
            self._print(f"ensemble member {info['member']}/{info['members']} done (best epoch {info['best_epoch']})")
        elif event == "resumed":
            self._print(f"resuming at epoch {info['epoch'] + 1}")
        elif event == "summary":
            for line in info["lines"]:
                self._print(escape(line))
        elif event == "warnings":  # shown even with --quiet: they change how the results may be read
            for line in info["lines"]:
                console.print(f"[yellow]warning:[/yellow] {escape(line)}", highlight=False)


# --------------------------------------------------------------------------------------------- tables
def metrics_table(metrics: dict, title: str = "metrics") -> Table:
    """Rows = metrics (named with the positive class they are about), columns = splits; values with their 95% CI
    when present; an undefined value shows its reason."""
    from medsight.summary import metric_label

    splits = [s for s in metrics if isinstance(metrics[s], dict)]
    positive = next((metrics[s].get("positive_class") for s in splits if metrics[s].get("positive_class")), None)
    names: list[str] = []
    for s in splits:
        names += [k for k, v in metrics[s].items() if isinstance(v, dict) and k not in names
                  and (isinstance(v.get("value"), (int, float)) or (v.get("value") is None and v.get("reason")))]
    table = Table(title=title)
    table.add_column("metric")
    for s in splits:
        table.add_column(s, justify="right")
    for n in names:
        cells = []
        for s in splits:
            v = metrics[s].get(n)
            if not isinstance(v, dict) or v.get("value") is None:
                cells.append(escape(f"undefined: {v['reason']}") if isinstance(v, dict) and v.get("reason") else "-")
                continue
            ci = v.get("ci")
            cells.append(f"{v['value']:.4f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and None not in ci else ""))
        table.add_row(escape(metric_label(n, positive)), *cells)
    return table


def shift_table(res: dict, split_name: str) -> Table:
    key = res["primary"]
    table = Table(title=f"{key} under corruption ({split_name}; clean {res['clean'][key]:.3f})")
    table.add_column("corruption")
    for v in res["severities"]:
        table.add_column(f"severity {v}", justify="right")
    for name, rows in res["corruptions"].items():
        table.add_row(name, *[f"{r['metrics'][key]:.3f} ({-r['drop'][key]:+.3f})" for r in rows])
    return table

