import sys

from medsight.cli import main

sys.exit(main())
