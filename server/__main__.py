"""``python -m server``: the same command line as ``qlora-server``."""

import sys

from server.cli import main

sys.exit(main())
