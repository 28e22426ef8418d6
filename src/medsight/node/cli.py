"""`medsight node ...`: run the DICOM node, show its worklist, export a cohort (imports stay light)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

node_app = typer.Typer(no_args_is_help=True, help="a DICOM node beside a PACS: receive or poll studies, run "
                                                  "bundles, send results back as DICOM (SR + Secondary Capture)")

_CONFIG = typer.Option(..., "--config", "-c", help="node YAML config (see docs/node.md)")


@node_app.command("run")
def node_run(config: Path = _CONFIG):
    """Run the node until interrupted: Storage SCP, poller, worker, /metrics."""
    import logging
    import sys

    from medsight.node.config import load_config
    from medsight.node.service import Node

    cfg = load_config(config)
    lg = logging.getLogger("medsight.node")
    if logging.getLogger("medsight").level > logging.ERROR - 1:  # --quiet: errors only
        lg.setLevel(logging.ERROR)
    else:
        lg.setLevel(logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    lg.addHandler(handler)
    lg.propagate = False
    node = Node(cfg).start()
    lg.info("node %s running: %d route(s), worklist %s%s", cfg.ae_title, len(cfg.routes), cfg.db_path,
            f", metrics on http://{cfg.metrics_host}:{node.metrics_port}/metrics" if node.metrics_port else "")
    try:
        node.run_forever()
    finally:
        lg.removeHandler(handler)


@node_app.command("status")
def node_status(config: Path = _CONFIG, as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """Queue counts per state, the last errors and the throughput of the last hour."""
    from medsight.node.config import load_config
    from medsight.node.service import status

    s = status(load_config(config))
    if as_json:
        typer.echo(json.dumps(s, indent=1))
        return
    c = s["counts"]
    typer.echo("jobs: " + ", ".join(f"{k} {v}" for k, v in c.items()))
    tp = s["throughput"]
    lat = "" if tp["p50_s"] is None else f", arrival to sent p50 {tp['p50_s']:.1f} s, p95 {tp['p95_s']:.1f} s"
    typer.echo(f"last hour: {tp['sent']} sent ({tp['per_minute']:.2f}/min){lat}")
    typer.echo(f"store: {s['store_bytes'] / 1e6:.1f} MB held")
    for e in s["last_errors"]:
        typer.echo(f"job {e['job']} ({e['route']}, {e['state']}, attempt {e['attempts']}): {e['error']}")


@node_app.command("export")
def node_export(config: Path = _CONFIG,
                out: Path = typer.Option(..., "--out", help="new or empty folder for images/ and manifest.csv"),
                labels: Path = typer.Option(..., help="CSV: accession_number (or study_uid) and label"),
                key: str = typer.Option("accession", help="what the labels CSV is keyed by: accession or study"),
                filter_: List[str] = typer.Option([], "--filter", help="QIDO-RS filter KEYWORD=VALUE (repeatable)"),
                secret_env: Optional[str] = typer.Option(None, help="environment variable holding the de-identification "
                                                          "secret (reproducible pseudonyms; default: random)"),
                mapping: Optional[Path] = typer.Option(None, help="also write the re-identifying mapping CSV here (keep it "
                                                        "secure)")):
    """Cohort export: query, retrieve (WADO-RS), de-identify, and write a manifest `medsight train` reads."""
    import os

    from medsight.errors import ConfigError
    from medsight.node.config import load_config
    from medsight.node.export import export_cohort

    filters = {}
    for f in filter_:
        if "=" not in f:
            raise ConfigError(f"--filter {f!r}: expected KEYWORD=VALUE")
        k, v = f.split("=", 1)
        filters[k.strip()] = v.strip()
    secret = None
    if secret_env:
        if secret_env not in os.environ:
            raise ConfigError(f"--secret-env: environment variable {secret_env} is not set")
        secret = os.environ[secret_env]
    s = export_cohort(load_config(config), out, labels, key=key, filters=filters, secret=secret, mapping_csv=mapping)
    typer.echo(f"exported {s['written']} de-identified instances from {s['series']} series ({s['patients']} "
               f"patients; {s['held_back']} held back, {s['refused']} refused) -> {s['manifest']}")
