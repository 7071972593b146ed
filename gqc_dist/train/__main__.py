"""``python -m gqc_dist.train``: the same as the ``gqc-train`` console script."""

import sys

from .cli import main

sys.exit(main())
