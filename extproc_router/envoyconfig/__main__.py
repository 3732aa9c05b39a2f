"""``python -m extproc_router.envoyconfig [-f values.yaml] ...``: same as ``extproc-router envoy-config``."""

import sys

from extproc_router.envoyconfig.cli import main

sys.exit(main())
