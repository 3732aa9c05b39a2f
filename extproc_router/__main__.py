import sys

from extproc_router.cli import main

sys.exit(main())
