"""The planner's typed errors (they derive from the package's :class:`BloombeeError`)."""

from ..errors import BloombeeError


class InfeasiblePlanError(BloombeeError, RuntimeError):
    """No chain of the included workers can host the model for this workload.

    The message says how much memory is missing (or which links are), and what to change.
    """


class ProfileError(BloombeeError, ValueError):
    """A profile value is malformed: a missing measurement, a negative size, an unknown name."""
