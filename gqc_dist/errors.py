"""Exceptions raised by gqc_dist. Every message names the offending value or key."""


class GQCError(Exception):
    """Base class of every error gqc_dist raises on purpose."""


class GQCConfigError(GQCError, ValueError):
    """A constructor argument or config entry is missing, misspelled, mistyped or out of range."""


class GQCTypeError(GQCError, TypeError):
    """An argument has the wrong type."""


class GQCUsageError(GQCError, RuntimeError):
    """The wrapper was used in a way that would silently give wrong results (e.g. zero_grad())."""


class PartialGradientError(GQCError, RuntimeError):
    """Gradients are rank-local partial sums (DDP under no_sync, FSDP2 with sync off, Partial DTensor).

    Their global norm cannot be computed without reducing the tensors themselves, and treating
    them as replicated makes ranks decide differently, so the wrapper refuses them.
    """


class RankDivergenceError(GQCError, RuntimeError):
    """Ranks disagree on the decision, the draw count or the controller state (verify mode)."""

    def __init__(self, message: str, ranks=()):
        super().__init__(message)
        self.ranks = tuple(ranks)


class CollectiveTimeoutError(GQCError, RuntimeError):
    """A collective of gqc_dist did not complete in time: another rank is stalled or gone."""


class TrainError(GQCError, RuntimeError):
    """A gqc-train run cannot start or continue (launcher environment, run directory, resume)."""


class CheckpointError(GQCError, ValueError):
    """A state dict is corrupt, truncated, or belongs to another algorithm or model."""
