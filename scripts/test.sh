#!/usr/bin/env bash
# Install (if needed) and run the tests: `bash scripts/test.sh` runs the whole suite; any arguments go to pytest
# instead (`bash scripts/test.sh tests/test_cli.py -x`, `bash scripts/test.sh -m "not slow"`).
# Lanes (markers set by tests/conftest.py from what each test needs):
#   bash scripts/test.sh -m unit               the fast lane: no real data, no servers, no browser, nothing slow;
#                                              under a minute on 2 cores and it imports every medsight module
#   bash scripts/test.sh -m "not slow"         everything but the long end-to-end runs
#   bash scripts/test.sh -m realdata           what needs $MEDSIGHT_DATA_DIR / the sample scans
#   bash scripts/test.sh -m network_service    what starts a server (MLflow, ...)
# Real-data tests read $MEDSIGHT_DATA_DIR (default ../shared/data/medmnist) and fail when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/medsight ] || bash scripts/install.sh
. .venv/bin/activate
C=()
[ -f constraints.txt ] && C=(-c constraints.txt)
# re-sync the install only when the project's dependency files changed since the last sync (saves ~15 s a run)
stamp=.venv/.medsight-deps
want="$(cat pyproject.toml constraints.txt 2>/dev/null | sha256sum | cut -c1-64)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q ${C[@]+"${C[@]}"} -e ".[dev]" >/dev/null
  printf '%s\n' "$want" > "$stamp"
fi
export MEDSIGHT_DATA_DIR="${MEDSIGHT_DATA_DIR:-$(cd .. && pwd)/shared/data/medmnist}"
export MEDSIGHT_SAMPLES_DIR="${MEDSIGHT_SAMPLES_DIR:-$(cd .. && pwd)/shared/data/samples}"
if [ "$#" -eq 0 ]; then
  set -- tests
fi
python -m pytest -q "$@"
