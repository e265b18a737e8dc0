"""``python -m node``: the ``veilnet`` command line."""

import sys

from node.cli import main

sys.exit(main())
