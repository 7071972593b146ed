"""The first host of a Slurm node list, for ``MASTER_ADDR`` under plain ``srun`` (no torchrun).

Slurm writes compressed host lists (``node[01-03,7],gpu-a[2-3]``); the first host is the one
that rank 0 runs on when tasks are laid out block-wise, as Lightning's Slurm environment assumes.
"""

import re


def first_host(nodelist: str) -> str:
    """``"node[01-03,7],other"`` -> ``"node01"``; a plain name is returned as it is."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot read a host from the Slurm node list {nodelist!r}")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]
