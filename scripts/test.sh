#!/usr/bin/env bash
# Install (if needed) and run the whole test suite. Real-data tests read $MEDSIGHT_DATA_DIR
# (default ../shared/data/medmnist) and fail when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/medsight ] || bash scripts/install.sh
. .venv/bin/activate
python -m pip install -q -e ".[dev]" >/dev/null
export MEDSIGHT_DATA_DIR="${MEDSIGHT_DATA_DIR:-$(cd .. && pwd)/shared/data/medmnist}"
python -m pytest tests -q "$@"
