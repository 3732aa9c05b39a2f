"""``python -m extproc_router.simulator [options]``: the same as ``extproc-router sim [options]``."""

import sys

from extproc_router.simulator.cli import main

if __name__ == "__main__":
    sys.exit(main())
