#!/usr/bin/env bash
# Create .venv and install medsight with its test extras, at the versions the tests passed with
# (constraints.txt; regenerate it with scripts/lock.sh). torch comes first, as the CPU build 2.13.0, so that
# nothing later pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
C=()
[ -f constraints.txt ] && C=(-c constraints.txt)
python -m pip install -q ${C[@]+"${C[@]}"} "torch==2.13.0" || python -m pip install -q "torch>=2.3,<2.14"
python -m pip install -q ${C[@]+"${C[@]}"} -e ".[dev]"
