"""Optional dependencies: the core needs torch and torch-schedule-anything only; the rest comes
with an extra (``pip install 'gqc_dist[deepspeed]'``, ``[train]``, ``[mpi]``, ``[mht]``, ...)."""

import importlib

from gqc_dist.errors import GQCUsageError


def require(module: str, extra: str, what: str):
    """``module`` imported, or one :class:`GQCUsageError` line saying which extra brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise GQCUsageError(f"{module.split('.')[0]} is not installed and {what} needs it ({error}): "
                            f"pip install 'gqc_dist[{extra}]'") from error
