#!/usr/bin/env bash
# The main job: install, train the baseline on BreastMNIST and print its test metrics with 95% CIs.
# The data is found the way scripts/test.sh finds it: $MEDSIGHT_DATA_DIR, else ../shared/data/medmnist beside this
# checkout when it is there, else ~/.medsight/data (where a missing file is downloaded from Zenodo, MD5-checked).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${MEDSIGHT_DATA_DIR:-}" ]; then
  if [ -d ../shared/data/medmnist ]; then
    MEDSIGHT_DATA_DIR="$(cd ../shared/data/medmnist && pwd)"
  else
    MEDSIGHT_DATA_DIR="$HOME/.medsight/data"
  fi
fi
export MEDSIGHT_DATA_DIR
# said before anything is installed, so an offline machine learns it at once
if [ -f "$MEDSIGHT_DATA_DIR/breastmnist.npz" ]; then
  echo "demo: data: BreastMNIST from $MEDSIGHT_DATA_DIR/breastmnist.npz (no download needed)"
else
  echo "demo: data: $MEDSIGHT_DATA_DIR/breastmnist.npz is missing; training will download it from Zenodo (needs"
  echo "      network). Offline, set MEDSIGHT_DATA_DIR to a folder holding breastmnist.npz and run this again."
fi
if [ -x .venv/bin/medsight ]; then
  echo "demo: using the installed .venv"
else
  echo "demo: installing medsight into .venv first (scripts/install.sh; a few minutes)"
  bash scripts/install.sh
fi
. .venv/bin/activate
echo "demo: training (simple_cnn, at most 10 epochs, early stopping on validation) into runs/breast"
medsight train --data breastmnist --model simple_cnn --epochs 10 --out runs/breast --overwrite "$@"
medsight evaluate runs/breast --split val --split test
