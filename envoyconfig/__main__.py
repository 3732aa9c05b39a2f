"""``python -m envoyconfig [-f values.yaml] ...``: same as ``extproc-router envoy-config``."""

import sys

from envoyconfig.cli import main

sys.exit(main())
