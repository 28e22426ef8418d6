#!/usr/bin/env bash
# The main job: install, train the baseline on BreastMNIST and print its test metrics with 95% CIs.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/medsight ] || bash scripts/install.sh
. .venv/bin/activate
export MEDSIGHT_DATA_DIR="${MEDSIGHT_DATA_DIR:-$HOME/.medsight/data}"
medsight train --data breastmnist --model simple_cnn --epochs 10 --out runs/breast --overwrite "$@"
medsight evaluate runs/breast --split val --split test
