"""`python benchmarks/medmnist.py` == `medsight bench medmnist`: recipes vs the MedMNIST v2 paper and reference."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from medsight.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "medmnist", *sys.argv[1:]]))
