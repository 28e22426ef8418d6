#!/usr/bin/env bash
# Create .venv and install medsight with its test extras, at the versions the tests passed with
# (constraints.txt; regenerate it with scripts/lock.sh). torch comes first, as the CPU build 2.13.0, so that
# nothing later pulls a multi-GB CUDA build. One line per step (pip itself stays quiet).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
step() { echo "install: [$1/4] $2 ($((SECONDS - start)) s so far)"; }
step 1 "creating the virtual environment .venv"
python3 -m venv .venv
. .venv/bin/activate
step 2 "upgrading pip"
python -m pip install -q --upgrade pip
C=()
[ -f constraints.txt ] && C=(-c constraints.txt)
step 3 "installing PyTorch 2.13.0, CPU build (about 200 MB to download; the longest step)"
python -m pip install -q ${C[@]+"${C[@]}"} "torch==2.13.0" || {
  echo "install: torch 2.13.0 is not available here; trying torch>=2.3,<2.14"
  python -m pip install -q "torch>=2.3,<2.14"
}
step 4 "installing medsight and its test extras (pip install -e .[dev], versions from constraints.txt)"
python -m pip install -q ${C[@]+"${C[@]}"} -e ".[dev]"
echo "install: done in $((SECONDS - start)) s; '. .venv/bin/activate' gives you the medsight command"
