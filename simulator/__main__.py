"""``python -m simulator [options]``: the same as ``extproc-router sim [options]``."""

import sys

from simulator.cli import main

if __name__ == "__main__":
    sys.exit(main())
