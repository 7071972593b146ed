"""``python -m gqc_dist.train``: the same as the ``gqc-train`` console script."""

from gqc_dist.train.cli import entry

entry()
