"""``python -m gqc_dist.train``: the same as the ``gqc-train`` console script."""

from .cli import entry

entry()
